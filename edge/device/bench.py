"""Benchmark every artifact of a bundle side by side on this device.

Each artifact runs in a fresh worker process (``python -m fedge.edge.device.bench``)
so that its memory is measured honestly: the worker's peak RSS (``VmHWM``) after
loading and running the model, minus its RSS just before the runtime was imported
(the peak mark is reset there, so import-time spikes of fedge itself do not
count). Latency is measured at batch 1 with a monotonic clock, throughput at a
moderate batch; accuracy is the label agreement on the bundle's self-test inputs.
"""

import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared.bundle import self_test_inputs, verify_bundle
from fedge.shared.errors import BundleError
from fedge.shared.telemetry import telemetry_environment

WORKER_TIMEOUT_S = 900


@dataclass(frozen=True)
class BenchRow:
    """Measurements of one artifact (``error`` set when it could not be measured)."""

    file: str
    format: str
    precision: str
    quantization: str
    size_bytes: int
    load_ms: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    throughput: float = float("nan")  # inputs per second at ``batch``
    batch: int = 0
    rss_delta_mb: float = float("nan")
    peak_rss_mb: float = float("nan")
    self_test_passed: bool | None = None
    max_abs_diff: float = float("nan")
    label_agreement: float = float("nan")
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready data; measurements that were not made are ``None``."""
        return {k: None if v != v else v for k, v in asdict(self).items()}  # NaN != NaN


def _status_mb(field: str) -> float | None:
    """A ``VmXXX`` line of ``/proc/self/status`` in MiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    """Peak resident set size of this process image.

    ``VmHWM`` on Linux: ``ru_maxrss`` survives fork+exec, so a worker started by a
    big parent (an exporter with torch loaded) would report the parent's peak.
    """
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1 << 20) if sys.platform == "darwin" else maxrss / 1024


def _rss_baseline_mb() -> float:
    """Current RSS, with the peak mark reset to it where Linux allows (clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        current = _status_mb("VmRSS")
        if current is not None:
            return current
    except OSError:
        pass
    return _peak_rss_mb()  # no reset possible: a conservative (lower) delta


def _measure(
    bundle_dir: Path, key: Path, file: str, warmup: int, iterations: int, batch: int
) -> dict[str, Any]:
    """Worker body: open one artifact, time it, return the numbers."""
    from fedge.edge.device.runtime import EdgeModel

    baseline = _rss_baseline_mb()
    model = EdgeModel.open(bundle_dir, key, artifact=file)
    manifest = model.manifest
    if manifest.self_test:
        inputs = self_test_inputs(manifest)
    else:
        shape = [d if d > 0 else 1 for d in manifest.inputs[0].shape]
        inputs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    one = np.ascontiguousarray(inputs[:1])
    for _ in range(warmup):
        model.predict_tensor(one)
    latencies = np.empty(iterations, dtype=np.float64)
    for i in range(iterations):
        start = time.perf_counter_ns()
        model.predict_tensor(one)
        latencies[i] = (time.perf_counter_ns() - start) / 1e6
    many = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])))
    model.predict_tensor(many)  # first call at a new batch size may allocate
    reps = max(3, iterations // 10)
    batch_start = time.perf_counter()
    for _ in range(reps):
        model.predict_tensor(many)
    throughput = batch * reps / (time.perf_counter() - batch_start)
    result = model.self_test() if manifest.self_test else None
    return {
        "load_ms": model.load_seconds * 1e3,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "throughput": throughput,
        "batch": batch,
        "rss_delta_mb": _peak_rss_mb() - baseline,
        "peak_rss_mb": _peak_rss_mb(),
        "self_test_passed": None if result is None else result.passed,
        "max_abs_diff": float("nan") if result is None else result.max_abs_diff,
        "label_agreement": float("nan") if result is None else result.label_agreement,
    }


def _run_worker(
    bundle_dir: Path, key: Path, file: str, warmup: int, iterations: int, batch: int
) -> dict[str, Any]:
    """Run ``_measure`` in a fresh interpreter; a failure becomes ``{"error": ...}``."""
    args = {
        "bundle": str(bundle_dir),
        "key": str(key),
        "file": file,
        "warmup": warmup,
        "iterations": iterations,
        "batch": batch,
    }
    command = [sys.executable, "-m", "fedge.edge.device.bench", json.dumps(args)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_S,
            env=telemetry_environment(),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["worker failed"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1])


def bench_bundle(
    bundle_dir: Path | str,
    trusted_key: Path | str,
    warmup: int = 10,
    iterations: int = 100,
    batch: int = 32,
    progress: bool = True,
    artifacts: Sequence[str] | None = None,
) -> list[BenchRow]:
    """Measure every artifact in a verified bundle, one fresh process each.

    Parameters
    ----------
    bundle_dir, trusted_key
        The bundle and the public key this device trusts.
    warmup, iterations
        Untimed and timed batch-1 runs per artifact.
    batch
        Batch size of the throughput measurement.
    progress
        Show a progress bar on stderr.
    artifacts
        Only these artifact files (default: all).

    Returns
    -------
    list[BenchRow]
        One row per artifact, in manifest order; failed ones carry ``error``.

    Raises
    ------
    BundleError
        The bundle fails verification (nothing is run).
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if iterations < 1 or warmup < 0 or batch < 1:
        raise BundleError("iterations and batch must be >= 1 and warmup >= 0")
    bundle_dir, trusted_key = Path(bundle_dir), Path(trusted_key)
    manifest = verify_bundle(bundle_dir, trusted_key)
    entries = [a for a in manifest.artifacts if artifacts is None or a.file in artifacts]
    rows: list[BenchRow] = []
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("benchmarking", total=len(entries))
        for entry in entries:
            bar.update(task, description=f"benchmarking {Path(entry.file).name}")
            measured = _run_worker(bundle_dir, trusted_key, entry.file, warmup, iterations, batch)
            rows.append(
                BenchRow(
                    entry.file,
                    entry.format,
                    entry.precision,
                    entry.quantization,
                    entry.size,
                    **measured,
                )
            )
            bar.advance(task)
    return rows


