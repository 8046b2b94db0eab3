"""``fedge run``: submit a federated fine-tuning run and follow it round by round."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedge.cli.options import Insecure, ServerCa, SuperLink, TokenFile
from fedge.shared.errors import ConfigError


def _root_certificates(ca: Path | None, insecure: bool) -> Path | None:
    """The CA that signs the server's certificate: given, or the local server's."""
    if insecure:
        return None
    if ca is not None:
        if not ca.is_file():
            raise ConfigError(f"CA certificate {ca} does not exist")
        return ca
    from fedge.shared.paths import server_data_dir

    local = server_data_dir() / "tls" / "ca.crt"
    if local.is_file():
        return local
    raise ConfigError(
        "no CA certificate: pass --ca (the server operator's ca.crt), or --insecure for a "
        "server started with --insecure"
    )


def _control_token(token_file: Path | None) -> str | None:
    """The credential from ``--token-file`` or ``$FEDGE_TOKEN`` (None: none given)."""
    import os

    if token_file is not None:
        if not token_file.is_file():
            raise ConfigError(f"token file {token_file} does not exist")
        text = token_file.read_text(encoding="utf-8", errors="replace").strip()
        if not text or len(text) > 256 or not text.isascii() or any(c.isspace() for c in text):
            raise ConfigError(f"{token_file} does not hold a fedge token")
        return text
    return os.environ.get("FEDGE_TOKEN") or None


def run(
    config: Annotated[
        Path | None, typer.Option(help="Run config (TOML); see examples/run.toml.")
    ] = None,
    server: SuperLink = "127.0.0.1:9092",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run folder on the server: runs/NAME (taken from the folder the server was "
            "started in) or an absolute path in a folder the server allows."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this directory from its last checkpoint."),
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Override num-rounds.")] = None,
    ca: ServerCa = None,
    insecure: Insecure = False,
    token_file: TokenFile = None,
) -> None:
    """Submit a federated fine-tuning run to the server and stream its progress.

    Example: fedge run --config examples/run.toml --server 127.0.0.1:9092 --out runs/exp1
    """
    from fedge.server.progress import RunProgress, rounds_table
    from fedge.server.submit import submit_run
    from fedge.shared.config import RunConfig, load_run_config

    console = Console()
    if resume is not None:
        saved = resume / "run_config.json"
        if not saved.is_file():
            raise ConfigError(f"{resume} is not a run directory (no run_config.json)")
        cfg = RunConfig.from_flower(json.loads(saved.read_text()))
        # A relative path stays relative: the server takes it from its own folder.
        where = str(resume) if not resume.is_absolute() else str(resume.resolve())
        cfg = cfg.replace(resume=True, run_dir=where)
        if rounds is not None:
            cfg = cfg.replace(num_rounds=rounds)
    else:
        # A relative --out is taken from the folder the server was started in (on the
        # server's machine that is usually this one), not resolved here: a scientist's own
        # working folder means nothing on the server (fedge.server.run_paths).
        run_dir = out or Path("runs") / "latest"
        if (run_dir / "checkpoints").is_dir():
            raise ConfigError(
                f"{run_dir} already holds a run; use --resume {run_dir} or another --out"
            )
        cfg = load_run_config(config, num_rounds=rounds, run_dir=str(run_dir))
    certificates = _root_certificates(ca, insecure)
    _remember(_local_run_dir(cfg.run_dir))
    token = _control_token(token_file)
    console.print(
        f"submitting to {server}: {cfg.task} / {cfg.model} / {cfg.mode} / {cfg.strategy}, "
        f"{cfg.num_rounds} rounds -> {cfg.run_dir}"
    )
    show_eps = cfg.privacy.dp != "none"
    with RunProgress(console, cfg.num_rounds, show_eps) as progress:
        summary = submit_run(cfg, server, certificates, on_event=progress.on_event, token=token)
    console.print(rounds_table(progress.rows, show_eps))
    final = summary.get("final_accuracy")
    accuracy = "-" if final is None else f"{100 * float(final):.1f}%"
    console.print(f"final accuracy {accuracy}, model {summary.get('model_path')}")
    model_path = summary.get("model_path")
    _print_report(console, Path(model_path).parent if model_path else Path(cfg.run_dir))


def _local_run_dir(run_dir: str) -> Path:
    """Where the run's folder is when the server runs on this machine (the console's list)."""
    return Path(run_dir).resolve()


def _remember(run_dir: Path) -> None:
    """List the run in the web console when this is the server's machine."""
    from fedge.server.console.runs import remember_run
    from fedge.shared.paths import server_data_dir

    if (server_data_dir() / "server.json").is_file():
        remember_run(server_data_dir(), run_dir)


def _print_report(console: Console, run_dir: Path) -> None:
    """Write the run's HTML report when its directory is on this machine; say where."""
    from fedge.server.report.render import write_report
    from fedge.shared.errors import FedgeError

    try:
        path = write_report(run_dir)
    except (FedgeError, OSError):  # the run dir is on the server's machine, not here
        console.print(f"report: run `fedge report {run_dir}` on the server's machine")
        return
    console.print(f"report: {path.as_uri()}")
