"""Count vectors of a federated artifact job: their layout, and an encoding SecAgg+ sums exactly.

A site answers an artifact job (``fedge.server.artifact_job``) with counts only: examples,
correct predictions and agreements per artifact, optionally confusion matrices, or the
bins of activation histograms. They travel as the ``parameters`` of a Flower fit reply,
so that Flower's ``SecAggPlusWorkflow`` can sum them without the server seeing any one
site's vector.

SecAgg+ does not sum integers: each site's vector is clipped to ``[-C, C]``, multiplied
by ``num_examples / max_weight``, stochastically rounded to ``T`` levels, masked and
summed; the server gets the weighted mean. The encoding makes that exact:

- every site replies with weight 1 (``num_examples = 1``, ``max_weight = 1``), so the
  weighted mean is the plain mean, the server multiplies it by the number of sites K,
  and no site's example count reaches the server in the reply's metadata;
- each count is split into ``digits`` base-``B`` digits (``B = 2**12``), and each digit
  ``d`` is sent as ``d / S`` with ``S = B / C``: every value lies in ``[0, C)``, never
  clipped;
- stochastic rounding errs by less than one level ``2C / T`` per site, so the summed
  digits are off by less than ``K * 2C / T * S = K * 2B / T``; with ``T = 2**22`` that is
  ``K / 512``, below 0.5 for ``K <= MAX_SITES`` (255). Rounding recovers every summed digit
  exactly, and recombining the digits gives the exact integer sums. The modulus (2**30)
  holds ``K * T`` for the same K.

Torch-free and flwr-free: the site, the server and the tests all use it.
"""

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.shared.errors import ConfigError

DIGIT_BITS = 12
BASE = 1 << DIGIT_BITS
# SecAgg+ settings an artifact job runs with (the server sends them to the sites' mod).
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 1 << 22
MODULUS_RANGE = 1 << 30
MAX_WEIGHT = 1.0
SCALE = BASE / CLIPPING_RANGE
# Largest number of sites whose sums decode exactly (K * 2B / T < 0.5 and K * T < modulus).
MAX_SITES = 255
# Digits per count: evaluation counts stay below 2**24 per site; histogram bins below 2**36.
EVALUATE_DIGITS = 2
HISTOGRAM_DIGITS = 3
MAX_DIGITS = 4

# Bounds on what a coordinator may ask of a site (a site refuses anything larger).
KINDS = ("evaluate", "histogram")
FORMATS = ("onnx", "tflite")
MAX_ARTIFACTS = 8
MAX_PAYLOAD_BYTES = 1 << 30  # every array of one job's message together
MAX_CLASSES = 4096
MAX_CONFUSION_CLASSES = 32  # a confusion matrix per artifact only up to this many classes
MAX_VECTOR = 1 << 22  # counts in one reply (before the digit split)
MAX_SPEC_CHARS = 1 << 20
MAX_NAME = 64

# The evaluate layout: these slots, then (correct, agree) per artifact, then confusions.
SLOT_SITES, SLOT_EXAMPLES, SLOT_REFERENCE_CORRECT = 0, 1, 2
HEAD = 3


def check_sites(sites: int) -> None:
    """Refuse a federation too large for the exact decoding (see the module docstring)."""
    if not 1 <= sites <= MAX_SITES:
        raise ConfigError(
            f"an artifact job decodes exact sums for 1 to {MAX_SITES} sites, not {sites}"
        )


