"""Atomic file writes, and bounded reads: a file that matters is either the old one or the new one.

Checkpoints, bundles, registries and keys go through here. The data is written
to a temporary file in the same directory, flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX), and the directory is synced so
the rename itself survives a power cut. Reading such a file back goes through
``read_json_object``, which bounds its size and refuses anything but a JSON object.
"""

import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedge.shared.errors import ConfigError, FedgeError


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry to disk, so that a rename in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root``, so that renaming ``root`` is durable."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextmanager
def atomic_path(target: Path | str, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it into place.

    For libraries that insist on writing to a path themselves (safetensors,
    onnx). On error the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``target`` atomically, with permission ``mode``."""
    with atomic_path(target, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path | str, text: str, mode: int = 0o644) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"), mode)


def atomic_write_json(target: Path | str, obj: Any, mode: int = 0o644) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def append_jsonl(target: Path | str, obj: Any) -> None:
    """Append one JSON line and flush it to disk (for per-round metrics).

    A line is written with a single ``write`` call so a crash leaves at most a
    truncated last line, which readers skip (see ``read_jsonl``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(obj, sort_keys=True) + "\n"
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Read a JSON-lines file, skipping a truncated last line."""
    path = Path(path)
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    # Undecodable bytes and lines nested past json's stack are garbage like a torn line:
    # skipped, never a crash of `fedge report` or a console page.
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError):
            continue
    return rows


def read_json_object(
    path: Path | str,
    limit: int,
    error: type[FedgeError],
    what: str,
    *,
    fmt: str | None = None,
    missing: type[FedgeError] | None = None,
    hint: str | None = None,
) -> dict[str, Any]:
    """The JSON object in the regular file ``path``, read with a size bound.

    These files may have been put there by someone else (a job folder, an answer file, a
    ledger restored from a backup): a symlink could send the reader elsewhere and a huge
    file could exhaust memory, so both are refused before anything is parsed, and at most
    ``limit + 1`` bytes are ever read (the file may grow while it is read).

    Parameters
    ----------
    path
        The file.
    limit
        The most bytes it may have.
    error
        The ``FedgeError`` subclass raised for every refusal (the caller's).
    what
        What the file is, for the messages (``"privacy ledger"``).
    fmt
        When given, the object's ``"format"`` field must equal it.
    missing
        The class raised when the file is absent or not a regular file (default ``error``):
        a wrong path is a user's mistake where a bad file may be an attack.
    hint
        The hint of the error (default: that of ``error``'s exit code).

    Raises
    ------
    FedgeError
        ``error`` (or ``missing``) when the file is absent, a symlink, not a regular file,
        over ``limit`` bytes, unreadable, not UTF-8 JSON, not an object or of another format.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise (missing or error)(f"{what} {path} does not exist or is not a regular file", hint)
    try:
        # O_NOFOLLOW and a check of what was opened: the file may be swapped for a link or a
        # FIFO after the check above (O_NONBLOCK: opening a FIFO does not wait for a writer).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            opened = os.fstat(handle.fileno())
            if not stat.S_ISREG(opened.st_mode):
                raise (missing or error)(f"{what} {path} is not a regular file", hint)
            # Read what the file holds, not ``limit`` bytes: Python allocates what it is asked.
            size = opened.st_size
            raw = handle.read(min(size, limit) + 1)
    except OSError as e:
        raise error(f"{what} {path} is unreadable ({e.strerror})", hint) from e
    if size > limit or len(raw) > limit:
        raise error(f"{what} {path} is over {limit} bytes", hint)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # nested past the stack
        raise error(f"{what} {path} is not JSON (or not UTF-8)", hint) from e
    if not isinstance(data, dict):
        raise error(f"{what} {path} is not a JSON object", hint)
    if fmt is not None and data.get("format") != fmt:
        raise error(f"{path} is not a {what} (expected format {fmt!r})", hint)
    return data


@contextmanager
def exclusive_lock(lock_path: Path | str, busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the block.

    Serialises read-modify-write of a state file between processes (two CLI commands, the
    ClientApps of one site, serving workers); the kernel drops the lock if a holder dies.
    With ``busy`` it does not wait: a held lock raises ``ConfigError(busy)`` at once (one
    agent per device folder, one federated export per run).
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError as e:
            raise ConfigError(str(busy)) from e
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
