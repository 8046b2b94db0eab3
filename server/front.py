"""The fedge front: the coordinator's public port, which lets sites reach only the Fleet API.

Flower 1.42's SuperLink serves Fleet (``/v1/fleet/*``), Control (``/v1/control/*``) and
Runtime (``/v1/runtime/*``) as protobuf-over-HTTP/1.1 on one FastAPI/uvicorn port, and
the open-source Control API checks no credential (``NoOpControlAuthnPlugin``). So
fedge binds the SuperLink to 127.0.0.1 on an internal port and puts this small
reverse proxy (Starlette on uvicorn, TLS with the server certificate, httpx streaming
upstream) on the public port:

- ``/v1/fleet/<route>``: forwarded as is; Flower's SuperNode authentication (signed
  headers, checked by the SuperLink) still applies.
- ``/v1/control/<route>``: forwarded only with ``Authorization: Bearer <token>`` of a
  user in ``operators.json`` whose role allows the route (``allowed``); the header is
  dropped before forwarding, so the token never reaches the SuperLink's logs.
- ``/health``: forwarded (container health checks).
- everything else, including the Runtime API (only the ServerApp on this machine uses
  it, on the internal port): 404.
"""

import argparse
import contextlib
import logging
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fedge.front")
FRONT_LOG = "front.log"
FRONT_PID = "front.pid"

# Routes of Flower 1.42's Fleet router (flwr/superlink/routers/fleet/router.py).
FLEET_ROUTES = frozenset(
    {
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    }
)
# What a data scientist may do: start runs, and stop, list and follow the runs they started
# (``RUN_SCOPED``, checked against ``fedge.server.run_owners``); nothing about nodes.
SCIENTIST_ROUTES = frozenset(
    {
        "start-run",
        "stop-run",
        "list-runs",
        "stream-logs",
        "stream-run-events",
        "pull-artifacts",
        "list-federations",
        "show-federation",
    }
)
# The operator additionally manages nodes and sees run series (Flower's automations, which
# carry no fedge owner). Anything else of the Control API (connectors, invitations, OIDC
# login, app store) is not something fedge uses: refused for everyone.
OPERATOR_ROUTES = SCIENTIST_ROUTES | {
    "register-node",
    "unregister-node",
    "list-nodes",
    "list-run-series",
    "get-run-series",
    "list-run-series-events",
}
# Control routes whose request names one run (``run_id``), by Flower's request message.
RUN_SCOPED = {
    "stop-run": "StopRunRequest",
    "list-runs": "ListRunsRequest",
    "stream-logs": "StreamLogsRequest",
    "stream-run-events": "StreamRunEventsRequest",
    "pull-artifacts": "PullArtifactsRequest",
}

_ROUTE = re.compile(r"/v1/(fleet|control)/([a-z][a-z-]{0,63})")
# Bounds on what one request may carry: a Fleet object holds (a chunk of) model weights,
# a start-run the app package (FAB).
MAX_FLEET_BODY = 1 << 30
MAX_CONTROL_BODY = 64 << 20
# Request headers that belong to this hop (RFC 9110 §7.6.1) or must not pass upstream.
_DROP_REQUEST = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "authorization",
        "proxy-authorization",
        "content-length",
    }
)
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade"})
# A response the front read whole (and may have changed) gets its own length and encoding.
_DROP_BUFFERED = _DROP_RESPONSE | {"content-length", "content-encoding"}


def allowed(role: str, route: str) -> bool:
    """Whether a user with ``role`` may call the Control API ``route``."""
    routes = OPERATOR_ROUTES if role == "operator" else SCIENTIST_ROUTES
    return role in ("operator", "scientist") and route in routes


@dataclass(frozen=True)
class FrontSpec:
    """Where the front listens, where the SuperLink is, and its TLS and credential files."""

    data_dir: Path
    host: str
    port: int
    upstream_port: int
    cert: Path
    key: Path
    ca_cert: Path

    def command(self) -> list[str]:
        """The command line that runs this front (``python -m fedge.server.front``)."""
        import sys

        return [
            sys.executable, "-m", "fedge.server.front",
            "--data-dir", str(self.data_dir), "--host", self.host, "--port", str(self.port),
            "--upstream-port", str(self.upstream_port), "--cert", str(self.cert),
            "--key", str(self.key), "--ca-cert", str(self.ca_cert),
        ]  # fmt: skip


