"""Console log-in sessions: random ids held in server memory, each with its own CSRF token.

The cookie carries only a random session id (256 bits); who is logged in and the
form token live here, in the serving process, so a cookie cannot be forged or
edited, and restarting the server logs everybody out. Each request checks again
that the user still holds an operator credential, so revoking it ends the session.
"""

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

COOKIE = "fedge_console"
IDLE_TIMEOUT_S = 8 * 3600.0
MAX_SESSIONS = 1000  # the oldest session is dropped past this: memory stays bounded


@dataclass
class Session:
    """One logged-in operator."""

    user: str
    csrf: str
    last_used: float
    flash: list[str] = field(default_factory=list)
    # Fingerprint of the token the operator logged in with: a re-grant (new token) ends it.
    credential: str = ""

    def csrf_ok(self, presented: str | None) -> bool:
        """Whether a form's CSRF token is this session's (constant-time, any text)."""
        if not isinstance(presented, str):
            return False
        return hmac.compare_digest(presented.encode("utf-8", "replace"), self.csrf.encode())


class SessionStore:
    """Thread-safe map of session id -> ``Session`` with idle expiry."""

    def __init__(self, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self.idle_timeout_s = idle_timeout_s

    def create(self, user: str, credential: str = "") -> tuple[str, Session]:
        """A new session for ``user`` (logged in with ``credential``'s fingerprint)."""
        sid = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), time.monotonic(), credential=credential)
        with self._lock:
            self._sessions[sid] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        """The live session of a cookie value, or None (unknown, malformed or idle too long)."""
        if not sid or len(sid) > 100:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if now - session.last_used > self.idle_timeout_s:
                del self._sessions[sid]
                return None
            session.last_used = now
            self._sessions.move_to_end(sid)
            return session

    def drop(self, sid: str | None) -> None:
        """End a session (log out)."""
        if sid:
            with self._lock:
                self._sessions.pop(sid, None)
