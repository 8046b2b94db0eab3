"""The edge agent and edge serving run with torch, flwr and scikit-learn unimportable."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from deploy_support import make_bundle, make_keys, serving

from fedge.server.registry.api import create_app
from fedge.server.registry.devices import DeviceStore
from fedge.server.registry.publish import publish_bundle
from fedge.server.registry.store import Registry
from fedge.shared.tls import ensure_server_certificate

CODE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("torch", "flwr", "sklearn", "torchvision", "fastapi", "pydantic")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked on the device")
            return None

    sys.meta_path.insert(0, Blocker())

    import typer
    from pathlib import Path
    from starlette.testclient import TestClient
    from typer.testing import CliRunner
    from fedge.cli.deploy import register
    from fedge.edge.device.serve import ServeConfig, create_app

    server, device_dir, token_file, key, ca = sys.argv[1:6]
    app = typer.Typer()
    register(app)
    args = ["agent", "--once", "--server", server, "--dir", device_dir,
            "--token-file", token_file, "--key", key, "--ca", ca]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise SystemExit(f"agent failed: {result.output} {result.exception!r}")
    config = ServeConfig(trusted_key=Path(key), agent_dir=Path(device_dir))
    with TestClient(create_app(config)) as client:
        answer = client.post("/predict", json={"inputs": [[[3] * 8] * 8]}).json()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"loaded": loaded, "answer": answer, "agent": result.output}))
    """
)


def test_agent_and_serve_without_torch(tmp_path: Path) -> None:
    private, public = make_keys(tmp_path / "keys")
    tls = ensure_server_certificate(tmp_path / "tls", [])
    data = tmp_path / "registry"
    publish_bundle(Registry(data), make_bundle(tmp_path / "b", private, "v1"), public, "stable")
    token_file = tmp_path / "token"
    token_file.write_text(DeviceStore(data).add("cam-1"))
    token_file.chmod(0o600)
    with serving(create_app(data), ssl=(tls.cert, tls.key)) as server:
        args = [server.url, str(tmp_path / "device"), str(token_file), str(public)]
        done = subprocess.run(
            [sys.executable, "-c", CODE, *args, str(tls.ca_cert)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert "activated" in out["agent"] and out["answer"]["version"] == "v1"
