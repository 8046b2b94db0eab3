"""The console's pages and its two actions (promote, rollback), as routes on the registry app.

Access: operators only. An operator logs in once with the token from
``fedge.server.operators.grant`` (role ``operator``); the console answers with a
random session cookie (HttpOnly, SameSite=Strict, Secure under TLS). Device bearer
tokens and scientist credentials never open it. Every state-changing form carries
the session's CSRF token. Bad input is a 4xx page, never a 5xx.
"""

import logging
import re
import urllib.parse
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from fedge.server.console import views
from fedge.server.console.sessions import COOKIE, Session, SessionStore
from fedge.server.report.render import run_context
from fedge.shared.errors import FedgeError

log = logging.getLogger(__name__)

PREFIX = "/console"
MAX_FORM_BYTES = 8192
MAX_FORM_FIELDS = 10
_RUN_ID = re.compile(r"[0-9a-f]{12}")
POLL_MS = 3000
_STATIC = Path(__file__).with_name("static")
# No inline script, nothing from elsewhere, no framing: a page that echoed something
# hostile by mistake still could not run it.
_CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


class BadForm(Exception):
    """A POST body the console does not accept (status and message for the page)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _templates() -> Any:
    import jinja2

    from fedge.server.report.render import template_env

    env = template_env()
    env.loader = jinja2.ChoiceLoader(
        [jinja2.PackageLoader("fedge.server.console", "templates"), env.loader]
    )
    return env


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form body, read with a hard size limit (first value per field).

    Raises
    ------
    BadForm
        Wrong content type (415), too large (413), not UTF-8 or too many fields (400).
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise BadForm(415, "send the form as application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise BadForm(413, "form too large")
    try:
        fields = urllib.parse.parse_qs(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise BadForm(400, "malformed form") from e
    return {key: values[0] for key, values in fields.items()}


def mount_console(app: FastAPI, registry_dir: Path | str, server_dir: Path | None = None) -> None:
    """Add the console under ``/console`` to the registry's FastAPI app.

    Parameters
    ----------
    app
        The registry app (``fedge.server.registry.api.create_app``).
    registry_dir
        The registry's data directory.
    server_dir
        The server's data dir (operators.json, runs.json, server.json, the site
        registry); default: the registry directory's parent, which is where
        ``fedge server start`` puts the registry.
    """
    app.include_router(console_router(Path(registry_dir), server_dir))


def console_router(registry_dir: Path, server_dir: Path | None = None) -> APIRouter:
    """The console's routes over one server's data; see ``mount_console``."""
    from fedge.server.operators import authenticate, list_users, token_fingerprint

    registry_dir = registry_dir.expanduser().resolve()
    server = (server_dir or registry_dir.parent).expanduser().resolve()
    sessions = SessionStore()
    plots = views.PlotCache()
    env = _templates()
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    def page(
        request: Request, name: str, session: Session | None, status: int = 200, **ctx: Any
    ) -> HTMLResponse:
        flash = list(session.flash) if session else []
        if session:
            session.flash.clear()
        html = env.get_template(name).render(
            session=session, flash=flash, prefix=PREFIX, poll_ms=POLL_MS, **ctx
        )
        return HTMLResponse(html, status_code=status, headers=_HEADERS)

    def redirect(path: str) -> RedirectResponse:
        return RedirectResponse(PREFIX + path, status_code=303, headers=_HEADERS)

    def still_operator(session: Session) -> bool:
        """Whether the session's user still holds the operator credential it logged in with
        (revocation, and a re-grant after a leaked token, end the session)."""
        try:
            return any(
                u.name == session.user
                and u.role == "operator"
                and u.fingerprint == session.credential
                for u in list_users(server)
            )
        except FedgeError:
            return False  # an unreadable credential file admits nobody

    def current(request: Request) -> Session | None:
        session = sessions.get(request.cookies.get(COOKIE))
        if session is not None and not still_operator(session):
            sessions.drop(request.cookies.get(COOKIE))
            return None
        return session

    def form_error(request: Request, session: Session | None, e: BadForm) -> HTMLResponse:
        return page(request, "error.html.j2", session, e.status, message=str(e))

    @router.get("")
    @router.get("/")
    def home() -> Response:
        return redirect("/runs")

    @router.get("/static/console.js")
    def script() -> Response:
        return Response(
            (_STATIC / "console.js").read_bytes(),
            media_type="text/javascript",
            headers=_HEADERS,
        )

    @router.get("/login")
    def login_form(request: Request) -> Response:
        if current(request) is not None:
            return redirect("/runs")
        return page(request, "login.html.j2", None)

    @router.post("/login")
    async def login(request: Request) -> Response:
        try:
            form = await read_form(request)
        except BadForm as e:
            return form_error(request, None, e)
        token = form.get("token", "").strip()
        user = await run_in_threadpool(authenticate, server, token)
        if user is None:
            log.warning("console: refused a log-in with an unknown token")
            return page(
                request, "login.html.j2", None, 401, error="That is not a valid operator token."
            )
        if user.role != "operator":
            return page(
                request,
                "login.html.j2",
                None,
                403,
                error=f"{user.name} is a {user.role}; only operators may use the console.",
            )
        sid, _ = sessions.create(user.name, token_fingerprint(token))
        log.info("console: %s logged in", user.name)
        response = redirect("/runs")
        response.set_cookie(
            COOKIE,
            sid,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=PREFIX,
        )
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        session = current(request)
        try:
            form = await read_form(request)
        except BadForm as e:
            return form_error(request, session, e)
        if session is not None and session.csrf_ok(form.get("csrf")):
            sessions.drop(request.cookies.get(COOKIE))
        response = redirect("/login")
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    @router.get("/runs")
    def runs(request: Request) -> Response:
        session = current(request)
        if session is None:
            return redirect("/login")
        return page(request, "runs.html.j2", session, rows=views.list_runs(server))

    def run_page(request: Request, run_id: str, template: str) -> Response:
        session = current(request)
        if session is None:
            if template == "run_live.html.j2":
                return Response("log in again", status_code=401, headers=_HEADERS)
            return redirect("/login")
        entry = views.find_run(server, run_id) if _RUN_ID.fullmatch(run_id) else None
        if entry is None:
            return page(request, "error.html.j2", session, 404, message="no such run")
        row = views.load_row(entry)
        if row.run is None:
            return page(request, "error.html.j2", session, 404, message=row.error)
        context = run_context(row.run, plots.plots(row.run))
        response = page(request, template, session, run_id=run_id, **context)
        response.headers["X-Fedge-Final"] = "0" if row.run.state in ("running", "starting") else "1"
        return response

    @router.get("/runs/{run_id}")
    def run(request: Request, run_id: str) -> Response:
        return run_page(request, run_id, "run.html.j2")

    @router.get("/runs/{run_id}/live")
    def run_live(request: Request, run_id: str) -> Response:
        return run_page(request, run_id, "run_live.html.j2")

    @router.get("/sites")
    def sites(request: Request) -> Response:
        session = current(request)
        if session is None:
            return redirect("/login")
        rows, note = views.list_site_views(server)
        return page(request, "sites.html.j2", session, rows=rows, note=note)

    @router.get("/registry")
    def registry(request: Request) -> Response:
        session = current(request)
        if session is None:
            return redirect("/login")
        versions, channels, history = views.registry_view(registry_dir)
        return page(
            request,
            "registry.html.j2",
            session,
            versions=versions,
            channels=channels,
            history=history,
        )

    async def action(request: Request) -> tuple[Session, dict[str, str]] | Response:
        """The session and form of a state-changing POST, or the response refusing it."""
        session = current(request)
        if session is None:
            return redirect("/login")
        try:
            form = await read_form(request)
        except BadForm as e:
            return form_error(request, session, e)
        if not session.csrf_ok(form.get("csrf")):
            return page(
                request,
                "error.html.j2",
                session,
                403,
                message="the form expired or did not come from this console; reload the page",
            )
        return session, form

    @router.post("/registry/promote")
    async def promote(request: Request) -> Response:
        checked = await action(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        from fedge.server.registry.store import Registry

        version, channel = form.get("version", ""), form.get("channel", "").strip()
        try:
            changed = await run_in_threadpool(Registry(registry_dir).promote, version, channel)
        except FedgeError as e:
            return page(request, "error.html.j2", session, 400, message=str(e))
        log.warning("console: %s promoted %s to %s", session.user, version, channel)
        del session.flash[:-4]  # a message per action; bounded if nobody reads them
        session.flash.append(
            f"channel {channel} now serves {version}"
            if changed
            else f"channel {channel} already served {version}"
        )
        return redirect("/registry")

    @router.post("/registry/rollback")
    async def rollback(request: Request) -> Response:
        checked = await action(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        from fedge.server.registry.store import Registry

        channel = form.get("channel", "")
        try:
            old, new = await run_in_threadpool(Registry(registry_dir).rollback, channel)
        except FedgeError as e:
            return page(request, "error.html.j2", session, 400, message=str(e))
        log.warning("console: %s rolled %s back from %s to %s", session.user, channel, old, new)
        del session.flash[:-4]
        session.flash.append(f"channel {channel} rolled back from {old} to {new}")
        return redirect("/registry")

    def fleet_page(request: Request, template: str) -> Response:
        session = current(request)
        if session is None:
            if template == "fleet_live.html.j2":
                return Response("log in again", status_code=401, headers=_HEADERS)
            return redirect("/login")
        return page(request, template, session, rows=views.fleet_view(registry_dir))

    @router.get("/fleet")
    def fleet(request: Request) -> Response:
        return fleet_page(request, "fleet.html.j2")

    @router.get("/fleet/live")
    def fleet_live(request: Request) -> Response:
        return fleet_page(request, "fleet_live.html.j2")

    return router
