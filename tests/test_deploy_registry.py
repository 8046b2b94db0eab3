"""Registry storage and CLI: verified publish, immutability, channels, rollback, crash safety."""

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from deploy_support import make_bundle, make_keys, tamper_artifact
from typer.testing import CliRunner

from fedge.cli.registry import fleet_app, registry_app
from fedge.server.registry.devices import DeviceRevoked, DeviceStore, DeviceUnknown, StatusReport
from fedge.server.registry.fleet import device_view, fleet
from fedge.server.registry.publish import publish_bundle
from fedge.server.registry.store import Registry
from fedge.shared.bundle import pack_bundle
from fedge.shared.errors import BundleError, RegistryError


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def test_publish_list_promote_rollback(tmp_path: Path, keys, registry: Registry) -> None:
    private, public = keys
    v1 = make_bundle(tmp_path / "b1", private, "v1", seed=1)
    v2 = make_bundle(tmp_path / "b2", private, "v2", seed=2)
    record, created = publish_bundle(registry, v1, public, channel="stable")
    assert created and record.version == "v1" and record.channels == ("stable",)
    publish_bundle(registry, v2, public, channel="canary")
    assert registry.channels() == {"canary": "v2", "stable": "v1"}

    assert registry.promote("v2", "stable") is True
    assert registry.promote("v2", "stable") is False
    assert registry.current("stable") == "v2"
    assert registry.rollback("stable") == ("v2", "v1")
    assert registry.current("stable") == "v1"
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("stable")
    with pytest.raises(RegistryError, match="not in the registry"):
        registry.promote("v9", "stable")
    events = registry.history("stable")
    assert [(e.version, e.rolled_back_at is not None) for e in events] == [
        ("v1", False),
        ("v2", True),
    ]
    # The stored tar is what devices get; it unpacks and verifies.
    assert registry.tar_path("v1").stat().st_size == record.tar_size


def test_rollback_twice_walks_back_two_steps(tmp_path: Path, keys, registry: Registry) -> None:
    private, public = keys
    for i in (1, 2, 3):
        publish_bundle(
            registry,
            make_bundle(tmp_path / f"b{i}", private, f"v{i}", seed=i),
            public,
            channel="stable",
        )
    assert registry.rollback("stable") == ("v3", "v2")
    assert registry.rollback("stable") == ("v2", "v1")


def test_versions_are_immutable_and_republish_is_idempotent(
    tmp_path: Path, keys, registry: Registry
) -> None:
    private, public = keys
    first = make_bundle(tmp_path / "a", private, "v1", seed=1)
    _, created = publish_bundle(registry, first, public)
    assert created
    _, created_again = publish_bundle(registry, first, public, channel="stable")
    assert not created_again and registry.current("stable") == "v1"
    other = make_bundle(tmp_path / "b", private, "v1", seed=2)
    with pytest.raises(RegistryError, match="immutable"):
        publish_bundle(registry, other, public)


def test_publish_accepts_a_tar(tmp_path: Path, keys, registry: Registry) -> None:
    private, public = keys
    bundle = make_bundle(tmp_path / "b", private, "v1")
    tar = pack_bundle(bundle, tmp_path / "b.tar")
    record, _ = publish_bundle(registry, tar, public)
    assert record.version == "v1"


@pytest.mark.parametrize("problem", ["tampered", "unsigned", "other-key", "failed-validation"])
def test_publish_refuses_bad_bundles(tmp_path: Path, keys, registry: Registry, problem) -> None:
    private, public = keys
    bundle = make_bundle(
        tmp_path / "b", private, "v2", fail_validation=problem == "failed-validation"
    )
    if problem == "tampered":
        tamper_artifact(bundle)
    elif problem == "unsigned":
        (bundle / "manifest.sig").unlink()
    elif problem == "other-key":
        other_private, _ = make_keys(tmp_path / "other")
        bundle = make_bundle(tmp_path / "b-other", other_private, "v2")
    expected = {
        "tampered": "does not match its sha256",
        "unsigned": "unsigned",
        "other-key": "trusts",
        "failed-validation": "did not pass export validation",
    }[problem]
    with pytest.raises(BundleError, match=expected):
        publish_bundle(registry, bundle, public, channel="stable")
    assert registry.list_versions() == [] and registry.current("stable") is None
    assert list(registry.versions_dir.iterdir()) == []
    assert list(registry.staging_dir.iterdir()) == []


