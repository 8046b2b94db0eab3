"""The over-the-air update agent: poll the registry, verify, self-test, activate, roll back.

One poll (``run_agent_once``): ask the registry which version the channel wants;
if it differs from the active one, download the tar into ``incoming/``, check
its sha256, unpack it, verify its signature and hashes against the one trusted
key, self-test every artifact this device can run, install it with one rename
and swap ``current``; then load it again through ``current`` as a health check
and roll back to the previous version if that fails. A refused version is
remembered (not downloaded again every poll) and reported. Torch-free.
"""

import hashlib
import logging
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
from fedge.shared.bundle import self_test_inputs, unpack_bundle, verify_bundle
from fedge.shared.errors import BundleError, ConnectionFailed, FedgeError, SecurityError
from fedge.shared.signing import load_public_key

log = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = 2 << 30
HealthCheck = Callable[[Path, Path], None]


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


@dataclass(frozen=True)
class AgentResult:
    """The outcome of one poll."""

    action: str  # up-to-date | activated | refused | rolled-back | no-version | unreachable
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


def measure_latency(bundle_dir: Path, trusted_key: Path, runs: int = 30) -> dict[str, float]:
    """p50/p99 ms of one-example predictions of the default artifact on the self-test inputs."""
    from fedge.edge.device.runtime import EdgeModel

    with EdgeModel.open(bundle_dir, trusted_key) as model:
        inputs = self_test_inputs(model.manifest)
        times = []
        for i in range(runs):
            x = inputs[i % len(inputs) : i % len(inputs) + 1]
            start = time.perf_counter()
            model.predict_tensor(x)
            times.append((time.perf_counter() - start) * 1000)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}


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
        load_public_key(config.trusted_key)
        self.dir.prepare()

    def poll(self) -> AgentResult:
        """Ask, update if needed, report. Network failures are results, not exceptions.

        Raises
        ------
        SecurityError
            The registry refused this device's token (401 unknown, 403 revoked).
        """
        state = self.dir.load_state()
        try:
            wanted = self._wanted()
        except ConnectionFailed as e:
            active = self.dir.active()
            return AgentResult("unreachable", active, None, _health(active), str(e))
        if wanted is None:
            result = AgentResult("no-version", self.dir.active(), None, _health(self.dir.active()))
        elif wanted["version"] == self.dir.active():
            result = AgentResult("up-to-date", wanted["version"], wanted["version"], "ok")
        elif _refused(state, wanted):
            active = self.dir.active()
            error = state["refused"][wanted["version"]]["error"]
            result = AgentResult("refused", active, wanted["version"], _degraded(active), error)
        else:
            result = self._update(wanted, state)
        return self._report(result)

    # -- steps ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ConnectionFailed(f"registry {self.config.server} unreachable: {e}") from e
        if response.status_code == 401:
            raise SecurityError(
                "the registry does not know this device's token (401)",
                hint="check --token/--token-file, or enroll the device again",
            )
        if response.status_code == 403:
            raise SecurityError(
                f"the registry refused this device (403): {_detail(response)}",
                hint="the device was revoked; ask the operator",
            )
        return response

    def _wanted(self) -> dict[str, Any] | None:
        response = self._request("GET", f"/v1/channels/{self.config.channel}/current")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ConnectionFailed(f"registry answered {response.status_code}: {_detail(response)}")
        return dict(response.json())

    def _update(self, wanted: dict[str, Any], state: dict[str, Any]) -> AgentResult:
        version, previous = str(wanted["version"]), self.dir.active()
        try:
            staged = self._local_copy(version) or self._download(wanted)
            self.health_check(staged, self.config.trusted_key)
            if staged.parent == self.dir.incoming:
                self.dir.install(staged, version)
        except SecurityError:
            raise  # the trusted key itself is unusable: a device problem, not the bundle's
        except ConnectionFailed as e:
            # Transient: try again next poll rather than remembering a refusal.
            log.warning("could not fetch version %s: %s", version, e)
            return AgentResult("unreachable", previous, version, _health(previous), str(e))
        except FedgeError as e:
            log.warning("refusing version %s: %s", version, e)
            state.setdefault("refused", {})[version] = {
                "tar_sha256": wanted.get("tar_sha256"),
                "error": str(e),
            }
            self.dir.save_state(state)
            return AgentResult("refused", previous, version, _degraded(previous), str(e))
        finally:
            self._clear_incoming()

        self.dir.activate(version)
        try:
            # Check what `current` now serves, the way `edge serve` will load it.
            self.health_check(self.dir.current_link, self.config.trusted_key)
        except FedgeError as e:
            return self._roll_back(version, previous, state, e)
        try:
            state["latency"] = measure_latency(self.dir.current_link, self.config.trusted_key)
        except Exception as e:  # a figure for the fleet view; never a reason to roll back
            log.warning("could not measure latency of %s: %s", version, e)
        state["previous"] = previous
        state.get("refused", {}).pop(version, None)
        self.dir.save_state(state)
        self.dir.prune(self.config.keep_versions, {version, *([previous] if previous else [])})
        log.info("activated version %s (was %s)", version, previous)
        return AgentResult("activated", version, version, "ok")

    def _roll_back(
        self, version: str, previous: str | None, state: dict[str, Any], error: FedgeError
    ) -> AgentResult:
        message = f"version {version} failed its health check after activation: {error}"
        log.error("%s; rolling back to %s", message, previous)
        if previous is not None:
            self.dir.activate(previous)
        else:
            self.dir.deactivate()
        self.dir.remove(version)
        state.setdefault("refused", {})[version] = {"tar_sha256": None, "error": message}
        self.dir.save_state(state)
        return AgentResult("rolled-back", previous, version, _degraded(previous), message)

    def _local_copy(self, version: str) -> Path | None:
        """An installed copy of ``version`` (a channel rollback) that still verifies."""
        path = self.dir.version_dir(version)
        if not path.is_dir():
            return None
        try:
            verify_bundle(path, self.config.trusted_key)
        except BundleError as e:
            log.warning("installed copy of %s no longer verifies (%s); downloading it", version, e)
            return None
        return path

    def _download(self, wanted: dict[str, Any]) -> Path:
        """Stream the tar into ``incoming/``, check its sha256, unpack and verify it."""
        version, size = str(wanted["version"]), int(wanted["tar_size"])
        if size > MAX_DOWNLOAD_BYTES:
            raise BundleError(f"bundle {version} is {size} bytes, over the download limit")
        tar = self.dir.incoming / f"{uuid.uuid4().hex}.tar"
        digest, received = hashlib.sha256(), 0
        try:
            with self.client.stream("GET", str(wanted["download_path"])) as response:
                if response.status_code != 200:
                    raise ConnectionFailed(
                        f"download of {version} failed: HTTP {response.status_code}"
                    )
                with open(tar, "wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        received += len(chunk)
                        if received > size:
                            raise BundleError(f"download of {version} is larger than announced")
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.HTTPError as e:
            raise ConnectionFailed(f"download of {version} interrupted: {e}") from e
        if received != size or digest.hexdigest() != wanted["tar_sha256"]:
            raise BundleError(
                f"download of {version} does not match the registry's sha256 (corrupt in transit "
                "or on the server); refusing it"
            )
        staged = unpack_bundle(tar, self.dir.incoming / uuid.uuid4().hex)
        manifest = verify_bundle(staged, self.config.trusted_key)
        if manifest.version != version:
            raise BundleError(
                f"the registry announced version {version} but sent a bundle signed as "
                f"{manifest.version}; refusing it"
            )
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
        body = {
            "channel": self.config.channel,
            "active_version": result.active_version,
            "health": result.health,
            "latency_p50_ms": latency.get("p50"),
            "latency_p99_ms": latency.get("p99"),
            "last_error": (result.error or "")[:2000] or None,
            "detail": {
                "action": result.action,
                "wanted": result.wanted_version,
                "latency_source": source if latency else None,
            },
        }
        try:
            response = self._request("POST", "/v1/devices/me/status", json=body)
        except ConnectionFailed as e:
            log.warning("status report failed: %s", e)
            return result
        if response.status_code != 204:
            log.warning("status report refused: %s %s", response.status_code, _detail(response))
            return result
        return AgentResult(**{**result.__dict__, "reported": True})

    def close(self) -> None:
        self.client.close()


def _health(active: str | None) -> str:
    return "ok" if active else "no-model"


def _degraded(active: str | None) -> str:
    return "degraded" if active else "failed"


def _refused(state: dict[str, Any], wanted: dict[str, Any]) -> bool:
    entry = state.get("refused", {}).get(str(wanted["version"]))
    # A refusal after activation has no tar hash: the version is refused whatever is served.
    return entry is not None and entry.get("tar_sha256") in (None, wanted.get("tar_sha256"))


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))[:300]
    except ValueError:
        return response.text[:300]


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
                result = agent.poll()
                if on_result is not None:
                    on_result(result)
                # Jitter keeps a fleet that was started together from polling in lockstep.
                stop.wait(config.interval * random.uniform(0.9, 1.1))
        finally:
            agent.close()
