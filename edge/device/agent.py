"""The over-the-air update agent: poll the registry, verify, self-test, activate, roll back.

One poll (``run_agent_once``): ask the registry which version the channel wants
and check the operator's signed channel statement that comes with the answer
(signature, channel, sequence never going back, not expired, release not older
than the highest this device ran unless it is a signed rollback, same task);
if it names another version than the active one, download at most the signed
size into ``incoming/`` while hashing, check the signed sha256, unpack it,
verify its signature and hashes against the one trusted key, self-test every
artifact this device can run, install it with one rename and swap ``current``;
then load it again through ``current`` as a health check and roll back to the
previous version if that fails. A refused build (version + tar sha256) is
remembered, not downloaded again every poll, and reported; a new build of the
version or ``fedge edge agent-clear-refusal`` lifts it. Nothing a registry
sends makes ``poll`` raise, except a refused token. Torch-free.
"""

import hashlib
import logging
import math
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedge.edge.device.activation import AgentDir
from fedge.edge.device.selection import CHOICE_FILE, choose_and_record
from fedge.shared.bundle import MANIFEST, self_test_inputs, unpack_bundle, verify_bundle
from fedge.shared.errors import (
    BundleError,
    ConfigError,
    ConnectionFailed,
    FedgeError,
    SecurityError,
)
from fedge.shared.fleet_protocol import (
    ChannelStatement,
    CurrentVersion,
    ProtocolError,
    StatusReport,
    bundle_download_path,
    is_channel,
    parse_json,
    printable,
)
from fedge.shared.signing import Ed25519PublicKey, load_public_key

log = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = 2 << 30
MAX_ANSWER_BYTES = 64 << 10
HealthCheck = Callable[[Path, Path], None]


# Longest wait between polls or for one answer: a day (a longer one is a typo, not a plan).
MAX_INTERVAL_S = 86_400.0


@dataclass(frozen=True)
class AgentConfig:
    """Everything one agent needs; read once from the command line."""

    server: str
    channel: str
    dir: Path
    token: str = field(repr=False)
    trusted_key: Path
    ca: Path | None = None
    interval: float = 10.0
    timeout: float = 60.0
    keep_versions: int = 3
    # The task this device serves (None: the task of the active bundle, once there is one);
    # a bundle for another task is refused unless allow_task_change.
    task: str | None = None
    allow_task_change: bool = False

    def __post_init__(self) -> None:
        # time.sleep(inf) and Event.wait(inf) raise OverflowError mid-loop; NaN never waits.
        for name in ("interval", "timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_INTERVAL_S):
                raise ConfigError(f"--{name} must be above 0 and at most {MAX_INTERVAL_S:g} s")
        if not is_channel(self.channel):
            raise ConfigError(f"channel {self.channel!r} is not a valid channel name")
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"--dir {self.dir} is a file; give the agent's directory")


@dataclass(frozen=True)
class AgentResult:
    """The outcome of one poll."""

    # up-to-date | activated | refused | rolled-back | no-version | unreachable | bad-answer
    action: str
    active_version: str | None
    wanted_version: str | None
    health: str  # ok | degraded | failed | no-model
    error: str | None = None
    reported: bool = False


def make_client(config: AgentConfig) -> httpx.Client:
    """An HTTP client for the registry: bearer token, the server CA pinned when given."""
    import ssl

    verify: ssl.SSLContext | bool = True
    if config.ca is not None:
        verify = ssl.create_default_context(cafile=str(config.ca))
    if config.server.startswith("http://"):
        log.warning(
            "registry %s without TLS: the device token travels in clear text", config.server
        )
    return httpx.Client(
        base_url=config.server.rstrip("/"),
        verify=verify,
        timeout=config.timeout,
        headers={"Authorization": f"Bearer {config.token}"},
    )


def default_health_check(bundle_dir: Path, trusted_key: Path) -> None:
    """Load every artifact this device can run and pass its self-test; raise if not."""
    from fedge.edge.device.runtime import EdgeModel, available_formats

    manifest = verify_bundle(bundle_dir, trusted_key)
    runnable = [a for a in manifest.artifacts if a.passed and a.format in available_formats()]
    if not runnable:
        raise BundleError(f"bundle {manifest.version}: no artifact this device can run")
    for artifact in runnable:
        try:
            with EdgeModel.open(bundle_dir, trusted_key, artifact=artifact.file) as model:
                result = model.self_test()
        except FedgeError:
            raise
        except Exception as e:  # a runtime failing mid-inference raises its own types
            raise BundleError(
                f"bundle {manifest.version}: {artifact.file} fails to run: {e}"
            ) from e
        if not result.passed:
            raise BundleError(
                f"bundle {manifest.version}: self-test of {artifact.file} failed ({result.detail})"
            )


