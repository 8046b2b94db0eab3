"""Keep third-party chatter (TensorFlow/absl, torch, LiteRT, onnxruntime) out of the terminal.

Export drives converters that write to the process's file descriptors from C++
(absl's "All log messages before absl::InitializeLog()", oneDNN, "Created
TensorFlow Lite XNNPACK delegate", TorchScript graph dumps on exporter
fallback) and warn through Python logging (torch's ``KernelPreference``
deprecation). No logging level or warnings filter reaches the C++ lines (and
``TF_CPP_MIN_LOG_LEVEL`` set before import did not silence the oneDNN notice
here), so ``quiet_output`` points file descriptors 1 and 2, Python logging and
``warnings`` at a log file for the duration, and gives fedge's own output a
stream to the terminal.
"""

import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

LOG_NAME = "export.log"


def log_path_for(bundle_dir: Path) -> Path:
    """Where an export or validation of ``bundle_dir`` logs: ``export.log`` beside it."""
    return Path(bundle_dir).parent / LOG_NAME


def _uses_fd(stream: TextIO, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return False


def _reopen(fd: int, like: TextIO) -> TextIO:
    """A text stream on a duplicate of ``fd`` (the terminal), line-buffered like a tty."""
    encoding = getattr(like, "encoding", None) or "utf-8"
    raw = os.fdopen(os.dup(fd), "wb", buffering=0)
    return io.TextIOWrapper(raw, encoding=encoding, errors="replace", line_buffering=True)


@contextmanager
def quiet_output(log_path: Path, title: str = "fedge export") -> Iterator[TextIO]:
    """Send everything third-party code prints or logs to ``log_path`` (appended).

    Inside the block, file descriptors 1 and 2, and with them ``sys.stdout``,
    ``sys.stderr``, Python logging and ``warnings``, go to the log file. fedge's
    own output goes to the stream this yields: the terminal (a duplicate of the
    original descriptor 1), or ``sys.stdout`` itself when that was not the
    process's descriptor (a test runner's captured stream).

    Parameters
    ----------
    log_path
        The log file (created with its folder; a header line marks each use).
    title
        What the header line names.

    Yields
    ------
    TextIO
        Where fedge's own output goes (pass it to ``rich.console.Console(file=...)``).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with open(log_path, "a", encoding="utf-8", errors="replace", buffering=1) as log_file:
        log_file.write(f"\n===== {title} at {stamp} =====\n")
        log_file.flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        terminal = _reopen(saved[1], sys.stdout) if _uses_fd(sys.stdout, 1) else sys.stdout
        file_handler = logging.StreamHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        try:
            for fd in (1, 2):
                os.dup2(log_file.fileno(), fd)
            # Python-level records go to the file, not to the terminal's handlers.
            root.handlers = [file_handler]
            root.setLevel(logging.INFO)
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                logging.captureWarnings(True)
                try:
                    yield terminal
                finally:
                    logging.captureWarnings(False)
        finally:
            for stream in (sys.stdout, sys.stderr, terminal, log_file):
                with suppress(OSError, ValueError):  # a closed or broken stream
                    stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            if terminal is not sys.stdout:
                terminal.close()
            root.handlers = handlers
            root.setLevel(level)
