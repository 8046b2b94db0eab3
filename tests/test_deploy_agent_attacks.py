"""The OTA agent against a hostile registry: downgrades, replays, bad answers, bad tars, big files.

A registry that is compromised (or a man in the middle on ``http://``) is played
by an ``httpx.MockTransport``: it answers whatever the test wants, while the
operator's statements are signed with the real key exactly as the registry
signs them. The agent must refuse, remember the refusal, and never raise.
"""

import errno
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from deploy_support import make_bundle, make_keys
from typer.testing import CliRunner

from fedge.edge.device import agent as agent_module
from fedge.edge.device.activation import AgentDir
from fedge.edge.device.agent import Agent, AgentConfig
from fedge.shared import signing
from fedge.shared.bundle import MANIFEST, pack_bundle, sha256_file
from fedge.shared.errors import BundleError
from fedge.shared.fleet_protocol import ChannelStatement, SignedStatement

Handler = Callable[[httpx.Request], httpx.Response]


class FakeRegistry:
    """Serves signed statements and tars like the registry would, or anything a test sets."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.private, self.public = make_keys(tmp / "keys")
        self.key = signing.load_private_key(self.private)
        self.sequence = 0
        self.answer: dict | None = None
        self.tars: dict[str, bytes] = {}
        self.requests: list[httpx.Request] = []
        self.override: Handler | None = None

    def bundle(self, version: str, release: int, action: str = "publish", **kw) -> dict:
        """Make, sign and serve ``version``; returns the answer the channel gives."""
        out = make_bundle(self.tmp / "bundles" / version, self.private, version, **kw)
        tar = pack_bundle(out, self.tmp / "tars" / f"{version}.tar")
        self.tars[version] = tar.read_bytes()
        manifest_sha = hashlib.sha256((out / MANIFEST).read_bytes()).hexdigest()
        return self.sign(version, release, manifest_sha, sha256_file(tar), tar.stat().st_size,
                         action=action, task="digits" if kw.get("kind", "image") == "image"
                         else "tabular")  # fmt: skip

    def sign(
        self,
        version: str,
        release: int,
        manifest_sha: str,
        tar_sha: str,
        tar_size: int,
        *,
        action: str = "publish",
        task: str = "digits",
        key: signing.Ed25519PrivateKey | None = None,
        expires_in: timedelta = timedelta(days=30),
        channel: str = "stable",
    ) -> dict:
        key = key or self.key
        self.sequence += 1
        now = datetime.now(UTC).replace(microsecond=0)
        statement = ChannelStatement(
            channel=channel,
            sequence=self.sequence,
            version=version,
            release=release,
            bundle_id="0" * 16,
            manifest_sha256=manifest_sha,
            tar_sha256=tar_sha,
            tar_size=tar_size,
            task=task,
            action=action,
            issued_at=now.isoformat(),
            expires_at=(now + expires_in).isoformat(),
            key_fingerprint=signing.public_key_fingerprint(key),
        )
        signed = SignedStatement.sign(statement, key)
        self.answer = {
            "channel": "stable",
            "version": version,
            "bundle_id": "0" * 16,
            "tar_sha256": tar_sha,
            "tar_size": tar_size,
            "download_path": f"/v1/bundles/{version}/bundle.tar",
            "statement": signed.statement,
            "signature": signed.signature,
        }
        return self.answer

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.override is not None:
            return self.override(request)
        path = request.url.path
        if path == "/v1/channels/stable/current":
            return httpx.Response(200, json=self.answer) if self.answer else httpx.Response(404)
        if path == "/v1/devices/me/status":
            return httpx.Response(204)
        if path.startswith("/v1/bundles/"):
            version = path.split("/")[3]
            return httpx.Response(200, content=self.tars[version])
        return httpx.Response(404)

    def downloads(self) -> int:
        return sum(r.url.path.startswith("/v1/bundles/") for r in self.requests)


@pytest.fixture
def fake(tmp_path: Path) -> FakeRegistry:
    return FakeRegistry(tmp_path)


def _agent(fake: FakeRegistry, **overrides) -> Iterator[Agent]:
    config = AgentConfig(
        **{
            "server": "http://registry.test",
            "channel": "stable",
            "dir": fake.tmp / "device",
            "token": "fedge_dev_x",
            "trusted_key": fake.public,
            **overrides,
        }
    )
    client = httpx.Client(base_url=config.server, transport=httpx.MockTransport(fake.handle))
    return Agent(config, client)


def poll(fake: FakeRegistry, **overrides):
    agent = _agent(fake, **overrides)
    try:
        return agent.poll()
    finally:
        agent.close()


# ---------------------------------------------------------------- finding 5: downgrades


def test_replayed_older_statement_is_refused(fake: FakeRegistry) -> None:
    """2.0.0 -> 1.0.0 by replaying the signed answer of 1.0.0: the sequence went back."""
    old = fake.bundle("1.0.0", release=1)
    assert poll(fake).active_version == "1.0.0"
    fake.bundle("2.0.0", release=2, seed=2)
    assert poll(fake).active_version == "2.0.0"
    fake.answer = old  # what the registry said before: validly signed, but old
    result = poll(fake)
    assert (result.action, result.active_version) == ("refused", "2.0.0")
    assert "replays an old statement" in (result.error or "")


def test_downgrade_needs_a_signed_rollback(fake: FakeRegistry) -> None:
    fake.bundle("1.0.0", release=1)
    poll(fake)
    fake.bundle("2.0.0", release=2, seed=2)
    poll(fake)
    # A fresh statement (higher sequence) for the older release, but not a rollback.
    fake.bundle("1.0.0", release=1)
    result = poll(fake)
    assert (result.action, result.active_version) == ("refused", "2.0.0")
    assert "refusing the downgrade" in (result.error or "")
    # The operator's explicit rollback is signed as such: accepted.
    fake.bundle("1.0.0", release=1, action="rollback")
    result = poll(fake)
    assert (result.action, result.active_version) == ("activated", "1.0.0")


def test_statement_signed_by_another_key_is_refused(fake: FakeRegistry) -> None:
    fake.bundle("1.0.0", release=1)
    poll(fake)
    other = signing.Ed25519PrivateKey.generate()
    answer = fake.bundle("2.0.0", release=2, seed=2)
    fake.sign("2.0.0", 2, "a" * 64, answer["tar_sha256"], answer["tar_size"], key=other)
    result = poll(fake)
    assert (result.action, result.active_version) == ("bad-answer", "1.0.0")
    assert "not signed by the key this device trusts" in (result.error or "")
    assert fake.downloads() == 1


def test_expired_statement_is_refused_as_frozen(fake: FakeRegistry) -> None:
    fake.bundle("1.0.0", release=1)
    poll(fake)
    answer = fake.bundle("2.0.0", release=2, seed=2)
    manifest_sha = json.loads(answer["statement"])["manifest_sha256"]
    stale = timedelta(seconds=-1)
    fake.sign("2.0.0", 2, manifest_sha, answer["tar_sha256"], answer["tar_size"], expires_in=stale)
    result = poll(fake)
    assert (result.action, result.active_version) == ("refused", "1.0.0")
    assert "expired" in (result.error or "")


def test_bundle_for_another_task_is_refused_unless_allowed(fake: FakeRegistry) -> None:
    fake.bundle("1.0.0", release=1)
    poll(fake)
    fake.bundle("2.0.0", release=2, seed=2, kind="tabular")
    result = poll(fake)
    assert (result.action, result.active_version) == ("refused", "1.0.0")
    assert "task 'tabular'" in (result.error or "")
    assert poll(fake, allow_task_change=True).active_version == "2.0.0"


def test_statement_for_another_channel_is_refused(fake: FakeRegistry) -> None:
    answer = fake.bundle("1.0.0", release=1)
    statement = json.loads(answer["statement"])
    fake.sign("1.0.0", 1, statement["manifest_sha256"], answer["tar_sha256"],
              answer["tar_size"], channel="canary")  # fmt: skip
    result = poll(fake)
    assert result.action == "refused" and "channel 'canary'" in (result.error or "")


def test_bundle_swapped_under_a_valid_statement_is_refused(fake: FakeRegistry) -> None:
    """The registry serves another validly signed bundle than the statement names."""
    fake.bundle("1.0.0", release=1)
    answer = fake.bundle("2.0.0", release=2, seed=2)
    other = make_bundle(fake.tmp / "other", fake.private, "2.0.0", seed=9)
    tar = pack_bundle(other, fake.tmp / "other.tar")
    fake.tars["2.0.0"] = tar.read_bytes()
    statement = json.loads(answer["statement"])
    fake.sign("2.0.0", 2, statement["manifest_sha256"], sha256_file(tar), tar.stat().st_size)
    result = poll(fake)
    assert result.action == "refused" and "not the one the operator signed" in result.error


# ---------------------------------------------------------------- finding 6: nothing raises


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _serve_tar(fake: FakeRegistry, version: str, data: bytes, release: int = 1) -> None:
    fake.tars[version] = data
    fake.sign(version, release, "b" * 64, hashlib.sha256(data).hexdigest(), len(data))


def test_file_and_folder_of_one_name_is_a_remembered_refusal(fake: FakeRegistry) -> None:
    data = _tar([("manifest.json", b"{}"), ("artifacts", b"x"), ("artifacts/x", b"y")])
    _serve_tar(fake, "1.0.0", data)
    result = poll(fake)
    assert (result.action, result.health) == ("refused", "failed")
    assert "both a file and a folder" in (result.error or "")
    assert poll(fake).action == "refused" and fake.downloads() == 1


def test_non_json_answer_is_a_result_not_a_crash(fake: FakeRegistry) -> None:
    fake.override = lambda r: httpx.Response(200, content=b"<html>proxy login</html>")
    assert poll(fake).action == "bad-answer"
    fake.override = lambda r: httpx.Response(200, json=[1, 2])
    assert poll(fake).action == "bad-answer"
    fake.override = lambda r: httpx.Response(200, json={"version": "1"})
    assert poll(fake).action == "bad-answer"


def test_full_disk_is_a_remembered_refusal(fake: FakeRegistry, monkeypatch) -> None:
    fake.bundle("1.0.0", release=1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(agent_module, "unpack_bundle", no_space)
    result = poll(fake)
    assert result.action == "refused" and "No space left" in (result.error or "")
    assert "1.0.0" in AgentDir(fake.tmp / "device").refusals()
    assert poll(fake).action == "refused" and fake.downloads() == 1


def test_agent_loop_survives_an_unexpected_error(fake: FakeRegistry, monkeypatch) -> None:
    fake.bundle("1.0.0", release=1)

    def bug(*args, **kwargs):
        raise RuntimeError("unexpected")

    agent = _agent(fake)
    monkeypatch.setattr(agent, "_wanted", bug)
    assert agent.poll().action == "refused"
    agent.close()


# ---------------------------------------------------------------- finding 7: names and hosts


def test_version_names_from_the_network_never_become_paths(fake: FakeRegistry) -> None:
    fake.bundle("1.0.0", release=1)
    fake.answer = {**fake.answer, "version": "../../current"}
    result = poll(fake)
    assert result.action == "bad-answer" and "not a valid name" in (result.error or "")
    with pytest.raises(BundleError, match="not safe"):
        AgentDir(fake.tmp / "device").version_dir("../..")
    assert fake.downloads() == 0


def test_absolute_download_path_does_not_leave_the_registry(fake: FakeRegistry) -> None:
    fake.bundle("1.0.0", release=1)
    fake.answer = {**fake.answer, "download_path": "https://attacker.example/steal"}
    assert poll(fake).active_version == "1.0.0"
    assert {r.url.host for r in fake.requests} == {"registry.test"}


# ---------------------------------------------------------------- finding 8: sizes


def test_download_stops_at_the_signed_size(fake: FakeRegistry) -> None:
    fake.bundle("1.0.0", release=1)
    size = fake.answer["tar_size"]
    sent = []

    def endless() -> Iterator[bytes]:
        while True:
            sent.append(1)
            yield b"\0" * (1 << 16)

    real = fake.handle

    def routed(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/bundles/"):
            fake.requests.append(request)
            return httpx.Response(200, content=endless())
        return real(request)

    fake.handle = routed  # type: ignore[method-assign]
    result = poll(fake)
    assert result.action == "refused" and "larger than the" in (result.error or "")
    assert len(sent) * (1 << 16) <= size + (2 << 20)  # stopped early, not at 2 GiB
    assert list((fake.tmp / "device" / "incoming").iterdir()) == []


def test_oversized_pax_header_is_refused_before_tarfile_reads_it(tmp_path: Path) -> None:
    from fedge.shared.bundle import unpack_bundle

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        info.pax_headers = {"comment": "x" * (1 << 20)}
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "pax.tar").write_bytes(buffer.getvalue())
    with pytest.raises(BundleError, match="pax"):
        unpack_bundle(tmp_path / "pax.tar", tmp_path / "out")


# ---------------------------------------------------------------- finding 9: clearing refusals


def test_refusal_is_cleared_by_command_or_by_a_new_build(fake: FakeRegistry) -> None:
    import typer

    from fedge.cli.deploy import register

    fake.bundle("1.0.0", release=1, break_self_test=True)
    assert poll(fake).action == "refused"
    assert poll(fake).action == "refused" and fake.downloads() == 1

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    done = runner.invoke(app, ["agent-clear-refusal", "1.0.0", "--dir", str(fake.tmp / "device")])
    assert done.exit_code == 0, done.output
    assert "1.0.0" in done.output
    assert poll(fake).action == "refused" and fake.downloads() == 2  # tried again
    nothing = runner.invoke(app, ["agent-clear-refusal", "9.9", "--dir", str(fake.tmp / "device")])
    assert nothing.exit_code != 0

    # A new build of the same version (another tar sha256) is tried without any command.
    fake.bundle("1.0.0", release=1, seed=5)
    assert poll(fake).action == "activated" and fake.downloads() == 3


def test_huge_answer_is_not_read_into_memory(fake: FakeRegistry) -> None:
    sent = []

    def endless() -> Iterator[bytes]:
        while True:
            sent.append(1)
            yield b" " * (1 << 16)

    fake.override = lambda r: httpx.Response(200, content=endless())
    result = poll(fake)
    assert result.action == "bad-answer" and "over 65536 bytes" in (result.error or "")
    assert len(sent) <= 3