def encode(counts: np.ndarray, digits: int) -> np.ndarray:
    """A site's non-negative integer counts as ``digits`` digit planes scaled into SecAgg's range.

    Raises
    ------
    ValueError
        A count is negative or does not fit in ``digits`` digits.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError("counts must be a flat integer vector")
    values = counts.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() >= BASE**digits):
        raise ValueError(f"counts must lie in [0, {BASE**digits}) to travel in {digits} digits")
    planes = [(values >> (DIGIT_BITS * i)) & (BASE - 1) for i in range(digits)]
    return (np.concatenate(planes).astype(np.float64) / SCALE) if planes else values.astype(float)


def decode_sum(total: np.ndarray, digits: int, length: int) -> np.ndarray:
    """Exact integer sums from the sum of the sites' encoded vectors.

    Raises
    ------
    ValueError
        The vector has the wrong length, or a summed digit is not (close to) an integer:
        it did not come from ``encode`` at every site, or more sites than the decoding holds.
    """
    total = np.asarray(total, dtype=np.float64).reshape(-1)
    if total.size != length * digits or not np.all(np.isfinite(total)):
        raise ValueError(f"expected {length * digits} finite values, got {total.size}")
    scaled = total * SCALE
    rounded = np.rint(scaled)
    if total.size and float(np.max(np.abs(scaled - rounded))) >= 0.5 - 1e-9:
        raise ValueError("summed counts are not integers")
    if total.size and rounded.min() < 0:
        raise ValueError("summed counts are negative")
    planes = rounded.astype(np.int64).reshape(digits, length)
    out = np.zeros(length, dtype=np.int64)
    for i in range(digits):
        out += planes[i] << (DIGIT_BITS * i)
    return out


@dataclass(frozen=True)
class ArtifactJob:
    """What the coordinator asks of every site in one artifact job (sent as JSON).

    ``evaluate``: the message's arrays are the bundle's ``manifest.json``, the checkpoint
    file, then each artifact in ``artifacts`` order, all as uint8. ``histogram``: one array,
    the fp32 model in ``fmt``, and ``bin_spec`` (``BinSpec`` JSON) says the bins.
    """

    kind: str
    classes: int
    artifacts: tuple[str, ...] = ()
    confusion: bool = False
    fmt: str = ""
    bin_spec: str = ""
    total_bins: int = 0
    digits: int = EVALUATE_DIGITS

    def __post_init__(self) -> None:
        errors = []
        if self.kind not in KINDS:
            errors.append(f"unknown job kind {self.kind!r}")
        if not 1 <= self.classes <= MAX_CLASSES:
            errors.append(f"classes must be in [1, {MAX_CLASSES}]")
        if not 1 <= self.digits <= MAX_DIGITS:
            errors.append(f"digits must be in [1, {MAX_DIGITS}]")
        if self.kind == "evaluate":
            if not 1 <= len(self.artifacts) <= MAX_ARTIFACTS:
                errors.append(f"an evaluation takes 1 to {MAX_ARTIFACTS} artifacts")
            for name in self.artifacts:
                if not _safe_name(name):
                    errors.append(f"bad artifact name {name[:MAX_NAME]!r}")
            if len(set(self.artifacts)) != len(self.artifacts):
                errors.append("artifact names repeat")
            if self.confusion and self.classes > MAX_CONFUSION_CLASSES:
                errors.append(f"confusion matrices only up to {MAX_CONFUSION_CLASSES} classes")
        if self.kind == "histogram":
            if self.fmt not in FORMATS:
                errors.append(f"unknown model format {self.fmt!r}")
            if len(self.bin_spec) > MAX_SPEC_CHARS:
                errors.append("bin spec too long")
        if not 1 <= self.length <= MAX_VECTOR:
            errors.append(f"the count vector must have 1 to {MAX_VECTOR} entries")
        if errors:
            raise ConfigError("artifact job refused: " + "; ".join(errors))

    @property
    def payload_arrays(self) -> int:
        """How many arrays the job's message carries."""
        return 2 + len(self.artifacts) if self.kind == "evaluate" else 1

    @property
    def length(self) -> int:
        """Counts in one site's reply (before the digit split)."""
        if self.kind == "histogram":
            return self.total_bins
        per_artifact = 2 + (self.classes**2 if self.confusion else 0)
        return HEAD + len(self.artifacts) * per_artifact

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind, "classes": self.classes, "artifacts": list(self.artifacts),
                "confusion": self.confusion, "fmt": self.fmt, "bin_spec": self.bin_spec,
                "total_bins": self.total_bins, "digits": self.digits,
            },
            sort_keys=True,
        )  # fmt: skip

    @staticmethod
    def from_json(text: str) -> "ArtifactJob":
        """Parse and validate a job a coordinator sent; anything unexpected is a ``ConfigError``."""
        if not isinstance(text, str) or len(text) > 2 * MAX_SPEC_CHARS:
            raise ConfigError("artifact job refused: the job description is missing or too long")
        try:
            data: Any = json.loads(text)
            if not isinstance(data, dict) or set(data) != _FIELDS:
                raise ValueError("unexpected fields")
            artifacts = data["artifacts"]
            if not isinstance(artifacts, list) or len(artifacts) > MAX_ARTIFACTS:
                raise ValueError("artifacts must be a short list")
            typed = (
                isinstance(data["kind"], str) and _is_int(data["classes"])
                and isinstance(data["confusion"], bool) and isinstance(data["fmt"], str)
                and isinstance(data["bin_spec"], str) and _is_int(data["total_bins"])
                and _is_int(data["digits"]) and all(isinstance(a, str) for a in artifacts)
            )  # fmt: skip
            if not typed:
                raise ValueError("a field has the wrong type")
        except (ValueError, TypeError, RecursionError) as e:
            # RecursionError: JSON nested deeper than the parser's stack (a crafted job).
            raise ConfigError(
                f"artifact job refused: malformed job description ({str(e)[:200]})"
            ) from e
        return ArtifactJob(
            kind=data["kind"], classes=data["classes"], artifacts=tuple(artifacts),
            confusion=data["confusion"], fmt=data["fmt"], bin_spec=data["bin_spec"],
            total_bins=data["total_bins"], digits=data["digits"],
        )  # fmt: skip


