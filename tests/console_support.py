"""A coordinator data dir for console tests: operators, runs, two versions, a device."""

from dataclasses import dataclass
from pathlib import Path

from fedge.server.console.runs import remember_run
from fedge.server.enrollment import APPROVED, _save_registry
from fedge.server.operators import grant
from fedge.server.registry.devices import DeviceStore, StatusReport
from fedge.server.registry.publish import publish_bundle
from fedge.server.registry.store import Registry
from fedge.shared.paths import signing_key_path
from tests.deploy_support import make_bundle, make_keys
from tests.report_support import write_run


@dataclass(frozen=True)
class Coordinator:
    """Paths and secrets of the data dir ``make_coordinator`` wrote."""

    server_dir: Path
    registry_dir: Path
    operator_token: str
    scientist_token: str
    device_token: str


def make_coordinator(root: Path, site_names: list[str] | None = None) -> Coordinator:
    """``root/server`` as ``fedge server start`` lays it out, with content on every page.

    Versions ``v1`` (on ``stable``) and ``v2`` (published, on no channel); device ``cam-1``
    on ``stable`` that reported running ``v1``; a finished run ``exp1`` and a running ``exp2``.
    """
    server = root / "server"
    registry_dir = server / "registry"
    registry_dir.mkdir(parents=True)
    operator = grant(server, "alice", "operator").token
    scientist = grant(server, "bob", "scientist").token
    names = site_names or ["site-a", "site-b"]
    remember_run(server, write_run(root / "runs" / "exp1", names, rounds=3))
    remember_run(
        server, write_run(root / "runs" / "exp2", names, rounds=1, finished=False, configured=4)
    )
    # Enrolled sites as `fedge server approve` records them (no SuperLink runs in these tests).
    _save_registry(
        server,
        [
            {"name": n, "fingerprint": f"SHA256:{i:016x}", "node_id": 1000 + i, "status": APPROVED}
            for i, n in enumerate(names)
        ],
    )
    # The operator key at its default path: the registry signs channel changes with it.
    private, public = make_keys(signing_key_path().parent)
    registry = Registry(registry_dir)
    publish_bundle(registry, make_bundle(root / "b1", private, "v1", seed=1), public, "stable")
    publish_bundle(registry, make_bundle(root / "b2", private, "v2", seed=2), public, None)
    devices = DeviceStore(registry_dir)
    device_token = devices.add("cam-1")
    devices.record_status("cam-1", StatusReport("stable", "v1", "ok", 1.5, 3.0))
    return Coordinator(server, registry_dir, operator, scientist, device_token)
