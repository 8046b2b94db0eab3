"""The edge image builds from docker/Dockerfile.edge and answers a prediction (podman).

CI runs this on a fresh Debian machine as root: docker/podman-base.sh installs debootstrap,
podman and runc with apt-get and builds the local stand-in for python:3.11-slim (cached in
/var/tmp/fedge-podman-base). Where podman cannot be used the test skips with the reason.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from deploy_support import make_bundle, make_keys

from fedge.edge.device.runtime import EdgeModel

ROOT = Path(__file__).resolve().parents[1]
SKIP = 77  # docker/podman-base.sh: podman cannot be used on this machine


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_edge_image_builds_has_no_torch_and_predicts(tmp_path: Path) -> None:
    if os.geteuid() != 0 and shutil.which("podman") is None:
        pytest.skip("podman is missing and only root may install it (apt-get install podman)")
    private, public = make_keys(tmp_path)
    bundle = make_bundle(tmp_path / "bundle", private, "docker-v1", seed=3)
    images = np.random.default_rng(3).integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": images.tolist(), "return_logits": True}))

    done = subprocess.run(
        ["bash", str(ROOT / "docker" / "edge-check.sh"), str(bundle), str(public), str(request)],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    log = done.stdout[-6000:] + done.stderr[-6000:]
    if done.returncode == SKIP:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, log

    lines = done.stdout.splitlines()
    answer = json.loads(lines[lines.index("prediction:") + 1])
    assert answer["version"] == "docker-v1", log
    with EdgeModel.open(bundle, public) as model:
        expected = model.predict_raw(images)
    assert [p["label"] for p in answer["predictions"]] == expected.labels
    logits = np.array([p["logits"] for p in answer["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(logits, expected.logits, atol=1e-4)
    assert "exited with code" in done.stdout and "SIGTERM stops the container" in done.stdout
    # The target for a device image (docs/containers.md): at most 350 MB uncompressed.
    size = re.search(r"^edge image: (\d+) MB", done.stdout, re.MULTILINE)
    assert size is not None and int(size.group(1)) <= 350, log
