"""The agent's directory on a device: installed versions and the atomically swapped ``current``.

Layout::

    DIR/versions/<version>/   a verified bundle, moved in whole by one rename
    DIR/current               symlink -> versions/<version> (what ``edge serve`` runs)
    DIR/incoming/             downloads in progress (emptied at start)
    DIR/state.json            previous version, refused versions, latency, and the release
                              floor and statement sequences that stop downgrades

``current`` is replaced with ``os.replace`` of a freshly made symlink, which is
atomic on POSIX: after a power cut it points at the old or the new version,
never at nothing or at half a bundle (a version directory exists only once it
was fully written and verified).
"""

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from fedge.shared.atomic import atomic_write_json, exclusive_lock, fsync_dir, fsync_tree
from fedge.shared.errors import BundleError, ConfigError
from fedge.shared.fleet_protocol import is_version

CURRENT = "current"
VERSIONS = "versions"
INCOMING = "incoming"
STATE = "state.json"
SERVE_STATS = "serve-stats.json"


class AgentDir:
    """One device's model directory (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()
        self.versions = self.root / VERSIONS
        self.incoming = self.root / INCOMING
        self.current_link = self.root / CURRENT
        self.state_path = self.root / STATE
        self.serve_stats_path = self.root / SERVE_STATS

    def prepare(self) -> None:
        """Create the layout and clear what an interrupted run left (downloads, temp links)."""
        self.versions.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir()
        for leftover in self.root.glob(f".{CURRENT}.*"):
            leftover.unlink(missing_ok=True)
        for leftover in self.versions.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold the directory's lock: two agents on one directory would fight over ``current``."""
        busy = f"another fedge agent is already running on {self.root}"
        return exclusive_lock(self.root / ".agent.lock", busy)

    # -- versions ------------------------------------------------------------------------------

    def version_dir(self, version: str) -> Path:
        """``versions/<version>``; the name comes from the network, so it is checked first."""
        if not is_version(version):
            raise BundleError(f"version name {version[:80]!r} is not safe as a directory name")
        return self.versions / version

    def installed(self) -> list[str]:
        """Installed versions, oldest first (by install time)."""
        dirs = [p for p in self.versions.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [p.name for p in sorted(dirs, key=lambda p: p.stat().st_mtime)]

    def active(self) -> str | None:
        """The version ``current`` points at, or None (no link, or a dangling one)."""
        try:
            target = os.readlink(self.current_link)
        except (FileNotFoundError, OSError):
            return None
        version = Path(target).name
        return version if self.version_dir(version).is_dir() else None

    def install(self, staged: Path, version: str) -> Path:
        """Move a verified, unpacked bundle into ``versions/<version>`` with one rename."""
        target = self.version_dir(version)
        if target.exists():
            # Only reachable for a copy that failed re-verification: replace it whole.
            trash = self.versions / f".trash-{uuid.uuid4().hex}"
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        fsync_tree(staged)
        os.rename(staged, target)
        fsync_dir(self.versions)
        os.utime(target)
        return target

    def activate(self, version: str) -> None:
        """Point ``current`` at ``versions/<version>`` atomically (temp symlink + os.replace)."""
        if not self.version_dir(version).is_dir():
            raise ConfigError(f"version {version} is not installed in {self.versions}")
        tmp = self.root / f".{CURRENT}.{uuid.uuid4().hex}"
        os.symlink(f"{VERSIONS}/{version}", tmp)
        try:
            os.replace(tmp, self.current_link)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)

    def deactivate(self) -> None:
        """Remove ``current`` (only when the sole installed version failed after activation)."""
        self.current_link.unlink(missing_ok=True)
        fsync_dir(self.root)

    def remove(self, version: str) -> None:
        """Delete an installed version (never the active one)."""
        if version == self.active():
            return
        shutil.rmtree(self.version_dir(version), ignore_errors=True)

    def prune(self, keep: int, protect: set[str]) -> list[str]:
        """Delete the oldest installed versions beyond ``keep``, never one in ``protect``."""
        removable = [v for v in self.installed() if v not in protect and v != self.active()]
        excess = len(self.installed()) - keep
        removed = removable[: max(0, excess)]
        for version in removed:
            self.remove(version)
        return removed

    # -- state ---------------------------------------------------------------------------------

    def load_state(self) -> dict[str, Any]:
        """``state.json`` (empty when missing or unreadable: it only holds hints, not truth)."""
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state_path, state)

    def refusals(self) -> dict[str, dict[str, Any]]:
        """Versions this agent refused, with the tar sha256 and the reason."""
        refused = self.load_state().get("refused")
        return dict(refused) if isinstance(refused, dict) else {}

    def clear_refusals(self, version: str | None = None) -> list[str]:
        """Forget the refusal of ``version`` (all when None): the next poll tries it again.

        Raises
        ------
        ConfigError
            ``version`` was not refused.
        """
        state = self.load_state()
        raw = state.get("refused")
        refused: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if version is not None and version not in refused:
            known = ", ".join(sorted(refused)) or "none"
            raise ConfigError(f"version {version!r} is not refused here (refused: {known})")
        cleared = [version] if version is not None else sorted(refused)
        for name in cleared:
            refused.pop(name, None)
        state["refused"] = refused
        self.save_state(state)
        return cleared

    def serve_stats(self, max_age_s: float) -> dict[str, Any] | None:
        """Latency figures ``edge serve --agent-dir`` wrote, if fresh enough to report."""
        try:
            data = json.loads(self.serve_stats_path.read_text(encoding="utf-8"))
            if time.time() - float(data["written_at"]) > max_age_s:
                return None
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        # Before its first request the server has no latency to report.
        return data if isinstance(data, dict) and "p50" in data else None
