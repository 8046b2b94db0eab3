"""The device side runs with torch, flwr and scikit-learn made unimportable.

An edge box installs only ``fedge[edge]``; this runs the real runtime, its CLI
and every ``fedge.edge.device`` module in a fresh interpreter where importing
any of them raises ``ImportError``, and checks none was loaded.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from edge_device_support import ArtifactPlan, make_bundle, make_keys
from PIL import Image

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = ("torch", "flwr", "sklearn", "torchvision")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the edge device has no {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)

CHECK = textwrap.dedent(
    """
    import json, pkgutil, importlib
    import fedge.edge.device as device
    from typer.testing import CliRunner
    from fedge.cli.edge import app
    from fedge.edge.device.runtime import EdgeModel

    for info in pkgutil.iter_modules(device.__path__):
        importlib.import_module(f"fedge.edge.device.{info.name}")
    importlib.import_module("fedge.shared.bundle")
    importlib.import_module("fedge.shared.signing")

    bundle, key, image, npy = sys.argv[1:5]
    outputs = []
    for fmt in ("onnx", "tflite"):
        result = CliRunner().invoke(
            app, ["predict", bundle, image, npy, "--key", key, "--format", fmt, "--json"]
        )
        if result.exit_code != 0:
            raise SystemExit(f"predict failed: {result.output} {result.exception!r}")
        outputs.append(json.loads(result.stdout))
    with EdgeModel.open(bundle, key) as model:
        assert model.self_test().passed
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"loaded": loaded, "outputs": outputs}))
    """
)


def test_device_side_runs_without_torch_flwr_or_sklearn(tmp_path: Path) -> None:
    private, public = make_keys(tmp_path / "keys")
    plans = (ArtifactPlan("model-fp32.onnx"), ArtifactPlan("model-fp32.tflite", "tflite"))
    bundle = make_bundle(tmp_path / "bundle", private, plans=plans)
    image = tmp_path / "digit.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(image)
    npy = tmp_path / "digits.npy"
    np.save(npy, np.random.default_rng(0).integers(0, 256, (2, 8, 8), dtype=np.uint8))

    code = BLOCKER + CHECK
    done = subprocess.run(
        [sys.executable, "-c", code, str(bundle), str(public), str(image), str(npy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    onnx_out, tflite_out = report["outputs"]
    assert [p["input"] for p in onnx_out["predictions"]] == ["digit.png", "digits.npy[0]",
                                                             "digits.npy[1]"]  # fmt: skip
    assert onnx_out["format"] == "onnx" and tflite_out["format"] == "tflite"
    assert [p["label"] for p in onnx_out["predictions"]] == [
        p["label"] for p in tflite_out["predictions"]
    ]


def test_the_blocker_really_blocks() -> None:
    """Guard against a blocker that silently lets torch through."""
    code = BLOCKER + "import torch\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "torch is blocked" in done.stderr
