"""The registry's HTTPS API for edge devices: current version, bundle download, status reports.

Every endpoint except ``/healthz`` needs a device's bearer token. Operator actions
(publish, promote, rollback, enrollment) are deliberately not on the API: the CLI
writes the registry's SQLite directly on the server machine, so there is no
operator credential to leak and no extra attack surface.
"""

import logging
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from fedge.server.registry.devices import (
    Device,
    DeviceRevoked,
    DeviceStore,
    DeviceUnknown,
    StatusReport,
)
from fedge.server.registry.store import Registry
from fedge.shared.errors import ConfigError, RegistryError

log = logging.getLogger(__name__)

API_PREFIX = "/v1"


class CurrentVersion(BaseModel):
    """The version a channel points at, and how to fetch and check it."""

    channel: str
    version: str
    bundle_id: str
    tar_sha256: str = Field(description="sha256 of the tar; the signature is still checked")
    tar_size: int
    download_path: str


class StatusBody(BaseModel):
    """A device's report, sent on every poll."""

    channel: str = Field(max_length=64)
    active_version: str | None = Field(default=None, max_length=128)
    health: Literal["ok", "degraded", "failed", "no-model"]
    latency_p50_ms: float | None = Field(default=None, ge=0)
    latency_p99_ms: float | None = Field(default=None, ge=0)
    last_error: str | None = Field(default=None, max_length=2000)
    detail: dict[str, str | int | float | bool | None] | None = Field(
        default=None, description="small key/value facts (agent version, runtime, events)"
    )


class DeviceInfo(BaseModel):
    """Who the server thinks the caller is."""

    name: str
    created_at: str


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

    def authenticated(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Device:
        try:
            return devices.authenticate(None if creds is None else creds.credentials)
        except DeviceUnknown as e:
            raise HTTPException(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from e
        except DeviceRevoked as e:
            raise HTTPException(403, str(e)) from e

    DeviceDep = Annotated[Device, Depends(authenticated)]

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        """Liveness of the registry service (no authentication)."""
        return {"status": "ok"}

    @app.get(f"{API_PREFIX}/devices/me", tags=["device"])
    def whoami(device: DeviceDep) -> DeviceInfo:
        """The calling device's enrollment."""
        return DeviceInfo(name=device.name, created_at=device.created_at)

    @app.get(
        f"{API_PREFIX}/channels/{{channel}}/current",
        tags=["device"],
        responses={404: {"description": "the channel has no version"}},
    )
    def current(channel: str, device: DeviceDep) -> CurrentVersion:
        """The version ``channel`` points at now."""
        version = registry.current(channel)
        if version is None:
            raise HTTPException(404, f"channel {channel!r} has no version yet")
        record = registry.get_version(version)
        return CurrentVersion(
            channel=channel,
            version=record.version,
            bundle_id=record.bundle_id,
            tar_sha256=record.tar_sha256,
            tar_size=record.tar_size,
            download_path=f"{API_PREFIX}/bundles/{record.version}/bundle.tar",
        )

    @app.get(
        f"{API_PREFIX}/bundles/{{version}}/bundle.tar",
        tags=["device"],
        response_class=FileResponse,
        responses={200: {"content": {"application/x-tar": {}}}, 404: {}},
    )
    def download(version: str, device: DeviceDep) -> FileResponse:
        """The bundle of ``version`` as an uncompressed tar."""
        try:
            registry.get_version(version)
            path = registry.tar_path(version)
        except RegistryError as e:
            raise HTTPException(404, str(e)) from e
        return FileResponse(path, media_type="application/x-tar", filename=f"{version}.tar")

    @app.post(f"{API_PREFIX}/devices/me/status", tags=["device"], status_code=204)
    def report(body: StatusBody, device: DeviceDep) -> None:
        """Record the calling device's status (active version, health, latency, last error)."""
        try:
            devices.record_status(device.name, StatusReport(**body.model_dump()))
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
    return tls_cert, tls_key


def run_registry_server(
    data_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 9443,
    tls: tuple[Path, Path] | None = None,
) -> None:
    """Serve the registry API until interrupted (blocking; uvicorn, one process)."""
    import uvicorn

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