def _exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_crash_leftovers_are_swept(tmp_path: Path, keys) -> None:
    """A crash after the rename but before the commit leaves an unrecorded dir: it is removed."""
    private, public = keys
    data = tmp_path / "registry"
    registry = Registry(data)
    publish_bundle(registry, make_bundle(tmp_path / "b", private, "v1"), public)
    (registry.versions_dir / "v2" / "bundle").mkdir(parents=True)
    (registry.staging_dir / "half-written").mkdir()
    (registry.staging_dir / f"{_exited_pid()}-crashed").mkdir()
    in_progress = registry.new_staging()  # a publish of a live process is left alone
    reopened = Registry(data)
    assert sorted(p.name for p in reopened.versions_dir.iterdir()) == ["v1"]
    assert list(reopened.staging_dir.iterdir()) == [in_progress]
    # And the commit is one transaction: a failing insert leaves no version behind.
    with sqlite3.connect(data / "registry.sqlite") as conn:
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON channel_history "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    with pytest.raises(sqlite3.IntegrityError):
        publish_bundle(reopened, make_bundle(tmp_path / "c", private, "v3"), public, "stable")
    assert [r.version for r in reopened.list_versions()] == ["v1"]
    assert not (reopened.versions_dir / "v3").exists()


def test_device_tokens_are_hashed_and_revocable(tmp_path: Path) -> None:
    store = DeviceStore(tmp_path / "registry")
    token = store.add("cam-1")
    assert token.startswith("fedge_dev_") and len(token) > 40
    raw = (tmp_path / "registry" / "registry.sqlite").read_bytes()
    assert token.encode() not in raw
    assert store.authenticate(token).name == "cam-1"
    with pytest.raises(RegistryError, match="already enrolled"):
        store.add("cam-1")
    with pytest.raises(DeviceUnknown):
        store.authenticate("fedge_dev_not-a-real-token")
    new_token = store.rotate("cam-1")
    with pytest.raises(DeviceUnknown):
        store.authenticate(token)
    store.record_status("cam-1", StatusReport("stable", "v1", "ok", 1.5, 3.0))
    assert store.revoke("cam-1") is True
    with pytest.raises(DeviceRevoked):
        store.authenticate(new_token)
    view = device_view(tmp_path / "registry", "cam-1")
    assert view.state == "revoked" and view.active_version == "v1"
    assert [v.name for v in fleet(tmp_path / "registry")] == ["cam-1"]


def test_cli_round_trip(tmp_path: Path, keys) -> None:
    private, public = keys
    data = str(tmp_path)  # the server's data dir; the registry is its registry/ subfolder
    runner = CliRunner()
    b1 = make_bundle(tmp_path / "b1", private, "v1", seed=1)
    b2 = make_bundle(tmp_path / "b2", private, "v2", seed=2)

    def run(app, *args: str):
        result = runner.invoke(app, [*args, "--data-dir", data])
        assert result.exit_code == 0, result.output
        return result.output

    run(registry_app, "publish", str(b1), "--channel", "stable", "--key", str(public))
    run(registry_app, "publish", str(b2), "--channel", "canary", "--key", str(public))
    assert (tmp_path / "registry" / "registry.sqlite").is_file()
    assert "v2" in run(registry_app, "list")
    signer = ("--signing-key", str(private))
    run(registry_app, "promote", "v2", "--channel", "stable", *signer)
    assert "v2 -> v1" in run(registry_app, "rollback", "--channel", "stable", *signer)
    assert "sequence" in run(registry_app, "refresh", "--channel", "stable", *signer)
    history = run(registry_app, "history", "--channel", "stable")
    assert "promote" in history and history.count("stable") == 2
    token_file = tmp_path / "cam.token"
    run(registry_app, "device", "add", "cam-1", "--token-file", str(token_file))
    assert os.stat(token_file).st_mode & 0o777 == 0o600
    assert "cam-1" in run(fleet_app, "list")
    assert "never seen" in run(fleet_app, "show", "cam-1")
    run(registry_app, "device", "revoke", "cam-1")

    tamper_artifact(b1)
    bad = runner.invoke(
        registry_app, ["publish", str(b1), "--key", str(public), "--data-dir", data]
    )
    assert bad.exit_code != 0 and isinstance(bad.exception, BundleError)