def foreign_app(headers: Any, body: bytes) -> str | None:
    """Why a start-run request must not reach the SuperLink, or None if it runs fedge's app.

    The request is Flower's ``StartRunRequest`` as protobuf; its FAB must be byte for
    byte the fedge app installed on this server (``fedge.shared.ml.app_package``), and
    runs named by an app spec (apps from Flower's platform) are refused.
    """
    from flwr.proto.control_pb2 import StartRunRequest
    from google.protobuf.message import DecodeError

    from fedge.shared.ml.app_package import UntrustedApp, check_fab

    media = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/protobuf" or headers.get("content-encoding", "identity") != "identity":
        return "a start-run request must be plain application/protobuf"
    request = StartRunRequest()
    try:
        request.ParseFromString(body)
    except DecodeError:
        return "the start-run request is not a valid protobuf message"
    content = request.fab.content
    if not content:
        return "only the fedge app installed on this server may run (no app package given)"
    try:
        digest = check_fab(content)
    except UntrustedApp as e:
        return str(e)
    if request.fab.hash_str and request.fab.hash_str != digest:
        return "the start-run request names another app hash than the package it carries"
    return None


def requested_run(route: str, body: bytes) -> int | None:
    """The run a ``RUN_SCOPED`` request names (0: none, as in "list all runs").

    None when the body is not the route's protobuf message.
    """
    from flwr.proto import control_pb2
    from google.protobuf.message import DecodeError

    message = getattr(control_pb2, RUN_SCOPED[route])()
    try:
        message.ParseFromString(body)
    except DecodeError:
        return None
    return int(message.run_id)


def started_run(body: bytes) -> int | None:
    """The run id in the SuperLink's ``StartRunResponse`` (None if there is none)."""
    from flwr.proto.control_pb2 import StartRunResponse
    from google.protobuf.message import DecodeError

    response = StartRunResponse()
    try:
        response.ParseFromString(body)
    except DecodeError:
        return None
    return int(response.run_id) or None


def only_runs_of(body: bytes, owned: set[int]) -> bytes | None:
    """A ``ListRunsResponse`` with only the runs in ``owned`` (None if it does not parse)."""
    from flwr.proto.control_pb2 import ListRunsResponse
    from google.protobuf.message import DecodeError

    response = ListRunsResponse()
    try:
        response.ParseFromString(body)
    except DecodeError:
        return None
    for run_id in [r for r in response.run_dict if r not in owned]:
        del response.run_dict[run_id]
    return response.SerializeToString()


def _bearer(headers: Any) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def create_app(data_dir: Path, upstream: str, ca_cert: Path | None, transport: Any = None) -> Any:
    """The front's ASGI app, forwarding allowed requests to ``upstream`` (``https://...``).

    ``transport`` replaces the network (an ``httpx`` transport; tests), ``ca_cert`` then
    may be None.
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from fedge.server.operators import authenticate
    from fedge.server.run_owners import RunOwners

    owners = RunOwners(data_dir)
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
    # Long polls and log streams: no read timeout on the upstream side.
    client = httpx.AsyncClient(
        base_url=upstream,
        verify=context,
        timeout=httpx.Timeout(30.0, read=None),
        transport=transport,
    )

    def refuse(status: int, text: str) -> Response:
        return PlainTextResponse(text + "\n", status_code=status)

    async def forward(request: Request, limit: int, content: bytes | None = None) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return refuse(413, "request body too large")

        async def body() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise ValueError("request body too large")
                yield chunk

        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
        upstream_request = client.build_request(
            request.method,
            request.url.path,
            params=request.url.query or None,
            headers=headers,
            content=content
            if content is not None
            else (body() if request.method not in ("GET", "HEAD") else None),
        )
        try:
            response = await client.send(upstream_request, stream=True)
        except ValueError:
            return refuse(413, "request body too large")
        except httpx.HTTPError as e:
            log.warning("SuperLink unreachable: %s", type(e).__name__)
            return refuse(503, "the SuperLink behind this front is not reachable")
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _DROP_RESPONSE}
        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            headers=out_headers,
            background=BackgroundTask(response.aclose),
        )

    async def read_body(request: Request, limit: int) -> bytes | None:
        """The whole request body, or None past ``limit`` (declared or sent)."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return None
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return None
        return body

    async def exchange(request: Request, body: bytes) -> Response:
        """Forward a small control request and read the SuperLink's whole answer."""
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
        try:
            answer = await client.request(
                request.method,
                request.url.path,
                params=request.url.query or None,
                headers=headers,
                content=body,
            )
        except httpx.HTTPError as e:
            log.warning("SuperLink unreachable: %s", type(e).__name__)
            return refuse(503, "the SuperLink behind this front is not reachable")
        out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in _DROP_BUFFERED}
        return Response(answer.content, answer.status_code, headers=out_headers)

    async def dispatch(request: Request) -> Response:
        path = request.url.path
        if path == "/health" and request.method in ("GET", "HEAD"):
            return await forward(request, 0)
        match = _ROUTE.fullmatch(path)
        if match is None or request.method != "POST":
            return refuse(404, "not found")
        api, route = match.groups()
        if api == "fleet":
            if route not in FLEET_ROUTES:
                return refuse(404, "not found")
            return await forward(request, MAX_FLEET_BODY)
        token = _bearer(request.headers)
        # The credential file is read on every request (a revoke-user counts at once): in a
        # worker thread, so that a slow disk never stalls the Fleet traffic on this loop.
        user = await run_in_threadpool(authenticate, data_dir, token) if token else None
        if user is None:
            log.warning("refused control route %s: no valid credential", route)
            # No "WWW-Authenticate: Bearer": flwr's CLI would answer it with a token refresh.
            return refuse(401, "the control API needs a fedge operator credential")
        if not allowed(user.role, route):
            log.warning("refused control route %s to %s (%s)", route, user.name, user.role)
            return refuse(403, f"{user.role} {user.name!r} may not call {route}")
        log.info("control %s by %s (%s)", route, user.name, user.role)
        if route == "start-run":
            body = await read_body(request, MAX_CONTROL_BODY)
            if body is None:
                return refuse(413, "request body too large")
            # The SuperLink would install the run's app package and import its ServerApp
            # in the coordinator's own account: only the fedge app installed here may run.
            reason = await run_in_threadpool(foreign_app, request.headers, body)
            if reason is not None:
                log.warning("refused a run of %s (%s): %s", user.name, user.role, reason)
                return refuse(403, reason)
            answer = await exchange(request, body)
            if answer.status_code == 200:
                run_id = started_run(bytes(answer.body))
                if run_id is not None:
                    await run_in_threadpool(owners.record, run_id, user.name)
            return answer
        if user.role != "operator" and route in RUN_SCOPED:
            body = await read_body(request, MAX_CONTROL_BODY)
            if body is None:
                return refuse(413, "request body too large")
            run_id = requested_run(route, body)
            if run_id is None:
                return refuse(400, f"not a valid {route} request")
            if route == "list-runs" and run_id == 0:
                answer = await exchange(request, body)
                if answer.status_code != 200:
                    return answer
                mine = only_runs_of(bytes(answer.body), owners.owned_by(user.name))
                if mine is None:
                    return refuse(502, "the SuperLink's run list did not parse")
                return Response(mine, 200, media_type=answer.headers.get("content-type"))
            if owners.owner(run_id) != user.name:
                log.warning("refused %s of run %d to %s: not theirs", route, run_id, user.name)
                return refuse(403, f"{user.role} {user.name!r} may {route} only runs they started")
            return await forward(request, MAX_CONTROL_BODY, content=body)
        return await forward(request, MAX_CONTROL_BODY)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
    return Starlette(
        routes=[Route("/{path:path}", dispatch, methods=methods)],
        lifespan=lifespan,
    )


