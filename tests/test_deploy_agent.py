"""Registry API over TLS + real agents on loopback: updates, refusals, rollbacks, auth."""

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from deploy_support import ServerThread, make_bundle, make_keys, tamper_artifact

from fedge.edge.device.agent import AgentConfig, default_health_check, run_agent_once
from fedge.edge.device.selection import CHOICE_FILE
from fedge.server.registry.api import create_app
from fedge.server.registry.devices import DeviceStore
from fedge.server.registry.fleet import device_view, fleet
from fedge.server.registry.publish import publish_bundle
from fedge.server.registry.store import Registry
from fedge.shared.bundle import pack_bundle, sha256_file, unpack_bundle
from fedge.shared.errors import BundleError, SecurityError
from fedge.shared.tls import ensure_server_certificate


@dataclass
class Env:
    tmp: Path
    registry: Registry
    private: Path
    public: Path
    server: ServerThread
    ca: Path
    tokens: dict[str, str]

    def agent(self, name: str, **overrides) -> AgentConfig:
        settings = {
            "server": self.server.url,
            "channel": "stable",
            "dir": self.tmp / "devices" / name,
            "token": self.tokens[name],
            "trusted_key": self.public,
            "ca": self.ca,
            "interval": 0.2,
        }
        return AgentConfig(**{**settings, **overrides})

    def poll(self, name: str, **kwargs):
        return run_agent_once(self.agent(name), **kwargs)

    def bundle(self, version: str, **kwargs) -> Path:
        return make_bundle(self.tmp / "bundles" / version, self.private, version, **kwargs)

    def publish(self, version: str, channel: str = "stable", **kwargs) -> None:
        publish_bundle(self.registry, self.bundle(version, **kwargs), self.public, channel)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    private, public = make_keys(tmp_path / "keys")
    tls = ensure_server_certificate(tmp_path / "tls", [])
    data = tmp_path / "registry"
    registry = Registry(data)
    devices = DeviceStore(data)
    tokens = {name: devices.add(name) for name in ("cam-1", "cam-2")}
    server = ServerThread(create_app(data), ssl=(tls.cert, tls.key)).start()
    try:
        yield Env(tmp_path, registry, private, public, server, tls.ca_cert, tokens)
    finally:
        server.stop()


def _active(env: Env, name: str) -> str | None:
    return device_view(env.registry.data_dir, name).active_version


def test_two_agents_update_and_follow_channel_rollback(env: Env) -> None:
    assert env.poll("cam-1").action == "no-version"
    env.publish("v1")
    for name in ("cam-1", "cam-2"):
        result = env.poll(name)
        assert (result.action, result.active_version, result.reported) == ("activated", "v1", True)
        assert (env.tmp / "devices" / name / "current").resolve().name == "v1"
    assert env.poll("cam-1").action == "up-to-date"
    rows = {v.name: v for v in fleet(env.registry.data_dir)}
    assert {n: (r.active_version, r.health, r.state) for n, r in rows.items()} == {
        "cam-1": ("v1", "ok", "online"),
        "cam-2": ("v1", "ok", "online"),
    }
    assert rows["cam-1"].latency_p50_ms is not None and rows["cam-1"].latency_p99_ms is not None
    # The agent measured the verified artifacts on the device and recorded the fastest: `edge
    # serve --agent-dir` reuses that file, and the fleet view shows the choice.
    choice = json.loads((env.tmp / "devices" / "cam-1" / CHOICE_FILE).read_text())
    assert choice["version"] == "v1" and choice["reason"] in ("fastest", "only-candidate")
    assert rows["cam-1"].detail["artifact"] == choice["file"]
    assert rows["cam-1"].detail["artifact_reason"] == choice["reason"]

    env.publish("v2", seed=2)
    assert [env.poll(n).active_version for n in ("cam-1", "cam-2")] == ["v2", "v2"]
    env.registry.rollback("stable")
    for name in ("cam-1", "cam-2"):
        result = env.poll(name)
        assert (result.action, result.active_version) == ("activated", "v1")
        assert _active(env, name) == "v1"


def test_tampered_bundle_refused_at_publish(env: Env) -> None:
    env.publish("v1")
    bad = env.bundle("v2", seed=2)
    tamper_artifact(bad)
    with pytest.raises(BundleError, match="sha256"):
        publish_bundle(env.registry, bad, env.public, "stable")
    assert env.registry.current("stable") == "v1"


def test_corrupt_download_refused_and_old_version_kept(env: Env) -> None:
    env.publish("v1")
    env.poll("cam-1")
    env.publish("v2", seed=2)
    # Bytes damaged on the server's disk (or in transit): the tar hash catches it.
    tar = env.registry.tar_path("v2")
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    result = env.poll("cam-1")
    assert (result.action, result.active_version, result.health) == ("refused", "v1", "degraded")
    assert "sha256" in (result.error or "")
    view = device_view(env.registry.data_dir, "cam-1")
    assert view.active_version == "v1" and "sha256" in (view.last_error or "")


