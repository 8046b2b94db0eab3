"""The deployment leg of ``fedge demo``: registry, one agent and one server, on loopback.

Publishes a signed bundle to ``stable``, starts the registry API, an edge agent
and ``edge serve`` as child processes on free loopback ports, waits until the
device reports the version active, sends a few predictions over HTTP, shows the
fleet table and stops everything it started, however it ends.
"""

import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.shared.errors import ConnectionFailed

if TYPE_CHECKING:
    from rich.console import Console

    from fedge.shared.tls import TLSFiles

DEVICE = "demo-edge-1"


def _edge_command(*args: str) -> list[str]:
    """``fedge edge ARGS`` with this interpreter (the demo's venv, even if not on PATH)."""
    return [sys.executable, "-m", "fedge", "edge", *args]


def _enroll(registry_dir: Path, token_file: Path) -> None:
    """Enroll the demo device (a fresh token on every demo run), token in a 0600 file."""
    from fedge.server.registry.devices import DeviceStore
    from fedge.shared.atomic import atomic_write_text

    store = DeviceStore(registry_dir)
    known = {d.name: d for d in store.list()}
    token = store.rotate(DEVICE) if DEVICE in known else store.add(DEVICE)
    atomic_write_text(token_file, token + "\n", mode=0o600)


def _predict(serve_url: str, bundle_dir: Path) -> list[dict[str, Any]]:
    """Send the bundle's self-test examples to ``/predict``; pair answers with expectations."""
    import httpx

    from fedge.shared.bundle import read_manifest, self_test_inputs

    manifest = read_manifest(bundle_dir)
    inputs = self_test_inputs(manifest)
    expected = (manifest.self_test or {}).get("expected_labels") or []
    rows = []
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        for i in range(len(inputs)):
            response = client.post(
                "/predict", json={"inputs": inputs[i : i + 1].tolist(), "preprocessed": True}
            )
            response.raise_for_status()
            answer = response.json()
            top = answer["predictions"][0]
            want = manifest.labels[expected[i]] if i < len(expected) else None
            rows.append(
                {
                    "example": i,
                    "label": top["label"],
                    "score": top["score"],
                    "expected": want,
                    "latency_ms": answer["latency_ms"],
                }
            )
    return rows


def deploy_demo(
    bundle_dir: Path,
    work_dir: Path,
    signing_public_key: Path,
    tls: "TLSFiles | None",
    console: "Console",
) -> dict[str, Any]:
    """Publish, deploy to one loopback device, predict over HTTP, show the fleet, stop.

    Parameters
    ----------
    bundle_dir
        A signed bundle (from ``fedge export``).
    work_dir
        Holds the registry (``registry/``), the device (``device/``) and logs (``logs/``).
    signing_public_key
        The key the bundle is signed with (publish checks it; the device trusts it).
    tls
        The server's CA, certificate and key: the registry API then serves HTTPS and the
        agent pins the CA. None serves plain HTTP on loopback.
    console
        Where progress and the fleet table are printed.

    Returns
    -------
    dict
        ``version``, ``registry_url``, ``serve_url``, ``predictions`` (label, score,
        expected label, latency per example), ``fleet`` (device rows) and ``seconds``.

    Raises
    ------
    BundleError
        The bundle does not verify under ``signing_public_key``.
    ConnectionFailed, RunError
        A process did not start or the device did not activate the version in time.
    """
    from fedge.cli.registry import fleet_table
    from fedge.server.registry.api import registry_command
    from fedge.server.registry.fleet import device_view, fleet
    from fedge.server.registry.publish import publish_bundle
    from fedge.server.registry.store import Registry
    from fedge.shared.processes import ProcessGroup, free_port, port_open, wait_until

    start = time.monotonic()
    registry_dir, device_dir, logs = work_dir / "registry", work_dir / "device", work_dir / "logs"
    record, _ = publish_bundle(Registry(registry_dir), bundle_dir, signing_public_key, "stable")
    console.print(f"published [bold]{record.version}[/] ({record.bundle_id}) to channel stable")
    token_file = work_dir / f"{DEVICE}.token"
    _enroll(registry_dir, token_file)

    reg_port, serve_port = free_port(), free_port()
    scheme = "https" if tls is not None else "http"
    registry_url = f"{scheme}://127.0.0.1:{reg_port}"
    serve_url = f"http://127.0.0.1:{serve_port}"
    with ProcessGroup() as group:
        command = registry_command(
            registry_dir,
            "127.0.0.1",
            reg_port,
            tls.cert if tls else None,
            tls.key if tls else None,
        )
        proc = group.start("registry", command, logs / "registry.log")
        wait_until(
            lambda: port_open("127.0.0.1", reg_port),
            60,
            "the registry API",
            proc,
            logs / "registry.log",
        )
        console.print(f"registry API on {registry_url}")

        agent_args = [
            "agent",
            "--server",
            registry_url,
            "--channel",
            "stable",
            "--dir",
            str(device_dir),
            "--token-file",
            str(token_file),
            "--key",
            str(signing_public_key),
            "--interval",
            "1",
        ]
        if tls is not None:
            agent_args += ["--ca", str(tls.ca_cert)]
        agent = group.start("agent", _edge_command(*agent_args), logs / "agent.log")
        serve_args = [
            "serve",
            "--agent-dir",
            str(device_dir),
            "--port",
            str(serve_port),
            "--key",
            str(signing_public_key),
        ]
        server = group.start("serve", _edge_command(*serve_args), logs / "serve.log")

        def active() -> bool:
            return device_view(registry_dir, DEVICE).active_version == record.version

        with console.status(f"waiting for {DEVICE} to activate {record.version} ..."):
            wait_until(
                active, 120, f"{DEVICE} to activate {record.version}", agent, logs / "agent.log"
            )
            wait_until(
                lambda: _serving(serve_url, record.version),
                60,
                "edge serve",
                server,
                logs / "serve.log",
            )
        console.print(f"{DEVICE} runs {record.version}; edge serve on {serve_url}")
        predictions = _predict(serve_url, bundle_dir)
        for row in predictions:
            console.print(
                f"  example {row['example']}: {row['label']} (score {row['score']:.3f},"
                f" expected {row['expected']}, {row['latency_ms']:.1f} ms)"
            )
        # edge serve hands its measured latency to the agent every few seconds; the agent
        # reports it on its next poll. Wait briefly for that, else show the self-test figures.
        with contextlib.suppress(ConnectionFailed):
            wait_until(lambda: _latency_from_serve(registry_dir), 12, "serve latency report")
        views = fleet(registry_dir)
        console.print(fleet_table(views))
    return {
        "version": record.version,
        "registry_url": registry_url,
        "serve_url": serve_url,
        "predictions": predictions,
        "fleet": [view.to_dict() for view in views],
        "seconds": time.monotonic() - start,
    }


def _latency_from_serve(registry_dir: Path) -> bool:
    from fedge.server.registry.fleet import device_view

    return device_view(registry_dir, DEVICE).detail.get("latency_source") == "serve"


def _serving(url: str, version: str) -> bool:
    """Whether ``edge serve`` at ``url`` answers health checks with ``version``."""
    import httpx

    try:
        response = httpx.get(f"{url}/healthz", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json().get("version") == version
