"""A site runs only the fedge app it has installed: foreign app packages are refused unread."""

import hashlib
import shutil
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedge.client.app_trust import (
    UntrustedApp,
    check_fab,
    checked,
    guard_clientapp_installs,
    installed_fab_hash,
)
from fedge.server.flower_app_config import APP_DIR


def _foreign_app(tmp_path: Path, marker: Path, component: str = "evil.client:app") -> Path:
    """fedge's own pyproject, with another ClientApp path and one more code file."""
    app = tmp_path / "foreign"
    shutil.copytree(APP_DIR, app)
    text = (app / "pyproject.toml").read_text()
    text = text.replace('clientapp = "fedge.client.app:app"', f'clientapp = "{component}"')
    text = text.replace('fab-include = ["pyproject.toml"]',
                        'fab-include = ["pyproject.toml", "evil/*.py"]')  # fmt: skip
    (app / "pyproject.toml").write_text(text)
    (app / "evil").mkdir()
    (app / "evil" / "__init__.py").write_text("")
    (app / "evil" / "client.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from fedge.client.app import app as fedge_app\n\napp = fedge_app\n"
    )
    return app


def test_the_installed_fedge_app_is_accepted_and_rebuilds_identically() -> None:
    fab = build_fab_from_disk(APP_DIR)
    assert check_fab(fab) == hashlib.sha256(fab).hexdigest() == installed_fab_hash()


def test_foreign_app_packages_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    variants = {
        "extra code and component": _foreign_app(tmp_path / "a", marker),
        "component only": _foreign_app(tmp_path / "b", marker, "fedge.server.app:app"),
    }
    # fedge's pyproject with one more file included, same component path.
    extra = tmp_path / "c"
    shutil.copytree(APP_DIR, extra)
    (extra / "pyproject.toml").write_text(
        (extra / "pyproject.toml")
        .read_text()
        .replace('fab-include = ["pyproject.toml"]', 'fab-include = ["pyproject.toml", "x.py"]')
    )
    (extra / "x.py").write_text("import os\n")
    variants["extra file"] = extra
    for name, app in variants.items():
        with pytest.raises(UntrustedApp, match="refused the run's app package"):
            check_fab(build_fab_from_disk(app))
        assert name
    with pytest.raises(UntrustedApp):
        check_fab(b"PK" + b"\0" * (2 << 20))


def test_the_guard_checks_before_flower_installs(tmp_path: Path) -> None:
    from flwr.supernode.runtime import run_clientapp as runner

    installed: list[bytes] = []
    guarded = checked(lambda fab, *a, **k: installed.append(fab))
    with pytest.raises(UntrustedApp):
        guarded(build_fab_from_disk(_foreign_app(tmp_path, tmp_path / "m")))
    assert installed == []  # never reached Flower's installer
    guarded(build_fab_from_disk(APP_DIR))
    assert len(installed) == 1
    original = runner.install_from_fab
    try:
        guard_clientapp_installs()
        assert getattr(runner.install_from_fab, "fedge_wrapped", False)
        guard_clientapp_installs()  # idempotent: not wrapped twice
        assert runner.install_from_fab.__wrapped__ is original
    finally:
        runner.install_from_fab = original


@pytest.mark.slow
def test_a_real_site_refuses_a_foreign_app_and_runs_fedge(tmp_path: Path) -> None:
    from federation_support import initial_weights, local_federation

    from fedge.server.submit import submit_run
    from fedge.shared.atomic import read_jsonl
    from fedge.shared.config import RunConfig

    marker = tmp_path / "foreign-code-ran"
    foreign = _foreign_app(tmp_path, marker)
    init = initial_weights(tmp_path / "init.safetensors")

    def config(name: str) -> RunConfig:
        return RunConfig(num_rounds=1, min_clients=1, run_dir=str(tmp_path / name),
                         init_weights=str(init), federated_eval=False)  # fmt: skip

    with local_federation(tmp_path / "fed", ["digits#0/2"]) as fed:
        submit_run(config("foreign"), fed.address, None, app_dir=foreign)
        [row] = read_jsonl(tmp_path / "foreign" / "metrics.jsonl")
        assert row["clients"] == [] and len(row["failures"]) == 1, row
        assert "refused the run's app package" in row["failures"][0]
        assert not marker.exists()  # none of its code ran at the site
        site_log = (tmp_path / "fed" / "logs" / "supernode-site-1.log").read_text()
        assert "refused the run's app package" in site_log
        summary = fed.submit(config("fedge"))  # the fedge app itself still runs
        assert summary["sites"] == ["site-1"]


def test_the_front_lets_only_the_installed_fedge_app_start_a_run(tmp_path: Path) -> None:
    """``fedge.server.front.foreign_app``: what the coordinator's front checks on start-run."""
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.proto.fab_pb2 import Fab

    from fedge.server.front import foreign_app

    proto = {"content-type": "application/protobuf"}
    fedge_fab = build_fab_from_disk(APP_DIR)

    def body(content: bytes, hash_str: str = "") -> bytes:
        return StartRunRequest(fab=Fab(content=content, hash_str=hash_str)).SerializeToString()

    assert foreign_app(proto, body(fedge_fab)) is None
    assert foreign_app(proto, body(fedge_fab, hashlib.sha256(fedge_fab).hexdigest())) is None
    foreign = build_fab_from_disk(_foreign_app(tmp_path, tmp_path / "m"))
    assert "fedge app" in (foreign_app(proto, body(foreign)) or "")
    assert "another app hash" in (foreign_app(proto, body(fedge_fab, "0" * 64)) or "")
    assert "no app package" in (foreign_app(proto, body(b"")) or "")
    assert "not a valid protobuf" in (foreign_app(proto, b"\xff\xff\xff") or "")
    assert foreign_app({"content-type": "application/json"}, body(fedge_fab)) is not None
    gzip = {**proto, "content-encoding": "gzip"}
    assert foreign_app(gzip, body(fedge_fab)) is not None
