"""Helpers for the deployment tests: tiny signed bundles, TLS files, servers in threads.

Bundles hold an ONNX model built with ``onnx.helper`` (no torch), signed with
``fedge.shared.signing``/``fedge.shared.bundle`` exactly as export signs them,
so everything downstream (registry, agent, serving) runs its real checks.
"""

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared import signing
from fedge.shared.bundle import make_self_test, write_signed_manifest
from fedge.shared.tasks import ImagePreprocessing, TabularPreprocessing, TaskSpec

IMAGE_SIZE = 8
NUM_CLASSES = 10


def make_keys(directory: Path) -> tuple[Path, Path]:
    """A signing key pair: (private key path, public key path)."""
    private = directory / "signing.key"
    public = signing.generate_signing_key(private)
    return private, public


def _onnx_linear(path: Path, weight: np.ndarray, bias: np.ndarray, flatten: bool) -> None:
    """Write ``logits = flatten(x) @ weight + bias`` as an ONNX model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    in_shape = ["N", 1, IMAGE_SIZE, IMAGE_SIZE] if flatten else ["N", weight.shape[0]]
    nodes = []
    source = "input"
    if flatten:
        nodes.append(helper.make_node("Flatten", ["input"], ["flat"], axis=1))
        source = "flat"
    nodes.append(helper.make_node("Gemm", [source, "W", "B"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", weight.shape[1]])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def make_bundle(
    out_dir: Path,
    private_key: Path,
    version: str,
    *,
    seed: int = 0,
    kind: str = "image",
    break_self_test: bool = False,
    fail_validation: bool = False,
) -> Path:
    """Write a signed bundle with one tiny fp32 ONNX artifact into ``out_dir``.

    ``break_self_test`` records wrong expected logits (a bundle whose self-test fails
    on every device); ``fail_validation`` marks the artifact's validation as failed.
    """
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    if kind == "image":
        features = IMAGE_SIZE * IMAGE_SIZE
        pre: Any = ImagePreprocessing(size=IMAGE_SIZE, channels=1, mean=(0.5,), std=(0.5,))
        shape = [-1, 1, IMAGE_SIZE, IMAGE_SIZE]
        layout = "NCHW"
    else:
        features = 4
        pre = TabularPreprocessing(columns=("a", "b", "c", "d"), mean=(0.0,) * 4, std=(1.0,) * 4)
        shape, layout = [-1, features], "NF"
    classes = tuple(str(i) for i in range(NUM_CLASSES))
    task = TaskSpec("digits" if kind == "image" else "tabular", classes, pre)
    weight = rng.normal(size=(features, NUM_CLASSES)).astype(np.float32)
    bias = rng.normal(size=(NUM_CLASSES,)).astype(np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = "artifacts/model-fp32.onnx"
    _onnx_linear(out_dir / artifact, weight, bias, flatten=kind == "image")

    inputs = rng.normal(size=(4, *shape[1:])).astype(np.float32)
    session = ort.InferenceSession(str(out_dir / artifact), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": inputs})[0]
    labels = expected.argmax(axis=1)
    if break_self_test:
        expected = expected + 1.0
    io_in = [{"name": "input", "shape": shape, "dtype": "float32", "layout": layout}]
    io_out = [{"name": "logits", "shape": [-1, NUM_CLASSES], "dtype": "float32"}]
    manifest = {
        "version": version,
        "task": task.to_dict(),
        "labels": list(classes),
        "inputs": io_in,
        "outputs": io_out,
        "artifacts": [
            {
                "file": artifact,
                "format": "onnx",
                "precision": "fp32",
                "quantization": "none",
                "inputs": io_in,
                "outputs": io_out,
                "validation": {"max_abs_diff": 0.0, "passed": not fail_validation},
                "tolerance": {"atol": 1e-4},
            }
        ],
        "self_test": make_self_test(inputs, {artifact: expected}, labels),
    }
    write_signed_manifest(out_dir, manifest, signing.load_private_key(private_key))
    return out_dir


def tamper_artifact(bundle_dir: Path) -> None:
    """Flip one byte near the end of the bundle's artifact (its hash no longer matches)."""
    path = next((bundle_dir / "artifacts").iterdir())
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class ServerThread:
    """A uvicorn server for an ASGI app in a background thread, on a free loopback port."""

    def __init__(self, app: Any, ssl: tuple[Path, Path] | None = None) -> None:
        import uvicorn

        from fedge.shared.processes import free_port

        self.port = free_port()
        options: dict[str, Any] = {}
        if ssl is not None:
            options = {"ssl_certfile": str(ssl[0]), "ssl_keyfile": str(ssl[1])}
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", **options
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.scheme = "http" if ssl is None else "https"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def serving(app: Any, ssl: tuple[Path, Path] | None = None) -> Iterator[ServerThread]:
    """Run ``app`` for the duration of the ``with`` block; always stopped."""
    server = ServerThread(app, ssl).start()
    try:
        yield server
    finally:
        server.stop()