def test_compromised_server_cannot_push_a_modified_bundle(env: Env) -> None:
    """The server rewrites the tar AND its recorded hash: the operator's signed statement holds."""
    env.publish("v1")
    env.poll("cam-1")
    env.publish("v2", seed=2)
    work = env.tmp / "attacker"
    unpack_bundle(env.registry.tar_path("v2"), work)
    tamper_artifact(work)
    pack_bundle(work, env.registry.tar_path("v2"))
    tar = env.registry.tar_path("v2")
    with sqlite3.connect(env.registry.data_dir / "registry.sqlite") as conn:
        conn.execute(
            "UPDATE versions SET tar_sha256 = ?, tar_size = ? WHERE version = 'v2'",
            (sha256_file(tar), tar.stat().st_size),
        )
    result = env.poll("cam-1")
    assert (result.action, result.active_version) == ("refused", "v1")
    assert "does not match the sha256 the operator signed" in (result.error or "")
    assert sorted(p.name for p in (env.tmp / "devices/cam-1/versions").iterdir()) == ["v1"]


def test_failing_self_test_keeps_old_version_and_is_not_retried(env: Env) -> None:
    env.publish("v1")
    env.poll("cam-1")
    env.publish("v2", seed=2, break_self_test=True)
    result = env.poll("cam-1")
    assert (result.action, result.active_version) == ("refused", "v1")
    assert "self-test" in (result.error or "")
    assert "self-test" in (device_view(env.registry.data_dir, "cam-1").last_error or "")

    downloads = []

    def counting_health_check(bundle: Path, key: Path) -> None:
        downloads.append(bundle)
        default_health_check(bundle, key)

    again = env.poll("cam-1", health_check=counting_health_check)
    assert again.action == "refused" and downloads == []


def test_failed_health_check_after_activation_rolls_back(env: Env) -> None:
    env.publish("v1")
    env.poll("cam-1")
    env.publish("v2", seed=2)

    def breaks_once_active(bundle: Path, key: Path) -> None:
        default_health_check(bundle, key)
        if bundle.name == "current" and bundle.resolve().name == "v2":
            raise BundleError("runtime cannot load v2 on this device")

    result = env.poll("cam-1", health_check=breaks_once_active)
    assert (result.action, result.active_version) == ("rolled-back", "v1")
    assert (env.tmp / "devices/cam-1/current").resolve().name == "v1"
    assert not (env.tmp / "devices/cam-1/versions/v2").exists()
    assert "after activation" in (device_view(env.registry.data_dir, "cam-1").last_error or "")


def test_unknown_and_revoked_devices_are_refused(env: Env) -> None:
    env.publish("v1")
    with httpx.Client(base_url=env.server.url, verify=str(env.ca)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/channels/stable/current").status_code == 401
        bad = {"Authorization": "Bearer fedge_dev_guess"}
        assert client.get("/v1/channels/stable/current", headers=bad).status_code == 401
        assert client.get("/v1/bundles/v1/bundle.tar", headers=bad).status_code == 401
        ok = {"Authorization": f"Bearer {env.tokens['cam-2']}"}
        assert client.get("/v1/devices/me", headers=ok).json()["name"] == "cam-2"
        assert client.get("/v1/bundles/nope/bundle.tar", headers=ok).status_code == 404
        malformed = client.post("/v1/devices/me/status", headers=ok, json={"health": "great"})
        assert malformed.status_code == 422
        DeviceStore(env.registry.data_dir).revoke("cam-2")
        assert client.get("/v1/channels/stable/current", headers=ok).status_code == 403
        schema = client.get("/openapi.json").json()
        assert "/v1/channels/{channel}/current" in schema["paths"]
    config = env.agent("cam-1", token="fedge_dev_wrong")
    with pytest.raises(SecurityError, match="401"):
        run_agent_once(config)
    with pytest.raises(SecurityError, match="403"):
        env.poll("cam-2")


def test_agent_refuses_a_server_with_an_untrusted_certificate(env: Env) -> None:
    other = ensure_server_certificate(env.tmp / "other-tls", [])
    result = run_agent_once(env.agent("cam-1", ca=other.ca_cert))
    assert result.action == "unreachable" and "CERTIFICATE" in (result.error or "").upper()


def test_power_cut_leftovers_are_cleared(env: Env) -> None:
    env.publish("v1")
    env.poll("cam-1")
    root = env.tmp / "devices" / "cam-1"
    # What a power cut mid-update can leave: a half download and a temp link.
    (root / "incoming" / "half").mkdir()
    (root / ".current.deadbeef").symlink_to("versions/v1")
    (root / "state.json").unlink()
    assert env.poll("cam-1").action == "up-to-date"
    assert list((root / "incoming").iterdir()) == []
    assert not (root / ".current.deadbeef").exists()
