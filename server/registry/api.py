"""The registry's HTTPS API for edge devices: current version, bundle download, status reports.

Every endpoint except ``/healthz`` needs a device's bearer token. Operator actions
(publish, promote, rollback, enrollment) are deliberately not on the API: the CLI
writes the registry's SQLite directly on the server machine, so there is no
operator credential to leak and no extra attack surface.
"""

import json
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, TypeAdapter

from fedge.server.registry.devices import Device, DeviceRevoked, DeviceStore, DeviceUnknown
from fedge.server.registry.store import Registry
from fedge.shared.errors import ConfigError, RegistryError, SecurityError
from fedge.shared.fleet_protocol import (
    API_PREFIX,
    CurrentVersion,
    ProtocolError,
    StatusReport,
    bundle_download_path,
    is_channel,
    is_version,
    parse_json,
)

log = logging.getLogger(__name__)

# No device message is anywhere near this; a larger body is refused before it is read.
MAX_BODY_BYTES = 64 << 10

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class DeviceInfo(BaseModel):
    """Who the server thinks the caller is."""

    name: str
    created_at: str
    channels: list[str]


async def _answer(
    send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode("utf-8")
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Authenticate ``/v1/*`` from the headers and bound the body, before any routing or parsing.

    FastAPI reads and validates a body before it runs dependencies, so a token check in
    a dependency comes too late: an anonymous caller could make the server hold and parse
    any amount of data. Here the token is checked first, then at most ``max_body`` bytes
    are read (``Content-Length`` and the bytes actually streamed), then the app runs.
    """

    def __init__(self, app: ASGIApp, devices: DeviceStore, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.devices = devices
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            await _answer(send, 413, f"request body over {self.max_body} bytes")
            return
        if str(scope["path"]).startswith(API_PREFIX + "/"):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
            try:
                device = await anyio.to_thread.run_sync(self.devices.authenticate, token or None)
            except DeviceUnknown as e:
                await _answer(send, 401, str(e), {"WWW-Authenticate": "Bearer"})
                return
            except DeviceRevoked as e:
                await _answer(send, 403, str(e))
                return
            scope.setdefault("state", {})["device"] = device
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body"))
            if len(body) > self.max_body:
                await _answer(send, 413, f"request body over {self.max_body} bytes")
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(data_dir: Path | str) -> FastAPI:
    """The FastAPI app over the registry at ``data_dir`` (OpenAPI at ``/openapi.json``).

    Parameters
    ----------
    data_dir
        The registry's data directory (the one ``fedge registry`` commands use).
    """
    from fedge import __version__

    registry = Registry(data_dir)
    devices = DeviceStore(data_dir)
    bearer = HTTPBearer(auto_error=False, description="the device token from `device add`")
    app = FastAPI(
        title="fedge registry",
        version=__version__,
        description="Signed model bundles for enrolled edge devices.",
    )
    app.add_middleware(GuardMiddleware, devices=devices)

    def authenticated(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Device:
        # GuardMiddleware authenticated the caller already; `bearer` documents the scheme.
        device = getattr(request.state, "device", None)
        if not isinstance(device, Device):
            raise HTTPException(
                401, "no device token given", headers={"WWW-Authenticate": "Bearer"}
            )
        return device

    DeviceDep = Annotated[Device, Depends(authenticated)]
    status_schema = TypeAdapter(StatusReport).json_schema()

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        """Liveness of the registry service (no authentication)."""
        return {"status": "ok"}

    @app.get(f"{API_PREFIX}/devices/me", tags=["device"])
    def whoami(device: DeviceDep) -> DeviceInfo:
        """The calling device's enrollment."""
        return DeviceInfo(
            name=device.name, created_at=device.created_at, channels=list(device.channels)
        )

    @app.get(
        f"{API_PREFIX}/channels/{{channel}}/current",
        tags=["device"],
        response_model=CurrentVersion,
        responses={403: {"description": "not a channel this device may follow"}, 404: {}},
    )
    def current(channel: str, device: DeviceDep) -> CurrentVersion:
        """The version ``channel`` points at now, with the operator's signed statement."""
        if not is_channel(channel):
            raise HTTPException(404, "no such channel")
        if channel not in device.channels:
            raise HTTPException(403, f"device {device.name!r} may not follow channel {channel!r}")
        version = registry.current(channel)
        if version is None:
            raise HTTPException(404, f"channel {channel!r} has no version yet")
        record = registry.get_version(version)
        signed = registry.statement(channel)
        return CurrentVersion(
            channel=channel,
            version=record.version,
            bundle_id=record.bundle_id,
            tar_sha256=record.tar_sha256,
            tar_size=record.tar_size,
            download_path=bundle_download_path(record.version),
            statement=None if signed is None else signed.statement,
            signature=None if signed is None else signed.signature,
        )

    @app.get(
        f"{API_PREFIX}/bundles/{{version}}/bundle.tar",
        tags=["device"],
        response_class=FileResponse,
        responses={200: {"content": {"application/x-tar": {}}}, 403: {}, 404: {}},
    )
    def download(version: str, device: DeviceDep) -> FileResponse:
        """The bundle of ``version`` as an uncompressed tar (only versions of its channels)."""
        if not is_version(version):
            raise HTTPException(404, "no such version")
        try:
            registry.get_version(version)
            path = registry.tar_path(version)
        except RegistryError as e:
            raise HTTPException(404, str(e)) from e
        if version not in registry.versions_seen_by(device.channels):
            raise HTTPException(
                403, f"version {version!r} was never on a channel device {device.name!r} follows"
            )
        return FileResponse(path, media_type="application/x-tar", filename=f"{version}.tar")

    @app.post(
        f"{API_PREFIX}/devices/me/status",
        tags=["device"],
        status_code=204,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": status_schema}},
            }
        },
        responses={413: {"description": "body too large"}, 422: {"description": "invalid"}},
    )
    async def report(request: Request, device: DeviceDep) -> None:
        """Record the calling device's status (active version, health, latency, last error)."""
        try:
            status = StatusReport.from_dict(parse_json(await request.body(), "status report"))
        except ProtocolError as e:
            raise HTTPException(422, str(e)) from e
        if status.channel not in device.channels:
            raise HTTPException(422, f"device {device.name!r} does not follow {status.channel!r}")
        try:
            await anyio.to_thread.run_sync(devices.record_status, device.name, status)
        except RegistryError as e:
            raise HTTPException(422, str(e)) from e

    from fedge.server.console.routes import mount_console

    mount_console(app, data_dir)  # the operators' web console under /console (own log-in)
    return app


def resolve_tls(
    tls_cert: Path | None, tls_key: Path | None, insecure: bool
) -> tuple[Path, Path] | None:
    """The certificate and key to serve with; the server's own CA-issued pair by default.

    Raises
    ------
    ConfigError
        Only one of the two files given, or none given and none found, without ``insecure``.
    """
    if insecure:
        log.warning("registry API without TLS: device tokens and bundles travel in clear text")
        return None
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key, or neither")
    if tls_cert is None or tls_key is None:
        from fedge.shared.paths import server_data_dir
        from fedge.shared.tls import SERVER_CERT_NAME, SERVER_KEY_NAME

        tls_dir = server_data_dir() / "tls"
        tls_cert, tls_key = tls_dir / SERVER_CERT_NAME, tls_dir / SERVER_KEY_NAME
        if not (tls_cert.exists() and tls_key.exists()):
            raise ConfigError(
                f"no TLS certificate given and none in {tls_dir}",
                hint="pass --tls-cert/--tls-key, run `fedge server start` once to create the "
                "server's CA and certificate, or (testing only) --insecure",
            )
    for path in (tls_cert, tls_key):
        if not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    import ssl

    try:  # what uvicorn will do; its ssl.SSLError would otherwise end in a traceback
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls_cert, tls_key)
    except (ssl.SSLError, OSError) as e:
        raise SecurityError(
            f"cannot use {tls_cert} with {tls_key} for TLS: not a PEM certificate and its "
            f"private key ({e.__class__.__name__})"
        ) from e
    return tls_cert, tls_key


def run_registry_server(
    data_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 9443,
    tls: tuple[Path, Path] | None = None,
) -> None:
    """Serve the registry API until interrupted (blocking; uvicorn, one process)."""
    import uvicorn

    from fedge.shared.listen import check_listen_address

    check_listen_address(host, port)

    options: dict[str, Any] = {"host": host, "port": port, "log_level": "warning"}
    if tls is not None:
        options.update(ssl_certfile=str(tls[0]), ssl_keyfile=str(tls[1]))
    uvicorn.run(create_app(data_dir), **options)


def registry_command(
    data_dir: Path | str,
    host: str,
    port: int,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> list[str]:
    """The command line that serves the registry API in its own process."""
    command = [
        sys.executable,
        "-m",
        "fedge.server.registry.api",
        "--data-dir",
        str(data_dir),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if tls_cert is not None and tls_key is not None:
        command += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
    return command


def start_registry_server(
    data_dir: Path | str,
    host: str,
    port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    log_path: Path | None = None,
) -> "subprocess.Popen[bytes]":
    """Start the registry API as a child process (its own process group); returns the handle.

    Stop it with ``fedge.shared.processes.stop_process``. Without ``tls_cert``/``tls_key``
    it serves plain HTTP (``--insecure``). Output goes to ``log_path``
    (default ``DATA_DIR/registry-api.log``).
    """
    from fedge.shared.processes import spawn

    log_path = log_path or Path(data_dir) / "registry-api.log"
    return spawn(registry_command(data_dir, host, port, tls_cert, tls_key), log_path)


def main(argv: list[str] | None = None) -> None:
    """Process entry of ``start_registry_server``: serve ``--data-dir`` until terminated."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    args = parser.parse_args(argv)
    tls = (args.tls_cert, args.tls_key) if args.tls_cert and args.tls_key else None
    if tls is None:
        log.warning("registry API without TLS: device tokens and bundles travel in clear text")
    run_registry_server(args.data_dir, args.host, args.port, tls)


if __name__ == "__main__":
    main()
