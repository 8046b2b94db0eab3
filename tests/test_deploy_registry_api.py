"""The registry's device API at its boundary: size limits, auth before parsing, channel rights,
validated status reports, sanitised fleet view, and the signed channel model end to end."""

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from deploy_support import ServerThread, make_bundle, make_keys
from typer.testing import CliRunner

from fedge.cli.registry import fleet_app, registry_app
from fedge.edge.device.agent import AgentConfig, run_agent_once
from fedge.server.registry.api import MAX_BODY_BYTES, create_app
from fedge.server.registry.devices import DeviceStore
from fedge.server.registry.fleet import device_view
from fedge.server.registry.publish import publish_bundle
from fedge.server.registry.store import Registry
from fedge.shared.errors import RegistryError

STATUS = "/v1/devices/me/status"


@dataclass
class Api:
    tmp: Path
    data: Path
    registry: Registry
    private: Path
    public: Path
    server: ServerThread
    tokens: dict[str, str]

    def client(self, device: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[device]}"} if device else {}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=30)

    def publish(self, version: str, channel: str, **kw) -> None:
        bundle = make_bundle(self.tmp / "b" / version, self.private, version, **kw)
        publish_bundle(self.registry, bundle, self.public, channel)

    def poll(self, device: str, channel: str = "stable"):
        config = AgentConfig(
            self.server.url, channel, self.tmp / "dev" / device, self.tokens[device], self.public
        )
        return run_agent_once(config)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    private, public = make_keys(tmp_path / "keys")
    data = tmp_path / "server" / "registry"  # `--data-dir` names the server's folder
    registry = Registry(data, signing_key=private)
    store = DeviceStore(data)
    tokens = {
        "cam-1": store.add("cam-1"),
        "tester": store.add("tester", ("stable", "canary")),
    }
    server = ServerThread(create_app(data)).start()
    try:
        yield Api(tmp_path, data, registry, private, public, server, tokens)
    finally:
        server.stop()


# ---------------------------------------------------------------- finding 10


def test_body_limit_and_auth_come_before_parsing(api: Api) -> None:
    with api.client() as anonymous:
        # Invalid JSON without a token: 401 (was 422: the body was parsed first).
        assert anonymous.post(STATUS, content=b"{not json").status_code == 401
        big = b"x" * (MAX_BODY_BYTES + 1)
        assert anonymous.post(STATUS, content=big).status_code == 413
    with api.client("cam-1") as device:
        assert device.post(STATUS, content=b"x" * (MAX_BODY_BYTES + 1)).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed bytes are counted
            for _ in range(64):
                yield b" " * 4096

        assert device.post(STATUS, content=chunks()).status_code == 413
        ok = {"channel": "stable", "active_version": None, "health": "no-model"}
        assert device.post(STATUS, json=ok).status_code == 204
    with api.client() as anonymous:
        assert anonymous.get("/healthz").status_code == 200  # still up


# ---------------------------------------------------------------- finding 11


def test_devices_read_only_their_channels_and_versions(api: Api) -> None:
    api.publish("v1", "stable")
    api.publish("v2", "canary", seed=2)
    with api.client("cam-1") as cam:
        assert cam.get("/v1/channels/stable/current").status_code == 200
        assert cam.get("/v1/channels/canary/current").status_code == 403
        assert cam.get("/v1/bundles/v1/bundle.tar").status_code == 200
        assert cam.get("/v1/bundles/v2/bundle.tar").status_code == 403
        assert cam.get("/v1/devices/me").json()["channels"] == ["stable"]
    with api.client("tester") as tester:
        assert tester.get("/v1/channels/canary/current").status_code == 200
        assert tester.get("/v1/bundles/v2/bundle.tar").status_code == 200
    # A version a channel pointed at before stays downloadable (an installed rollback target).
    api.registry.promote("v2", "stable")
    api.registry.rollback("stable")
    with api.client("cam-1") as cam:
        assert cam.get("/v1/bundles/v2/bundle.tar").status_code == 200
    DeviceStore(api.data).set_channels("cam-1", ("canary",))
    with api.client("cam-1") as cam:
        assert cam.get("/v1/channels/stable/current").status_code == 403


# ---------------------------------------------------------------- finding 12


