"""The folder through which ``fedge export`` hands an artifact job to the ServerApp and back.

``fedge export --federated`` runs on the coordinator's machine and writes the job into the
run's own directory, ``<run_dir>/federated-export/``: ``job.json`` (the ``ArtifactJob``
and the payload files in message order) and the payload files. It then submits a run with
``job = "artifacts"`` and the same ``run-dir``; the ServerApp finds the job there (never
from a path a run config names freely), sends it to the sites and writes ``result.json``
beside it. Every read checks names, symlinks and sizes: the folder is on the server, but
what is in it decides what every site is asked to run.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared import federated_counts as fc
from fedge.shared.atomic import atomic_write_bytes, atomic_write_json, read_json_object
from fedge.shared.errors import ConfigError

JOB_DIR = "federated-export"
JOB_FILE = "job.json"
RESULT_FILE = "result.json"
MAX_JSON_BYTES = 4 << 20
MAX_RESULT_BYTES = 256 << 20


def job_dir(run_dir: Path | str) -> Path:
    """``<run_dir>/federated-export`` (resolved)."""
    return Path(run_dir).expanduser().resolve() / JOB_DIR


@dataclass(frozen=True)
class StagedJob:
    """A job as the ServerApp reads it: what to ask, the payload, how many sites to wait for."""

    job: fc.ArtifactJob
    payload: list[np.ndarray]
    min_sites: int


def stage_job(
    run_dir: Path | str, job: fc.ArtifactJob, files: dict[str, bytes], min_sites: int
) -> Path:
    """Write ``job`` and its payload (``files``, in message order) under ``run_dir``.

    A previous job's files and result are removed first, so a result read later is this
    job's.
    """
    folder = job_dir(run_dir)
    if folder.is_symlink():
        raise ConfigError(f"{folder} is a symbolic link; refusing to stage a job there")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_file() or old.is_symlink():
            old.unlink()
    if len(files) != job.payload_arrays:
        raise ValueError(f"the job needs {job.payload_arrays} payload files, got {len(files)}")
    for name, content in files.items():
        _check_name(name)
        atomic_write_bytes(folder / name, content)
    atomic_write_json(
        folder / JOB_FILE,
        {"job": job.to_json(), "files": list(files), "min_sites": int(min_sites)},
    )
    return folder


def read_job(run_dir: Path | str) -> StagedJob:
    """The staged job of ``run_dir``, checked (see the module docstring).

    Raises
    ------
    ConfigError
        No job is staged, or it breaks a bound.
    """
    folder = job_dir(run_dir)
    if folder.is_symlink() or not folder.is_dir():
        raise ConfigError(
            f"no federated export job is staged in {folder}",
            hint="artifact jobs are started by `fedge export RUN --federated`",
        )
    data = read_json_object(folder / JOB_FILE, MAX_JSON_BYTES, ConfigError, "artifact job file")
    try:
        job = fc.ArtifactJob.from_json(data["job"])
        names = data["files"]
        min_sites = data["min_sites"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("files must be a list of names")
        if not isinstance(min_sites, int) or isinstance(min_sites, bool):
            raise ValueError("min_sites must be an integer")
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{folder / JOB_FILE} is malformed: {e}") from e
    fc.check_sites(min_sites)
    if len(names) != job.payload_arrays:
        raise ConfigError(f"{folder / JOB_FILE}: the job needs {job.payload_arrays} files")
    payload, total = [], 0
    for name in names:
        _check_name(name)
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise ConfigError(f"{path} is missing or not a regular file")
        total += path.stat().st_size
        if total > fc.MAX_PAYLOAD_BYTES:
            raise ConfigError(f"the job's payload is over {fc.MAX_PAYLOAD_BYTES} bytes")
        payload.append(np.frombuffer(path.read_bytes(), dtype=np.uint8))
    return StagedJob(job, payload, min_sites)


def write_result(run_dir: Path | str, result: dict[str, Any]) -> Path:
    """Write the ServerApp's result of the staged job beside it (atomically)."""
    path = job_dir(run_dir) / RESULT_FILE
    atomic_write_json(path, result)
    return path


def read_result(run_dir: Path | str) -> dict[str, Any]:
    """The result the ServerApp wrote for the staged job."""
    return read_json_object(
        job_dir(run_dir) / RESULT_FILE, MAX_RESULT_BYTES, ConfigError, "artifact job result"
    )


def _check_name(name: str) -> None:
    if name in (JOB_FILE, RESULT_FILE) or not fc._safe_name(name):
        raise ConfigError(f"bad payload file name {name[:80]!r}")
