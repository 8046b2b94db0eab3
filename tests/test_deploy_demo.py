"""The demo's deployment leg end to end: registry, agent and edge serve as real processes, TLS."""

from pathlib import Path

import pytest
from deploy_support import make_bundle, make_keys
from rich.console import Console

from fedge.demo.deployment import DEVICE, deploy_demo
from fedge.shared.processes import port_open
from fedge.shared.tls import ensure_server_certificate


@pytest.mark.slow
def test_deploy_demo_over_tls(tmp_path: Path) -> None:
    private, public = make_keys(tmp_path / "keys")
    bundle = make_bundle(tmp_path / "bundle", private, "demo-v1")
    tls = ensure_server_certificate(tmp_path / "tls", [])
    console = Console(record=True, width=140)

    result = deploy_demo(bundle, tmp_path / "work", public, tls, console)

    assert result["version"] == "demo-v1" and result["registry_url"].startswith("https://")
    assert len(result["predictions"]) == 4
    assert all(row["label"] == row["expected"] for row in result["predictions"])
    (device,) = result["fleet"]
    assert (device["name"], device["active_version"], device["health"]) == (
        DEVICE,
        "demo-v1",
        "ok",
    )
    assert device["latency_p50_ms"] is not None
    assert DEVICE in console.export_text()
    # Everything it started is gone.
    for url in (result["registry_url"], result["serve_url"]):
        assert not port_open("127.0.0.1", int(url.rsplit(":", 1)[1]))