def start_front(
    spec: FrontSpec, group: Any = None, timeout: float = 30.0
) -> "subprocess.Popen[bytes]":
    """Start the front in the background and wait until its port answers.

    Parameters
    ----------
    spec
        Where it listens and what it protects.
    group
        A ``ProcessGroup`` to own the process (tests, demo); None for a detached server.
    """
    from fedge.shared.atomic import atomic_write_text
    from fedge.shared.errors import ConfigError
    from fedge.shared.processes import child_environment, port_open, spawn, wait_until

    connect = "127.0.0.1" if spec.host in ("0.0.0.0", "::", "") else spec.host
    if port_open(connect, spec.port):
        raise ConfigError(f"port {spec.port} is already in use; choose another with --port")
    log_path = spec.data_dir / FRONT_LOG
    env = child_environment()
    command = spec.command()
    proc = group.start("front", command, log_path, env) if group else spawn(command, log_path, env)
    atomic_write_text(spec.data_dir / FRONT_PID, f"{proc.pid}\n")
    wait_until(
        lambda: port_open(connect, spec.port), timeout, f"the front on port {spec.port}", proc,
        log_path,
    )  # fmt: skip
    return proc


def stop_front(data_dir: Path) -> bool:
    """Stop the front whose pid file is in ``data_dir``; False if none was running."""
    from fedge.shared.processes import is_running, stop_process

    pid_file = data_dir / FRONT_PID
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        pid = 0
    running = pid > 0 and is_running(pid)
    if running:
        stop_process(pid)
    pid_file.unlink(missing_ok=True)
    return running


def serve(spec: FrontSpec) -> None:
    """Run the front until it is stopped (blocking)."""
    import uvicorn

    app = create_app(spec.data_dir, f"https://127.0.0.1:{spec.upstream_port}", spec.ca_cert)
    uvicorn.run(
        app,
        host=spec.host,
        port=spec.port,
        ssl_certfile=str(spec.cert),
        ssl_keyfile=str(spec.key),
        log_level="warning",
        access_log=False,  # never log paths with query strings or client addresses by default
        limit_concurrency=512,
        timeout_keep_alive=30,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m fedge.server.front``: the process ``fedge server start`` runs."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca-cert", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(
        FrontSpec(
            args.data_dir,
            args.host,
            args.port,
            args.upstream_port,
            args.cert,
            args.key,
            args.ca_cert,
        )
    )


if __name__ == "__main__":
    main()
