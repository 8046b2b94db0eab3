"""``fedge edge agent``, ``agent-clear-refusal``, ``serve``: thin typer commands on a device.

``register(app)`` adds them to the ``fedge edge`` typer app. Torch-free: the
heavy imports (onnxruntime via the runtime, uvicorn) happen inside the commands.
"""

import logging
import os
import stat
from pathlib import Path
from typing import Annotated

import typer

from fedge.cli.options import TrustedKey
from fedge.cli.options import trusted_key_or_default as _trusted_key

log = logging.getLogger(__name__)


def read_token(token: str | None, token_file: Path | None) -> str:
    """The device token from ``--token``/``$FEDGE_DEVICE_TOKEN`` or ``--token-file``.

    Raises
    ------
    ConfigError
        Neither or both given, or an unreadable/empty token file.
    """
    from fedge.shared.errors import ConfigError

    if (token is None) == (token_file is None):
        raise ConfigError("give the device token with exactly one of --token or --token-file")
    if token is not None:
        return token.strip()
    assert token_file is not None
    try:
        text = token_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"cannot read token file {token_file}: {e.strerror}") from e
    if not text:
        raise ConfigError(f"token file {token_file} is empty")
    if stat.S_IMODE(os.stat(token_file).st_mode) & 0o077:
        log.warning("token file %s is readable by other users; chmod 600 it", token_file)
    return text


def agent(
    server: Annotated[str, typer.Option(help="Registry URL, e.g. https://server:9443.")],
    dir: Annotated[Path, typer.Option("--dir", help="Where versions and `current` live.")],
    channel: Annotated[str, typer.Option(help="Channel to follow.")] = "stable",
    token: Annotated[
        str | None,
        typer.Option(envvar="FEDGE_DEVICE_TOKEN", help="Device token (prefer --token-file)."),
    ] = None,
    token_file: Annotated[Path | None, typer.Option(help="File holding the device token.")] = None,
    key: TrustedKey = None,
    ca: Annotated[Path | None, typer.Option(help="CA certificate to trust for the server.")] = None,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between polls.")] = 10.0,
    once: Annotated[bool, typer.Option("--once", help="Poll once and exit.")] = False,
    task: Annotated[
        str | None, typer.Option(help="Task this device serves (default: the active bundle's).")
    ] = None,
    allow_task_change: Annotated[
        bool, typer.Option(help="Accept a bundle for another task than the one served.")
    ] = False,
) -> None:
    """Keep DIR on the channel's version: download, verify, self-test, activate, roll back."""
    from rich.console import Console

    from fedge.edge.device.agent import AgentConfig, AgentResult, run_agent, run_agent_once
    from fedge.shared.errors import BundleError, ConnectionFailed

    console = Console()
    config = AgentConfig(
        server,
        channel,
        dir,
        read_token(token, token_file),
        _trusted_key(key),
        ca,
        interval,
        task=task,
        allow_task_change=allow_task_change,
    )

    last: list[tuple[str, str | None, str | None]] = []

    def show(result: AgentResult) -> None:
        # A quiet loop: one line per change, not one per poll.
        now = (result.action, result.active_version, result.error)
        if last and last[-1] == now:
            return
        last[:] = [now]
        colour = {"activated": "green", "up-to-date": "green", "no-version": "yellow"}
        style = colour.get(result.action, "red")
        line = f"[{style}]{result.action}[/] active={result.active_version or '-'}"
        line += f" wanted={result.wanted_version or '-'} health={result.health}"
        console.print(line + (f" error: {result.error}" if result.error else ""))

    if not once:
        console.print(
            f"agent polling {server} every {interval:g}s (channel {channel}); Ctrl-C stops"
        )
        run_agent(config, on_result=show)
        return
    result = run_agent_once(config)
    show(result)
    if result.action == "unreachable":
        raise ConnectionFailed(result.error or "registry unreachable")
    if result.action in ("refused", "rolled-back", "bad-answer"):
        raise BundleError(result.error or f"version {result.wanted_version} refused")


def agent_clear_refusal(
    dir: Annotated[Path, typer.Option("--dir", help="The agent's directory.")],
    version: Annotated[
        str | None, typer.Argument(help="Version to try again (default: --all).")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Forget every refusal.")] = False,
) -> None:
    """Forget that the agent refused a version, so that its next poll tries it again."""
    from rich.console import Console

    from fedge.edge.device.activation import AgentDir
    from fedge.shared.errors import ConfigError

    if (version is None) != all_:
        raise ConfigError("name one VERSION or pass --all")
    agent_dir = AgentDir(dir)
    with agent_dir.exclusive():
        cleared = agent_dir.clear_refusals(version)
    Console().print(f"cleared refusals: {', '.join(cleared) or 'none'}")


def serve(
    bundle: Annotated[Path | None, typer.Argument(help="Bundle directory to serve.")] = None,
    agent_dir: Annotated[
        Path | None, typer.Option(help="Serve the agent's `current` version and follow it.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8080,
    key: TrustedKey = None,
    format: Annotated[str | None, typer.Option(help="Artifact format: onnx or tflite.")] = None,
    precision: Annotated[str | None, typer.Option(help="Artifact precision: fp32 or int8.")] = None,
    max_body_mb: Annotated[float, typer.Option(min=0.01, help="Largest request body.")] = 8.0,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="Runtime threads per worker (default: cores / workers)."),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, help="Worker processes; 0 = one per CPU core.")
    ] = 0,
    select: Annotated[
        str, typer.Option(help="Artifact choice: fastest (measured here) or smallest.")
    ] = "fastest",
    artifact: Annotated[
        str | None, typer.Option(help="Serve exactly this artifact file (no measuring).")
    ] = None,
    batching: Annotated[
        bool, typer.Option(help="Run concurrent requests as one batch (dynamic-batch artifacts).")
    ] = True,
    batch_delay_ms: Annotated[
        float, typer.Option(min=0.0, help="Longest wait for requests to fill a micro-batch.")
    ] = 2.0,
) -> None:
    """Serve POST /predict, GET /healthz and GET /metrics for a bundle or the agent's model."""
    from rich.console import Console

    from fedge.edge.device.serve import ServeConfig, body_limit_bytes, run_server
    from fedge.shared.listen import check_listen_address

    config = ServeConfig(
        trusted_key=_trusted_key(key),
        bundle=bundle,
        agent_dir=agent_dir,
        format=format,
        precision=precision,
        max_body_bytes=body_limit_bytes(max_body_mb),
        threads=threads,
        workers=workers,
        select=select,
        artifact=artifact,
        batching=batching,
        batch_delay_ms=batch_delay_ms,
    )
    from fedge.shared.errors import ConfigError

    check_listen_address(host, port)
    if (bundle is None) == (agent_dir is None):
        raise ConfigError("serve either a BUNDLE or --agent-dir DIR (exactly one)")
    if select not in ("fastest", "smallest"):
        raise ConfigError(f"--select {select!r}: use fastest or smallest")
    if host not in ("127.0.0.1", "localhost", "::1"):
        Console().print(f"[yellow]serving on {host}: anyone who can reach it can predict[/]")
    Console().print(
        f"serving on http://{host}:{port} "
        "(POST /predict, GET /healthz, GET /metrics, GET /openapi.json)"
    )
    run_server(config, host, port)


def register(app: typer.Typer) -> None:
    """Add ``agent``, ``agent-clear-refusal`` and ``serve`` to the ``fedge edge`` typer app."""
    app.command("agent")(agent)
    app.command("agent-clear-refusal")(agent_clear_refusal)
    app.command("serve")(serve)