def measure_latency(
    bundle_dir: Path, trusted_key: Path, runs: int = 30, artifact: str | None = None
) -> dict[str, float]:
    """p50/p99 ms of one-example predictions of ``artifact`` (default: the runtime's
    default) on the self-test inputs."""
    from fedge.edge.device.runtime import EdgeModel

    with EdgeModel.open(bundle_dir, trusted_key, artifact=artifact) as model:
        inputs = self_test_inputs(model.manifest)
        times = []
        for i in range(runs):
            x = inputs[i % len(inputs) : i % len(inputs) + 1]
            start = time.perf_counter()
            model.predict_tensor(x)
            times.append((time.perf_counter() - start) * 1000)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}


class StatementRefused(BundleError):
    """The registry's answer is not backed by a valid, fresh operator statement."""


@dataclass(frozen=True)
class Wanted:
    """What the channel serves, as the operator signed it."""

    answer: CurrentVersion
    statement: ChannelStatement

    @property
    def version(self) -> str:
        return self.statement.version


class Agent:
    """State and steps of one agent; ``poll`` is one iteration of the loop."""

    def __init__(
        self,
        config: AgentConfig,
        client: httpx.Client | None = None,
        health_check: HealthCheck | None = None,
    ) -> None:
        self.config = config
        self.dir = AgentDir(config.dir)
        self.client = client or make_client(config)
        self.health_check = health_check or default_health_check
        # Fail now on a missing or wrong trusted key, not as a "refused" bundle later.
        self.key: Ed25519PublicKey = load_public_key(config.trusted_key)
        self.dir.prepare()

    def poll(self) -> AgentResult:
        """Ask, update if needed, report. Whatever the registry sends is a result, not a raise.

        Raises
        ------
        SecurityError
            The registry refused this device's token (401 unknown, 403 revoked), or the
            trusted key is unusable.
        """
        try:
            result = self._poll()
        except SecurityError:
            raise
        except Exception as e:  # a bug or an OS error must not end the agent's loop
            log.exception("poll failed")
            active = self.dir.active()
            result = AgentResult("refused", active, None, _degraded(active), _brief(e))
        return self._report(result)

    def _poll(self) -> AgentResult:
        state = self.dir.load_state()
        active = self.dir.active()
        try:
            wanted = self._wanted()
        except ConnectionFailed as e:
            return AgentResult("unreachable", active, None, _health(active), str(e))
        except (ProtocolError, StatementRefused) as e:
            log.warning("registry answer refused: %s", e)
            return AgentResult("bad-answer", active, None, _degraded(active), str(e))
        if wanted is None:
            return AgentResult("no-version", active, None, _health(active))
        try:
            self._check_statement(wanted.statement, state, active)
        except StatementRefused as e:
            log.warning("refusing the channel statement for %s: %s", wanted.version, e)
            return AgentResult("refused", active, wanted.version, _degraded(active), str(e))
        if wanted.version == active:
            self._remember_statement(state, wanted.statement)
            self.dir.save_state(state)
            return AgentResult("up-to-date", active, active, "ok")
        refusal = _refusal(state, wanted.statement)
        if refusal is not None:
            return AgentResult("refused", active, wanted.version, _degraded(active), refusal)
        return self._update(wanted, state)

    # -- steps ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
        """Send a request; return its status and at most 4 KiB of its body, as text."""
        try:
            with self.client.stream(method, path, **kwargs) as response:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > 4096:
                        break
                detail = printable(body[:300].decode("utf-8", "replace"))
                self._check_auth(response, detail)
                return response.status_code, detail
        except httpx.HTTPError as e:
            raise ConnectionFailed(f"registry {self.config.server} unreachable: {e}") from e

    @staticmethod
    def _check_auth(response: httpx.Response, detail: str) -> None:
        if response.status_code == 401:
            raise SecurityError(
                "the registry does not know this device's token (401)",
                hint="check --token/--token-file, or enroll the device again",
            )
        if response.status_code == 403:
            raise SecurityError(
                f"the registry refused this device (403): {detail}",
                hint="the device was revoked, or may not follow this channel; ask the operator",
            )

    def _wanted(self) -> Wanted | None:
        status, body = self._get_small(f"/v1/channels/{self.config.channel}/current")
        if status == 404:
            return None
        if status != 200:
            raise ConnectionFailed(f"registry answered {status}: {body[:300]!r}")
        answer = CurrentVersion.from_dict(parse_json(body, "the registry's answer"))
        signed = answer.signed()
        if signed is None:
            raise StatementRefused(
                f"the registry sent version {answer.version} without a signed channel statement",
                hint="on the server: `fedge registry refresh --channel CHANNEL`",
            )
        try:
            statement = signed.verify(self.key)
        except SecurityError as e:  # the answer's fault, not the device's key
            raise StatementRefused(str(e), hint=e.hint) from e
        if statement.version != answer.version:
            raise StatementRefused(
                f"the registry announced {answer.version} but the operator signed "
                f"{statement.version}"
            )
        return Wanted(answer, statement)

    def _get_small(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` reading at most ``MAX_ANSWER_BYTES`` (a registry may send anything)."""
        try:
            with self.client.stream("GET", path) as response:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise ProtocolError(
                            f"the registry's answer is over {MAX_ANSWER_BYTES} bytes"
                        )
                self._check_auth(response, printable(body[:300].decode("utf-8", "replace")))
                return response.status_code, bytes(body)
        except httpx.HTTPError as e:
            raise ConnectionFailed(f"registry {self.config.server} unreachable: {e}") from e

    def _check_statement(
        self, statement: ChannelStatement, state: dict[str, Any], active: str | None
    ) -> None:
        """Refuse replayed, stale, foreign-channel, other-task and downgrading statements."""
        if statement.channel != self.config.channel:
            raise StatementRefused(
                f"the statement is for channel {statement.channel!r}, this device follows "
                f"{self.config.channel!r}"
            )
        seen = state.get("statements", {}).get(statement.channel, {})
        last = int(seen.get("sequence", 0))
        if statement.sequence < last:
            raise StatementRefused(
                f"the registry replays an old statement (sequence {statement.sequence} < {last}"
                f" already seen); refusing version {statement.version}"
            )
        if statement.sequence == last and seen.get("sha256") != _statement_sha(statement):
            raise StatementRefused(f"two different statements carry sequence {last}")
        if statement.expired():
            raise StatementRefused(
                f"the channel statement expired at {statement.expires_at} (a frozen or stale "
                "registry); keeping the active version",
                hint="the operator re-signs with `fedge registry refresh --channel CHANNEL`",
            )
        if statement.version == active:
            return
        floor = int(state.get("highest_release", 0))
        if statement.release < floor and not statement.is_rollback:
            raise StatementRefused(
                f"version {statement.version} (release {statement.release}) is older than "
                f"release {floor} this device already ran, and the operator did not sign it as "
                "a rollback; refusing the downgrade",
                hint="to go back on purpose: `fedge registry rollback` or `fedge registry "
                "promote VERSION --rollback`",
            )
        expected = self.config.task or state.get("task")
        if expected and statement.task != expected and not self.config.allow_task_change:
            raise StatementRefused(
                f"version {statement.version} is for task {statement.task!r}, this device "
                f"serves {expected!r}; refusing it",
                hint="start the agent with --allow-task-change to switch tasks on purpose",
            )

    def _remember_statement(self, state: dict[str, Any], statement: ChannelStatement) -> None:
        state.setdefault("statements", {})[statement.channel] = {
            "sequence": statement.sequence,
            "sha256": _statement_sha(statement),
        }

    def _update(self, wanted: Wanted, state: dict[str, Any]) -> AgentResult:
        statement = wanted.statement
        version, previous = statement.version, self.dir.active()
        try:
            staged = self._local_copy(statement) or self._download(statement)
            self.health_check(staged, self.config.trusted_key)
            if staged.parent == self.dir.incoming:
                self.dir.install(staged, version)
        except SecurityError:
            raise  # the trusted key itself is unusable: a device problem, not the bundle's
        except ConnectionFailed as e:
            # Transient: try again next poll rather than remembering a refusal.
            log.warning("could not fetch version %s: %s", version, e)
            return AgentResult("unreachable", previous, version, _health(previous), str(e))
        except Exception as e:  # anything a bundle or the disk does is a refusal
            message = str(e) if isinstance(e, FedgeError) else _brief(e)
            log.warning("refusing version %s: %s", version, message)
            self._refuse(state, statement, message)
            return AgentResult("refused", previous, version, _degraded(previous), message)
        finally:
            self._clear_incoming()

        self.dir.activate(version)
        try:
            # Check what `current` now serves, the way `edge serve` will load it.
            self.health_check(self.dir.current_link, self.config.trusted_key)
        except FedgeError as e:
            return self._roll_back(statement, previous, state, e)
        try:
            # Measure the verified artifacts here, on the device, once per version: `edge
            # serve --agent-dir` serves the recorded fastest one, and the fleet view shows it.
            choice = choose_and_record(
                self.dir.current_link, self.config.trusted_key, self.dir.root / CHOICE_FILE
            )
            state["artifact"] = {"file": choice.file, "reason": choice.reason}
            state["latency"] = measure_latency(
                self.dir.current_link, self.config.trusted_key, artifact=choice.file
            )
        except Exception as e:  # figures for the fleet view; never a reason to roll back
            log.warning("could not measure the artifacts of %s: %s", version, e)
        state["previous"] = previous
        state["highest_release"] = max(int(state.get("highest_release", 0)), statement.release)
        state["task"] = statement.task
        self._remember_statement(state, statement)
        state.get("refused", {}).pop(version, None)
        self.dir.save_state(state)
        self.dir.prune(self.config.keep_versions, {version, *([previous] if previous else [])})
        log.info("activated version %s (was %s)", version, previous)
        return AgentResult("activated", version, version, "ok")

    def _refuse(self, state: dict[str, Any], statement: ChannelStatement, message: str) -> None:
        """Remember a refused build: its tar sha256 lets a new build of the version through."""
        state.setdefault("refused", {})[statement.version] = {
            "tar_sha256": statement.tar_sha256,
            "error": message[:2000],
        }
        self.dir.save_state(state)

    def _roll_back(
        self,
        statement: ChannelStatement,
        previous: str | None,
        state: dict[str, Any],
        error: FedgeError,
    ) -> AgentResult:
        version = statement.version
        message = f"version {version} failed its health check after activation: {error}"
        log.error("%s; rolling back to %s", message, previous)
        if previous is not None:
            self.dir.activate(previous)
        else:
            self.dir.deactivate()
        self.dir.remove(version)
        self._refuse(state, statement, message)
        return AgentResult("rolled-back", previous, version, _degraded(previous), message)

    def _local_copy(self, statement: ChannelStatement) -> Path | None:
        """An installed copy of the signed version (a channel rollback) that still verifies."""
        path = self.dir.version_dir(statement.version)
        if not path.is_dir():
            return None
        try:
            verify_bundle(path, self.key)
            _check_matches(path, statement)
        except BundleError as e:
            log.warning("installed copy of %s does not match (%s); downloading it", path.name, e)
            return None
        return path

    def _download(self, statement: ChannelStatement) -> Path:
        """Stream at most the signed size into ``incoming/`` while hashing; unpack and verify."""
        version, size = statement.version, statement.tar_size
        if size > MAX_DOWNLOAD_BYTES:
            raise BundleError(f"bundle {version} is {size} bytes, over the download limit")
        tar = self.dir.incoming / f"{uuid.uuid4().hex}.tar"
        digest, received = hashlib.sha256(), 0
        try:
            with self.client.stream("GET", bundle_download_path(version)) as response:
                if response.status_code != 200:
                    raise ConnectionFailed(
                        f"download of {version} failed: HTTP {response.status_code}"
                    )
                with open(tar, "wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        received += len(chunk)
                        if received > size:
                            raise BundleError(
                                f"download of {version} is larger than the {size} bytes the "
                                "operator signed; stopped"
                            )
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.HTTPError as e:
            raise ConnectionFailed(f"download of {version} interrupted: {e}") from e
        if received != size or digest.hexdigest() != statement.tar_sha256:
            raise BundleError(
                f"download of {version} does not match the sha256 the operator signed (corrupt "
                "in transit or on the server); refusing it"
            )
        staged = unpack_bundle(tar, self.dir.incoming / uuid.uuid4().hex, max_bytes=size)
        tar.unlink()
        verify_bundle(staged, self.key)
        _check_matches(staged, statement)
        return staged

    def _clear_incoming(self) -> None:
        for path in self.dir.incoming.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _report(self, result: AgentResult) -> AgentResult:
        state = self.dir.load_state()
        latency = self.dir.serve_stats(max_age_s=max(120.0, 3 * self.config.interval))
        source = "serve" if latency else "self-test"
        latency = latency or state.get("latency") or {}
        report = StatusReport(
            channel=self.config.channel,
            active_version=result.active_version,
            health=result.health,
            latency_p50_ms=_finite(latency.get("p50")),
            latency_p99_ms=_finite(latency.get("p99")),
            last_error=_printable_error(result.error),
            detail={
                "action": result.action,
                "wanted": result.wanted_version,
                "latency_source": source if latency else None,
                "artifact": (state.get("artifact") or {}).get("file"),
                "artifact_reason": (state.get("artifact") or {}).get("reason"),
            },
        )
        try:
            status, detail = self._request("POST", "/v1/devices/me/status", json=report.to_dict())
        except ConnectionFailed as e:
            log.warning("status report failed: %s", e)
            return result
        if status != 204:
            log.warning("status report refused: %s %s", status, detail)
            return result
        return AgentResult(**{**result.__dict__, "reported": True})

    def close(self) -> None:
        self.client.close()


def _check_matches(bundle_dir: Path, statement: ChannelStatement) -> None:
    """The verified bundle must be the one the operator's statement names."""
    manifest_sha = hashlib.sha256((bundle_dir / MANIFEST).read_bytes()).hexdigest()
    if manifest_sha != statement.manifest_sha256:
        raise BundleError(
            f"the bundle sent as {statement.version} is not the one the operator signed for the "
            "channel (manifest sha256 differs); refusing it"
        )


def _statement_sha(statement: ChannelStatement) -> str:
    return hashlib.sha256(statement.canonical()).hexdigest()


def _health(active: str | None) -> str:
    return "ok" if active else "no-model"


def _degraded(active: str | None) -> str:
    return "degraded" if active else "failed"


def _refusal(state: dict[str, Any], statement: ChannelStatement) -> str | None:
    """The remembered error if this exact build (version + tar sha256) was refused before."""
    entry = state.get("refused", {}).get(statement.version)
    if not isinstance(entry, dict) or entry.get("tar_sha256") != statement.tar_sha256:
        return None  # never refused, or the registry now serves a new build: try it
    return str(entry.get("error") or "refused earlier")


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if 0 <= number < 1e7 else None


def _printable_error(text: str | None) -> str | None:
    """An error message the registry accepts: printable, at most 2000 characters."""
    if not text:
        return None
    cleaned = "".join(ch if ch.isprintable() or ch in "\n\t" else "?" for ch in text)
    return cleaned[:2000]


def run_agent_once(
    config: AgentConfig,
    client: httpx.Client | None = None,
    health_check: HealthCheck | None = None,
) -> AgentResult:
    """One poll of the agent (holding the directory's lock): check, update, report.

    Parameters
    ----------
    config
        The agent's settings.
    client
        An HTTP client to use (tests); by default one is made from ``config``.
    health_check
        ``(bundle_dir, trusted_key) -> None`` that raises ``FedgeError`` when a bundle
        must not run; default: load and self-test every runnable artifact.

    Raises
    ------
    SecurityError
        The registry refused this device (401/403) or the trusted key is unusable.
    """
    agent_dir = AgentDir(config.dir)
    with agent_dir.exclusive():
        agent = Agent(config, client, health_check)
        try:
            return agent.poll()
        finally:
            if client is None:
                agent.close()


def run_agent(
    config: AgentConfig,
    stop: threading.Event | None = None,
    on_result: Callable[[AgentResult], None] | None = None,
) -> None:
    """Poll every ``config.interval`` seconds (±10 % jitter) until ``stop`` is set.

    Raises
    ------
    SecurityError
        The registry refused this device: polling on would not help.
    """
    stop = stop or threading.Event()
    with AgentDir(config.dir).exclusive():
        agent = Agent(config)
        try:
            while not stop.is_set():
                result = agent.poll()  # never raises but for a refused token or key
                if on_result is not None:
                    on_result(result)
                # Jitter keeps a fleet that was started together from polling in lockstep.
                stop.wait(config.interval * random.uniform(0.9, 1.1))
        finally:
            agent.close()