_FIELDS = {"kind", "classes", "artifacts", "confusion", "fmt", "bin_spec", "total_bins", "digits"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _safe_name(name: str) -> bool:
    """A plain file name: letters, digits, ``.-_``, no path, not hidden."""
    return (
        0 < len(name) <= MAX_NAME
        and not name.startswith(".")
        and all(c.isascii() and (c.isalnum() or c in ".-_") for c in name)
    )


@dataclass(frozen=True)
class ArtifactCounts:
    """One artifact's summed counts over every site."""

    correct: int
    agree: int
    confusion: np.ndarray | None  # (classes, classes): rows true label, columns predicted


@dataclass(frozen=True)
class EvaluationSums:
    """The decoded sums of an evaluate job: sites, examples, PyTorch's and each artifact's."""

    sites: int
    examples: int
    reference_correct: int
    artifacts: dict[str, ArtifactCounts]


def evaluation_vector(
    job: ArtifactJob,
    examples: int,
    reference_correct: int,
    per_artifact: list[tuple[int, int, np.ndarray | None]],
) -> np.ndarray:
    """One site's evaluate counts in the job's layout (``sites`` is 1: the site itself)."""
    parts = [np.asarray([1, examples, reference_correct], dtype=np.int64)]
    for correct, agree, _ in per_artifact:
        parts.append(np.asarray([correct, agree], dtype=np.int64))
    if job.confusion:
        for _, _, confusion in per_artifact:
            assert confusion is not None
            parts.append(np.asarray(confusion, dtype=np.int64).reshape(-1))
    vector = np.concatenate(parts)
    if vector.size != job.length:
        raise ValueError(f"evaluate counts have {vector.size} entries, the job {job.length}")
    return vector


def evaluation_sums(job: ArtifactJob, sums: np.ndarray) -> EvaluationSums:
    """Read the summed evaluate vector back into named counts."""
    sums = np.asarray(sums, dtype=np.int64)
    if sums.size != job.length:
        raise ValueError(f"summed counts have {sums.size} entries, the job {job.length}")
    a = len(job.artifacts)
    out: dict[str, ArtifactCounts] = {}
    k = job.classes
    for i, name in enumerate(job.artifacts):
        confusion = None
        if job.confusion:
            start = HEAD + 2 * a + i * k * k
            confusion = sums[start : start + k * k].reshape(k, k)
        out[name] = ArtifactCounts(int(sums[HEAD + 2 * i]), int(sums[HEAD + 2 * i + 1]), confusion)
    return EvaluationSums(
        int(sums[SLOT_SITES]), int(sums[SLOT_EXAMPLES]), int(sums[SLOT_REFERENCE_CORRECT]), out
    )


def evaluation_sensitivity(job: ArtifactJob) -> float:
    """L2 sensitivity of the evaluate sums to adding or removing one example at one site.

    One example adds 1 to ``examples``, at most 1 to ``reference_correct``, at most 1 to
    each artifact's ``correct`` and ``agree``, and 1 to one cell of each confusion matrix.
    """
    a = len(job.artifacts)
    return math.sqrt(2 + 2 * a + (a if job.confusion else 0))
