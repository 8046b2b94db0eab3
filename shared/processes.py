"""Start and stop the long-running processes fedge drives (SuperLink, SuperNodes, ...).

Every child runs in its own process group so that stopping it also stops what
it started (a SuperLink starts ServerApp processes, a SuperNode ClientApps).
``ProcessGroup`` stops everything it started on exit, on error and on Ctrl-C.
"""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from fedge.shared.errors import ConnectionFailed, RunError
from fedge.shared.telemetry import telemetry_environment

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error."""
    from fedge.shared.errors import ConfigError

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: telemetry off, this venv's tools on PATH.

    The SuperLink starts ``flower-superexec`` by name, so the directory of the
    running interpreter must be on PATH.
    """
    env = telemetry_environment()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    # Runtime dependency installation would run `uv sync` for every run.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def flower_tool(name: str) -> str:
    """Path of a Flower console script installed beside this interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def spawn(
    command: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session with output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or child_environment(),
            start_new_session=True,
        )


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: list[int], group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_process(proc: subprocess.Popen[bytes] | int, timeout: float = 10.0) -> None:
    """SIGTERM the process, its group and all its descendants; SIGKILL what is left.

    Descendants are collected first: Flower's SuperExec starts ServerApp processes
    that would otherwise outlive a stopped SuperLink as orphans.
    """
    pid = proc if isinstance(proc, int) else proc.pid
    descendants = _descendants(pid)
    family = [pid, *descendants]
    _signal_all(family, pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(proc) and not any(is_running(p) for p in descendants):
            break
        time.sleep(0.1)
    else:
        _signal_all(family, pid, signal.SIGKILL)
    if not isinstance(proc, int):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def is_running(proc: subprocess.Popen[bytes] | int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    if not isinstance(proc, int):
        return proc.poll() is None
    try:
        state = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(proc, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state != "Z"


def stay_attached(proc: subprocess.Popen[bytes], *companions: subprocess.Popen[bytes]) -> None:
    """Block while ``proc`` runs (``--foreground``); stop it, its companions and their
    children on the way out.

    SIGTERM (``docker stop``, systemd) ends the wait like Ctrl-C does.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        while proc.poll() is None:
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for companion in companions:
            stop_process(companion)
        stop_process(proc)


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll ``check`` until true; fail clearly if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RunError(f"{what} exited with code {proc.returncode}{_tail(log_path)}")
        time.sleep(0.2)
    raise ConnectionFailed(f"timed out after {timeout:.0f}s waiting for {what}{_tail(log_path)}")


def _tail(log_path: Path | None, lines: int = 3) -> str:
    if log_path is None or not log_path.exists():
        return ""
    text = log_path.read_text(errors="replace").strip().splitlines()[-lines:]
    return " (log " + str(log_path) + ": " + " | ".join(t.strip() for t in text) + ")"


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that ``finally`` blocks still run."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"received signal {signum}")


class ProcessGroup:
    """Processes that are stopped together when the ``with`` block ends, however it ends.

    Inside the block (in the main thread) SIGTERM raises ``Terminated``, so a
    ``kill`` of fedge stops its children too instead of orphaning them.
    """

    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._previous_handler: object = None

    def start(
        self, name: str, command: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = spawn(command, log_path, env)
        self.processes.append((name, proc))
        log.debug("started %s (pid %d)", name, proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        stop_process(proc)
        self.processes = [(n, p) for n, p in self.processes if p is not proc]

    def stop_all(self) -> None:
        # Stop in reverse start order: clients before the server they talk to.
        for name, proc in reversed(self.processes):
            stop_process(proc)
            log.debug("stopped %s", name)
        self.processes.clear()

    def __enter__(self) -> "ProcessGroup":
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop_all()
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)  # type: ignore[arg-type]
