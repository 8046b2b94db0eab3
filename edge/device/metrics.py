"""Serving metrics in the Prometheus text format, without the prometheus_client dependency.

Written by hand because the format is small and stable, and a device should not
carry another package for three metrics. All updates happen on the server's
event loop thread, so no lock is needed.
"""

import collections
import time
from pathlib import Path
from typing import Any

import numpy as np

# Histogram buckets (seconds) from 0.5 ms to 5 s: edge models answer in this range.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


class ServeMetrics:
    """Request counts by status code, a latency histogram, examples served and the model."""

    def __init__(self, window: int = 2048) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self.bucket_counts = [0] * len(BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.examples = 0
        self.reloads = 0
        self.reload_failures = 0
        self.model_info: dict[str, str] = {}
        self.artifact_choice: Any = None  # selection.ArtifactChoice of the served model
        self.batcher: Any = None  # batching.MicroBatcher, for its counters
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self.started = time.time()

    def observe(self, status: int, seconds: float, examples: int = 0) -> None:
        """Record one ``/predict`` request (any outcome)."""
        self.requests[str(status)] += 1
        self.latency_sum += seconds
        self.latency_count += 1
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.bucket_counts[i] += 1
        if status == 200:
            self.examples += examples
            self.recent.append(seconds)

    def percentiles_ms(self) -> dict[str, float] | None:
        """p50/p99 of recent successful requests in ms, or None before the first one."""
        if not self.recent:
            return None
        values = np.asarray(self.recent) * 1000.0
        return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}

    def render(self) -> str:
        """The ``/metrics`` body (text format 0.0.4)."""
        lines = [
            "# HELP fedge_predict_requests_total Predict requests by HTTP status code.",
            "# TYPE fedge_predict_requests_total counter",
        ]
        for code in sorted(self.requests):
            lines.append(
                f"fedge_predict_requests_total{_labels({'code': code})} {self.requests[code]}"
            )
        lines += [
            "# HELP fedge_predict_latency_seconds Time to answer a predict request.",
            "# TYPE fedge_predict_latency_seconds histogram",
        ]
        for bound, count in zip(BUCKETS, self.bucket_counts, strict=True):
            lines.append(f'fedge_predict_latency_seconds_bucket{{le="{bound:g}"}} {count}')
        lines += [
            f'fedge_predict_latency_seconds_bucket{{le="+Inf"}} {self.latency_count}',
            f"fedge_predict_latency_seconds_sum {self.latency_sum:.6f}",
            f"fedge_predict_latency_seconds_count {self.latency_count}",
            "# HELP fedge_predict_examples_total Examples predicted.",
            "# TYPE fedge_predict_examples_total counter",
            f"fedge_predict_examples_total {self.examples}",
            "# HELP fedge_model_info The model being served (value is always 1).",
            "# TYPE fedge_model_info gauge",
        ]
        if self.model_info:
            lines.append(f"fedge_model_info{_labels(self.model_info)} 1")
        lines += [
            "# HELP fedge_model_reloads_total Models loaded: the first, then each new version.",
            "# TYPE fedge_model_reloads_total counter",
            f"fedge_model_reloads_total {self.reloads}",
            "# HELP fedge_model_reload_failures_total New versions that failed to load.",
            "# TYPE fedge_model_reload_failures_total counter",
            f"fedge_model_reload_failures_total {self.reload_failures}",
        ]
        lines += self._choice_lines() + self._batch_lines()
        return "\n".join(lines) + "\n"

    def _choice_lines(self) -> list[str]:
        """How the served artifact was chosen, and each candidate's measured latency."""
        choice = self.artifact_choice
        lines = [
            "# HELP fedge_artifact_selected The served artifact and why (value is always 1).",
            "# TYPE fedge_artifact_selected gauge",
        ]
        artifact = self.model_info.get("artifact", "")
        reason = choice.reason if choice is not None else "configured"
        if artifact:
            lines.append(
                f"fedge_artifact_selected{_labels({'artifact': artifact, 'reason': reason})} 1"
            )
        lines += [
            "# HELP fedge_artifact_latency_seconds Median batch-1 latency measured at selection.",
            "# TYPE fedge_artifact_latency_seconds gauge",
        ]
        for file, ms in (choice.p50_ms if choice is not None else {}).items():
            name = Path(file).name
            lines.append(
                f"fedge_artifact_latency_seconds{_labels({'artifact': name})} {ms / 1e3:.6g}"
            )
        return lines

    def _batch_lines(self) -> list[str]:
        batcher = self.batcher
        if batcher is None:
            return []
        return [
            "# HELP fedge_batches_total Model runs of the micro-batcher.",
            "# TYPE fedge_batches_total counter",
            f"fedge_batches_total {batcher.batches}",
            "# HELP fedge_batched_examples_total Examples run through the micro-batcher.",
            "# TYPE fedge_batched_examples_total counter",
            f"fedge_batched_examples_total {batcher.batched_examples}",
        ]

    def stats(self) -> dict[str, Any]:
        """What ``edge serve --agent-dir`` hands the agent to report (``serve-stats.json``)."""
        out: dict[str, Any] = {"written_at": time.time(), "requests": sum(self.requests.values())}
        out.update(self.percentiles_ms() or {})
        if self.artifact_choice is not None:
            out["artifact"] = self.artifact_choice.file
            out["artifact_selection"] = self.artifact_choice.reason
        return out
