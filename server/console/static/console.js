// fedge console: refresh the parts of a page marked data-poll while they can still change.
// No framework, no build: fetch the server-rendered (escaped) fragment and swap it in.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const el of document.querySelectorAll("[data-poll]")) {
    const every = Math.max(1000, Number(el.dataset.every) || 3000);
    if (el.dataset.final === "1") continue;
    const timer = setInterval(async () => {
      let response;
      try {
        response = await fetch(el.dataset.poll, {credentials: "same-origin", cache: "no-store"});
      } catch (e) {
        return; // the server is restarting; try again next tick
      }
      if (response.status === 401) { window.location.reload(); return; }
      if (!response.ok) return;
      el.innerHTML = await response.text();
      if (response.headers.get("X-Fedge-Final") === "1") clearInterval(timer);
    }, every);
  }
});
