"""``fedge edge ...`` through the root ``fedge`` command, on a box without torch or flwr.

The root CLI registers every command group; this checks that doing so imports
nothing an edge device lacks, and that ``fedge edge predict`` works there.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from edge_device_support import ArtifactPlan, make_bundle, make_keys
from PIL import Image
from test_edge_torch_free import BLOCKER

ROOT_CLI = """
from fedge.cli import main
sys.argv = ["fedge", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"loaded": loaded}))
    raise
"""


def test_root_cli_edge_predict_needs_no_torch_or_flwr(tmp_path: Path) -> None:
    private, public = make_keys(tmp_path / "keys")
    bundle = make_bundle(tmp_path / "bundle", private, plans=(ArtifactPlan("model-fp32.onnx"),))
    image = tmp_path / "digit.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(image)
    code = BLOCKER + "import json\n" + ROOT_CLI
    args = ["edge", "predict", str(bundle), str(image), "--key", str(public), "--json"]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[-1])["loaded"] == []
    predictions = json.loads("\n".join(lines[:-1]))["predictions"]
    assert [p["input"] for p in predictions] == ["digit.png"]


def test_server_start_and_stop_import_no_torch(tmp_path: Path) -> None:
    """`fedge server start` must not pay for torch: the coordinator is SuperLink + registry."""
    code = textwrap.dedent(
        """
        import json, sys
        import fedge.server.superlink, fedge.server.coordinator, fedge.server.registry.api
        from fedge.cli import _register
        _register()
        from fedge.cli.server import start, stop
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sklearn"))))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