@pytest.mark.parametrize(
    "body",
    [
        b'{"channel":"stable","health":"ok","active_version":null,"latency_p50_ms":NaN}',
        b'{"channel":"stable","health":"ok","active_version":null,"latency_p50_ms":Infinity}',
        b'{"channel":"stable","health":"ok","active_version":null,"latency_p99_ms":-Infinity}',
        b'{"channel":"stable","health":"ok","active_version":null,"latency_p50_ms":1e400}',
        b'{"channel":"stable","health":"ok","active_version":null,"last_error":"\\ud800"}',
        b'{"channel":"stable","health":"ok","active_version":null,"last_error":"\\u001b[2J"}',
        b'{"channel":"stable","health":"ok","active_version":"../x"}',
        b'{"channel":"stable","health":"ok","active_version":null,"detail":{"k":"\\u001b"}}',
        b'{"channel":"stable","health":"ok","active_version":null,"surprise":1}',
        b'{"channel":"canary","health":"ok","active_version":null}',
        b"[]",
    ],
)
def test_status_reports_are_validated(api: Api, body: bytes) -> None:
    with api.client("cam-1") as cam:
        answer = cam.post(STATUS, content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert cam.get("/v1/devices/me").status_code == 200
    assert device_view(api.data, "cam-1").latency_p50_ms is None


def test_fleet_view_escapes_what_devices_wrote(api: Api) -> None:
    # Rows stored before validation existed (or written by hand) are still shown safely.
    with sqlite3.connect(api.data / "registry.sqlite") as conn:
        conn.execute(
            "INSERT OR REPLACE INTO device_status (name, channel, health, last_error, last_seen)"
            " VALUES ('cam-1', 'stable', 'ok', ?, '2026-01-01T00:00:00+00:00')",
            ("\x1b]0;pwned\x07\x1b[2J[bold red]fake[/]",),
        )
    result = CliRunner().invoke(fleet_app, ["show", "cam-1", "--data-dir", str(api.data.parent)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b" in result.output and "[bold red]fake[/]" in result.output


# ---------------------------------------------------------------- finding 5, end to end


def test_operator_rollback_is_signed_and_a_plain_downgrade_is_refused(api: Api) -> None:
    api.publish("v1", "stable")
    api.publish("v2", "stable", seed=2)
    assert api.poll("cam-1").active_version == "v2"
    with pytest.raises(RegistryError, match="downgrade"):
        api.registry.promote("v1", "stable")
    assert api.registry.current("stable") == "v2"
    assert api.registry.promote("v1", "stable", rollback=True)
    result = api.poll("cam-1")
    assert (result.action, result.active_version) == ("activated", "v1")
    # The same through the CLI: `fedge registry rollback` signs a rollback statement.
    runner = CliRunner()
    args = ["--data-dir", str(api.data.parent), "--signing-key", str(api.private)]
    assert (
        runner.invoke(registry_app, ["promote", "v2", "--channel", "stable", *args]).exit_code == 0
    )
    assert api.poll("cam-1").active_version == "v2"
    done = runner.invoke(registry_app, ["rollback", "--channel", "stable", *args])
    assert done.exit_code == 0, done.output
    assert api.poll("cam-1").active_version == "v1"


def test_frozen_registry_is_refused_until_the_operator_refreshes(api: Api) -> None:
    api.publish("v1", "stable")
    assert api.poll("cam-1").active_version == "v1"
    stale = Registry(api.data, signing_key=api.private, statement_days=-1)
    publish_bundle(stale, make_bundle(api.tmp / "b2", api.private, "v2", seed=2), api.public,
                   "stable")  # fmt: skip
    result = api.poll("cam-1")
    assert (result.action, result.active_version) == ("refused", "v1")
    assert "expired" in (result.error or "")
    api.registry.refresh("stable")
    assert api.poll("cam-1").active_version == "v2"


def test_legacy_channel_without_statement_is_refused(api: Api) -> None:
    api.publish("v1", "stable")
    with sqlite3.connect(api.data / "registry.sqlite") as conn:
        conn.execute("DELETE FROM channel_statements")
    result = api.poll("cam-1")
    assert result.action == "bad-answer" and "without a signed channel statement" in result.error
    api.registry.refresh("stable")
    assert api.poll("cam-1").active_version == "v1"


def test_one_message_definition_serves_both_sides(api: Api) -> None:
    """The API documents and parses the shared dataclass the agent builds (no second copy)."""
    from pydantic import TypeAdapter

    from fedge.shared.fleet_protocol import CurrentVersion, StatusReport

    with api.client() as anonymous:
        spec = anonymous.get("/openapi.json").json()
    body = spec["paths"][STATUS]["post"]["requestBody"]["content"]["application/json"]["schema"]
    shared = TypeAdapter(StatusReport).json_schema()
    assert (
        set(body["properties"])
        == set(shared["properties"])
        == set(StatusReport.__dataclass_fields__)
    )
    assert body["required"] == shared["required"]
    api.publish("v1", "stable")
    with api.client("cam-1") as cam:
        answer = CurrentVersion.from_dict(cam.get("/v1/channels/stable/current").json())
    assert answer.version == "v1" and answer.signed() is not None
