"""A site's own privacy ledger: every DP release it made, composed across all runs.

Each training round a site takes part in is one entry, written (atomically, 0600,
under a lock) BEFORE the round's update leaves the site, so a crash between training
and reporting can only over-count. Epsilon is composed with Opacus' RDP accountant,
the same accountant the site's DP-SGD uses (``fedge.client.dp_sgd``):

- record-level DP (DP-SGD): ``steps`` steps of the sampled Gaussian mechanism with the
  site's own Poisson rate ``sample_rate`` and noise multiplier z;
- site-level DP (noise added by the server): one Gaussian mechanism with z per round,
  taken with sampling rate 1 (the site cannot see how the server sampled: an upper
  bound). It protects the whole dataset, so it also bounds any one record; it holds
  only if the operator's server really adds the noise it states;
- no DP: epsilon is infinite.

Federated-evaluation replies are releases too, and are counted (``kind = "evaluate"``,
one entry per reply, written before the reply leaves), but they carry no epsilon: the
loss, accuracy and example count of the site's local evaluation split go to the server
without noise. No DP bounds them; the ledger shows how many were sent so that the site's
administrator sees them (and a policy can switch them off: ``evaluate = false``). The
loss and accuracy reported with a training update are likewise not noised.

Composing all runs' events in one accountant is RDP composition, tighter than adding
the per-run epsilons and still a valid upper bound.
"""

import math
import os
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedge.shared.atomic import atomic_write_json, exclusive_lock, read_json_object
from fedge.shared.errors import SecurityError

LEDGER_NAME = "privacy-ledger.json"
LEDGER_FORMAT = "fedge-privacy-ledger/1"
MAX_LEDGER_BYTES = 64 << 20  # about 300 bytes an entry: some 200 000 rounds


KINDS = ("train", "evaluate")


@dataclass(frozen=True)
class LedgerEntry:
    """One release of this site: a training round (a DP release) or an evaluation reply."""

    run_id: str
    round: int
    dp: str  # none | record | site
    noise_multiplier: float
    sample_rate: float
    steps: int
    task: str
    model: str
    at: str
    kind: str = "train"  # "evaluate": a federated-evaluation reply, outside the epsilon

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "LedgerEntry":
        try:
            return LedgerEntry(
                run_id=str(data["run_id"]),
                round=int(data["round"]),
                dp=str(data["dp"]),
                noise_multiplier=float(data["noise_multiplier"]),
                sample_rate=float(data["sample_rate"]),
                steps=int(data["steps"]),
                task=str(data["task"]),
                model=str(data["model"]),
                at=str(data["at"]),
                kind=_kind(data.get("kind", "train")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SecurityError(f"privacy ledger entry is malformed: {data!r:.200}") from e


def _kind(value: object) -> str:
    if value not in KINDS:
        raise ValueError(f"unknown ledger entry kind {value!r}")
    return str(value)


@dataclass(frozen=True)
class RunRow:
    """The ledger's view of one run: rounds trained, evaluation replies, its own epsilon."""

    run_id: str
    dp: str
    rounds: int
    epsilon: float
    evaluations: int = 0


def locked(path: Path) -> AbstractContextManager[None]:
    """Serialize read-check-append between ClientApp processes of one site."""
    return exclusive_lock(path.with_name(path.name + ".lock"))


def load_ledger(path: Path) -> list[LedgerEntry]:
    """Every entry of the ledger at ``path`` ([] if there is none yet).

    Raises
    ------
    SecurityError
        When the file is corrupt: the site then refuses to train (fail closed) until an
        administrator restores it.
    """
    path = Path(path)
    if not os.path.lexists(path):  # a dangling symlink is not "no ledger yet"
        return []
    data = read_json_object(
        path,
        MAX_LEDGER_BYTES,
        SecurityError,
        "fedge privacy ledger",
        fmt=LEDGER_FORMAT,
        hint="restore the privacy ledger from a backup; the site refuses to train until then",
    )
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise SecurityError(f"{path} is malformed: 'entries' is not a list")
    return [LedgerEntry.from_dict(e) for e in entries if isinstance(e, dict)]


def save_ledger(path: Path, entries: list[LedgerEntry]) -> None:
    """Write the whole ledger atomically (0600)."""
    atomic_write_json(
        path, {"format": LEDGER_FORMAT, "entries": [asdict(e) for e in entries]}, mode=0o600
    )


def epsilon_of(entries: list[LedgerEntry], delta: float) -> float:
    """Epsilon at ``delta`` of all training ``entries`` composed (RDP, Opacus' accountant).

    Evaluation replies carry no DP noise and are not part of it (see the module doc).
    """
    entries = [e for e in entries if e.kind == "train"]
    if not entries:
        return 0.0
    if any(e.dp == "none" or e.noise_multiplier <= 0 for e in entries):
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    return float(accountant.get_epsilon(delta))


def runs(entries: list[LedgerEntry], delta: float) -> list[RunRow]:
    """One row per run, in the order the runs first appear."""
    order: dict[str, list[LedgerEntry]] = {}
    for entry in entries:
        order.setdefault(entry.run_id, []).append(entry)
    rows = []
    for run_id, group in order.items():
        trained = [e for e in group if e.kind == "train"]
        rows.append(
            RunRow(
                run_id,
                (trained or group)[0].dp,
                len(trained),
                epsilon_of(trained, delta),
                evaluations=len(group) - len(trained),
            )
        )
    return rows
