"""What each console page shows, read from the server's files (no HTTP here).

Each function returns plain values for a template. They read the same stores the
CLI reads (run directories, the site registry, the model registry's SQLite), so
the console and ``fedge ... list`` commands can never disagree.
"""

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.server.console.runs import IndexedRun, indexed_runs
from fedge.server.report.data import RunData, is_run_dir, load_run
from fedge.server.report.plots import Plot, run_plots
from fedge.shared.errors import FedgeError

log = logging.getLogger(__name__)
# Privacy per site is read from this many of the newest runs.
SITE_PRIVACY_RUNS = 20


@dataclass(frozen=True)
class RunRow:
    """One line of the runs page."""

    run_id: str
    run: RunData | None
    error: str = ""


def list_runs(server_dir: Path) -> list[RunRow]:
    """Every indexed run, newest first; one that cannot be read says why."""
    rows = []
    for entry in indexed_runs(server_dir):
        rows.append(load_row(entry))
    return rows


def load_row(entry: IndexedRun) -> RunRow:
    if not is_run_dir(entry.run_dir):
        return RunRow(entry.run_id, None, f"{entry.run_dir} is gone or not a run directory")
    try:
        return RunRow(entry.run_id, load_run(entry.run_dir))
    except FedgeError as e:
        return RunRow(entry.run_id, None, str(e))


def find_run(server_dir: Path, run_id: str) -> IndexedRun | None:
    """The indexed run with this id, or None."""
    return next((r for r in indexed_runs(server_dir) if r.run_id == run_id), None)


class PlotCache:
    """Plots of a run, redrawn only when its metrics file changed (polling is cheap)."""

    def __init__(self, size: int = 32) -> None:
        self._cache: dict[Path, tuple[tuple[int, int, bool], list[Plot]]] = {}
        self._lock = threading.Lock()
        self.size = size

    def plots(self, run: RunData) -> list[Plot]:
        metrics = run.run_dir / "metrics.jsonl"
        try:
            stat = metrics.stat()
            key = (stat.st_mtime_ns, stat.st_size, run.finished)
        except OSError:
            key = (0, 0, run.finished)
        with self._lock:
            hit = self._cache.get(run.run_dir)
        if hit is not None and hit[0] == key:
            return hit[1]
        plots = run_plots(run)
        with self._lock:
            if len(self._cache) >= self.size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[run.run_dir] = (key, plots)
        return plots


@dataclass(frozen=True)
class SiteView:
    """One enrolled site on the sites page."""

    name: str
    fingerprint: str
    status: str
    node_id: int | None
    last_seen: str
    enrolled: bool
    epsilon: float | None
    epsilon_run: str


def server_info(server_dir: Path) -> dict[str, Any]:
    """``server.json`` of the server (address of the SuperLink, its CA), or {}."""
    try:
        data = json.loads((server_dir / "server.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def site_privacy(server_dir: Path) -> dict[str, tuple[float, str]]:
    """Per site: the record-level ε it reported in the newest run it took part in."""
    spent: dict[str, tuple[float, str]] = {}
    for row in list_runs(server_dir)[:SITE_PRIVACY_RUNS]:
        if row.run is None:
            continue
        for site in row.run.sites:
            if site.epsilon is not None and site.site not in spent:
                spent[site.site] = (site.epsilon, row.run.name)
    return spent


def list_site_views(server_dir: Path) -> tuple[list[SiteView], str]:
    """Enrolled sites with their live status; (rows, a note when the SuperLink was not asked)."""
    from fedge.server.enrollment import list_sites

    info = server_info(server_dir)
    note = ""
    address = str(info.get("address") or "")
    ca = info.get("ca_cert")
    try:
        if not address:
            raise FileNotFoundError
        rows = list_sites(server_dir, address, ca, live=True)
    except (FedgeError, OSError) as e:
        note = (
            "status unknown: the SuperLink did not answer"
            if address
            else "status unknown: no SuperLink was started with this data dir"
        )
        log.warning("console: sites without live status: %s", e)
        try:
            rows = list_sites(server_dir, address or "127.0.0.1:0", ca, live=False)
        except (FedgeError, OSError):
            rows = []
    spent = site_privacy(server_dir)
    views = []
    for r in rows:
        eps, run = spent.get(r.name, (None, ""))
        seen = r.last_seen.isoformat(timespec="seconds") if r.last_seen else ""
        views.append(
            SiteView(r.name, r.fingerprint, r.status, r.node_id, seen, r.enrolled, eps, run)
        )
    return views, note


@dataclass(frozen=True)
class VersionView:
    """One published version on the registry page."""

    version: str
    bundle_id: str
    task: str
    artifacts: tuple[str, ...]
    size: int
    published_at: str
    channels: tuple[str, ...]
    validation: list[dict[str, Any]]


def registry_view(registry_dir: Path) -> tuple[list[VersionView], dict[str, str], list[Any]]:
    """(versions newest first, channel -> version, channel history newest first)."""
    from fedge.server.registry.store import Registry

    registry = Registry(registry_dir)
    versions = []
    for record in reversed(registry.list_versions()):
        versions.append(
            VersionView(
                record.version,
                record.bundle_id,
                record.task,
                record.artifacts,
                record.tar_size,
                record.published_at,
                record.channels,
                _validation(registry.bundle_dir(record.version)),
            )
        )
    return versions, registry.channels(), list(reversed(registry.history()))[:50]


def _validation(bundle: Path) -> list[dict[str, Any]]:
    """Per artifact: name and pass/fail, from the model card or else the manifest."""
    from fedge.server.report.render import load_bundle

    try:
        rows = load_bundle(bundle).validation
    except FedgeError:
        rows = []
    if rows:
        return rows
    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        artifacts = manifest.get("artifacts", [])
        return [
            {
                "artifact": str(a.get("file", "?")).removeprefix("artifacts/"),
                "status": "pass" if (a.get("validation") or {}).get("passed") else "fail",
            }
            for a in artifacts
            if isinstance(a, dict)
        ]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []


def fleet_view(registry_dir: Path) -> list[dict[str, Any]]:
    """Every device with what it runs and what its channel serves now."""
    from fedge.server.registry.fleet import fleet
    from fedge.server.registry.store import Registry

    channels = Registry(registry_dir).channels()
    rows = []
    for device in fleet(registry_dir):
        row = device.to_dict()
        target = channels.get(device.channel or "")
        row["target"] = target
        row["up_to_date"] = target is not None and target == device.active_version
        ago = device.seen_ago_s()
        row["seen_ago"] = "" if ago is None else f"{ago:.0f} s ago"
        row["artifact"] = device.detail.get("artifact")  # the fastest verified, as measured
        rows.append(row)
    return rows