def _fmt(value: float, spec: str) -> str:
    return "–" if value != value else format(value, spec)  # NaN -> dash


def render_bench_table(rows: Sequence[BenchRow]) -> Any:
    """A rich ``Table`` with one row per artifact."""
    from rich.table import Table

    table = Table(
        title="fedge edge bench",
        caption="latency at batch 1; memory = peak RSS growth of a fresh process (runtime+model)",
    )
    for name in (
        "artifact",
        "size",
        "load ms",
        "p50 ms",
        "p99 ms",
        "inputs/s",
        "memory MB",
        "self-test",
        "agreement",
    ):
        table.add_column(name, justify="left" if name == "artifact" else "right")
    for row in rows:
        name = f"{Path(row.file).name}"
        if row.error:
            table.add_row(name, f"{row.size_bytes / 1024:.1f} KiB", f"[red]{row.error}[/red]")
            continue
        verdict = {None: "–", True: "[green]✓[/green]", False: "[red]✗[/red]"}
        table.add_row(
            name,
            f"{row.size_bytes / 1024:.1f} KiB",
            _fmt(row.load_ms, ".1f"),
            _fmt(row.p50_ms, ".3f"),
            _fmt(row.p99_ms, ".3f"),
            _fmt(row.throughput, ",.0f"),
            _fmt(row.rss_delta_mb, ".1f"),
            f"{verdict[row.self_test_passed]} {_fmt(row.max_abs_diff, '.1e')}",
            _fmt(row.label_agreement, ".0%"),
        )
    return table


def _worker_main(argv: Sequence[str]) -> None:
    """Entry of the worker process: print one JSON line of measurements."""
    from fedge.shared.errors import FedgeError

    args = json.loads(argv[0])
    try:
        result = _measure(
            Path(args["bundle"]),
            Path(args["key"]),
            args["file"],
            int(args["warmup"]),
            int(args["iterations"]),
            int(args["batch"]),
        )
    except FedgeError as e:
        result = {"error": str(e)}
    print(json.dumps(result))


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
