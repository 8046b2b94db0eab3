"""``/predict`` refuses hostile bodies with 4xx and bounded cost; binary inputs; micro-batching.

Each case here is a finding of issue 12 that once froze the server, answered
500, or let a small request use a lot of memory.
"""

import asyncio
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from deploy_support import make_bundle, make_keys
from edge_device_support import ArtifactPlan
from edge_device_support import make_bundle as make_support_bundle
from PIL import Image
from starlette.testclient import TestClient

from fedge.edge.device.batching import MicroBatcher
from fedge.edge.device.runtime import EdgeModel
from fedge.edge.device.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "v1", keys[0], "v1")


@pytest.fixture(scope="module")
def client(bundle: Path, keys: tuple[Path, Path]) -> Iterator[TestClient]:
    with TestClient(create_app(ServeConfig(trusted_key=keys[1], bundle=bundle))) as c:
        yield c


def png_header(width: int, height: int) -> bytes:
    """A PNG of only a signature, an IHDR claiming ``width`` x ``height`` and IEND (45 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _post_json(client: TestClient, body: bytes) -> object:
    return client.post("/predict", content=body, headers={"content-type": "application/json"})


# ------------------------------------------------------------------ finding 1: multipart


def test_a_body_of_many_tiny_multipart_parts_is_refused(client: TestClient) -> None:
    part = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'
    body = (part * 161_000)[: (8 << 20) - 16] + b"--B--\r\n"
    response = client.post(
        "/predict", content=body, headers={"content-type": "multipart/form-data; boundary=B"}
    )
    assert response.status_code == 413, response.text
    assert "more than 300 multipart parts" in response.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_the_part_limit_is_configurable_and_counts_files(bundle: Path, keys) -> None:
    png = _png(np.zeros((8, 8), np.uint8))
    config = ServeConfig(trusted_key=keys[1], bundle=bundle, max_parts=3)
    with TestClient(create_app(config)) as c:
        files = [("file", (f"{i}.png", png, "image/png")) for i in range(3)]
        assert c.post("/predict", files=files).status_code == 200
        files.append(("file", ("3.png", png, "image/png")))
        refused = c.post("/predict", files=files)
        assert refused.status_code == 413 and "parts" in refused.json()["error"]


def test_raw_tensor_bodies_over_the_batch_limit_are_refused_before_parsing(
    bundle: Path, keys
) -> None:
    """Raw tensors are parsed on the event loop, so their count is checked before any pass."""
    config = ServeConfig(trusted_key=keys[1], bundle=bundle, max_batch=4)
    headers = {"content-type": "application/octet-stream"}
    with TestClient(create_app(config)) as c:
        ok = c.post("/predict", content=np.zeros((4, 1, 8, 8), "<f4").tobytes(), headers=headers)
        assert ok.status_code == 200, ok.text
        # NaNs would be a 422 if the bytes were looked at: a 413 means they were not.
        over = np.full((5, 1, 8, 8), np.nan, "<f4").tobytes()
        refused = c.post("/predict", content=over, headers=headers)
        assert refused.status_code == 413 and "5 examples" in refused.json()["error"]


# ------------------------------------------------------------------ finding 2: 500s


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b'{"inputs": [[[]]]}', 422, "empty axis"),
        (b'{"inputs": [[[], []]]}', 422, "empty axis"),
        (b'{"inputs": [[]], "preprocessed": true}', 422, "empty axis"),
        (b'{"inputs": [[[' + b"9" * 309 + b"]]]}", 422, "characters"),
        (b'{"inputs": [[[' + b"9" * 4300 + b"]]]}", 422, "characters"),
        (b'{"inputs": [[[1e400]]]}', 422, "non-finite"),
        (b"[" * 1000 + b"]" * 1000, 400, "nested too deeply"),
        (b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, "nested too deeply"),
        (b'{"inputs": ' + b"[" * 20 + b"1" + b"]" * 20 + b"}", 422, "nested more than"),
        (b'{"inputs": [[[1]]], "return_logits": 1}', 422, "true or false"),
    ],
    ids=["empty-image", "zero-axis", "empty-tensor", "309-digits", "4300-digits", "1e400",
         "deep-array", "deep-inputs", "20-deep", "flag-not-bool"],
)  # fmt: skip
def test_json_that_once_gave_500_gets_4xx(
    client: TestClient, body: bytes, status: int, words: str
) -> None:
    response = _post_json(client, body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_a_45_byte_png_claiming_20000_squared_pixels_is_413(client: TestClient) -> None:
    bomb = png_header(20_000, 20_000)
    assert len(bomb) == 45
    response = client.post("/predict", content=bomb, headers={"content-type": "image/png"})
    assert response.status_code == 413 and "pixels" in response.json()["error"]


def test_huge_finite_inputs_whose_scores_are_nan_get_422(client: TestClient) -> None:
    x = [[[[3e38] * 8] * 8]]
    response = client.post("/predict", json={"inputs": x, "preprocessed": True})
    assert response.status_code == 422, response.text
    assert "not finite" in response.json()["error"]
    raw = np.full((1, 1, 8, 8), 3e38, "<f4").tobytes()
    binary = client.post(
        "/predict", content=raw, headers={"content-type": "application/octet-stream"}
    )
    assert binary.status_code == 422 and "not finite" in binary.json()["error"]


def test_npy_headers_that_lie_and_eps_files_are_refused(client: TestClient) -> None:
    from numpy.lib import format as npy

    header = io.BytesIO()
    npy.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**10,)}
    )  # np.load would allocate 80 GB for this before reading the 16 bytes that follow
    lie = client.post("/predict", content=header.getvalue() + b"x" * 16,
                      headers={"content-type": "application/x-npy"})  # fmt: skip
    assert lie.status_code == 400 and "does not hold" in lie.json()["error"]
    # A garbled header: numpy parses it with Python's tokenizer, which raises TokenError.
    garbled = b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little") + b"\x00" * 117 + b"{"
    tokens = client.post("/predict", content=garbled, headers={"content-type": "application/x-npy"})
    assert tokens.status_code == 400 and "not a readable .npy" in tokens.json()["error"]
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    refused = client.post("/predict", content=eps, headers={"content-type": "image/png"})
    assert refused.status_code == 400 and "not a readable image" in refused.json()["error"]


# ------------------------------------------------------------------ finding 3: pixels


def test_decoded_pixels_are_capped_per_request_not_per_image(client: TestClient) -> None:
    big = _png(np.zeros((5000, 5000), np.uint8))  # ~24 KiB each, 25 Mpixel decoded
    files = [("file", (f"{i}.png", big, "image/png")) for i in range(16)]
    response = client.post("/predict", files=files)
    assert response.status_code == 413, response.text
    assert "pixels together" in response.json()["error"]
    small = _png(np.zeros((1000, 1000), np.uint8))
    files = [("file", (f"{i}.png", small, "image/png")) for i in range(16)]
    assert client.post("/predict", files=files).status_code == 200


def test_headers_are_checked_before_any_image_is_decoded(client: TestClient) -> None:
    # Two header-only PNGs of 3000x3000: each fits, together they do not. Had the
    # first been decoded, its missing pixel data would have answered 400.
    files = [("file", (f"{i}.png", png_header(3000, 3000), "image/png")) for i in range(2)]
    response = client.post("/predict", files=files)
    assert response.status_code == 413 and "pixels together" in response.json()["error"]
    one = client.post("/predict", files=files[:1])
    assert one.status_code == 400 and "not a readable image" in one.json()["error"]


# ------------------------------------------------------------------ finding 4: types


@pytest.mark.parametrize(
    "inputs",
    [
        [[["255"] * 8] * 8],
        [[[True] * 8] * 8],
        [[[1] * 7 + [True]] * 8],
        [[[1] * 7 + [None]] * 8],
        [[[1] * 7 + ["1"]] * 8],
    ],
    ids=["strings", "booleans", "one-boolean", "null", "one-string"],
)
def test_pixels_as_strings_or_booleans_are_refused(client: TestClient, inputs: list) -> None:
    response = client.post("/predict", json={"inputs": inputs})
    assert response.status_code == 422, response.text
    assert "numbers only" in response.json()["error"]


def test_tabular_values_as_strings_and_boolean_arrays_are_refused(tmp_path: Path, keys) -> None:
    bundle = make_bundle(tmp_path / "tab", keys[0], "t1", kind="tabular")
    with TestClient(create_app(ServeConfig(trusted_key=keys[1], bundle=bundle))) as c:
        named = [{"a": "0.1", "b": 0.2, "c": 0.3, "d": 0.4}]
        response = c.post("/predict", json={"inputs": named})
        assert response.status_code == 422 and "numbers only" in response.json()["error"]
        assert c.post("/predict", json={"inputs": [[0.1, 0.2, 0.3, 0.4]]}).status_code == 200
        out = io.BytesIO()
        np.save(out, np.ones((1, 4), dtype=bool))
        npy = c.post("/predict", content=out.getvalue(),
                     headers={"content-type": "application/x-npy"})  # fmt: skip
        assert npy.status_code == 422 and "not real numbers" in npy.json()["error"]


# ------------------------------------------------------------------ binary inputs (15)


def test_binary_inputs_predict_like_json(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    by_json = client.post("/predict", json={"inputs": images.tolist(), "return_logits": True})
    expected = [p["logits"] for p in by_json.json()["predictions"]]
    out = io.BytesIO()
    np.save(out, images)
    npy = client.post("/predict", content=out.getvalue(),
                      headers={"content-type": "application/x-npy"})  # fmt: skip
    assert npy.status_code == 200, npy.text
    assert [p["label"] for p in npy.json()["predictions"]] == [
        p["label"] for p in by_json.json()["predictions"]
    ]
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    pre = client.post("/predict", json={"inputs": x.tolist(), "preprocessed": True,
                                        "return_logits": True})  # fmt: skip
    raw = client.post("/predict", content=x.astype("<f4").tobytes(),
                      headers={"content-type": "application/octet-stream"})  # fmt: skip
    assert raw.status_code == 200, raw.text
    assert [p["label"] for p in raw.json()["predictions"]] == [
        p["label"] for p in pre.json()["predictions"]
    ]
    assert len(expected) == 3
    odd = client.post("/predict", content=b"\0" * 10,
                      headers={"content-type": "application/octet-stream"})  # fmt: skip
    assert odd.status_code == 422 and "whole number" in odd.json()["error"]
    pickled = client.post("/predict", content=b"\x93NUMPY garbage",
                          headers={"content-type": "application/x-npy"})  # fmt: skip
    assert pickled.status_code == 400


# ------------------------------------------------------------------ micro-batching (15)


def test_the_micro_batcher_runs_queued_requests_as_one_batch() -> None:
    calls: list[int] = []
    first_running, release = threading.Event(), threading.Event()

    def run(model: object, x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if len(calls) == 1:
            first_running.set()
            release.wait(10)
        return x.reshape(len(x), -1)[:, :2] * (1 if model == "a" else -1)

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(run, max_batch=8, max_delay_s=0.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("a", np.full((1, 1, 2), 0.0)))
        await asyncio.to_thread(first_running.wait, 10)
        # While batch 1 runs: three requests for model "a", then one for "b" (a swap).
        rest = [asyncio.ensure_future(batcher.submit("a", np.full((n, 1, 2), float(n))))
                for n in (1, 2, 3)]  # fmt: skip
        other = asyncio.ensure_future(batcher.submit("b", np.full((1, 1, 2), 9.0)))
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(first, *rest, other)
        await batcher.stop()
        return list(results)

    results = asyncio.run(scenario())
    assert calls == [1, 6, 1]  # the three queued "a" requests ran together; "b" alone
    for n, got in zip((1, 2, 3), results[1:4], strict=True):
        np.testing.assert_array_equal(got, np.full((n, 2), float(n)))
    np.testing.assert_array_equal(results[4], np.full((1, 2), -9.0))


def test_fixed_batch_artifacts_are_not_micro_batched(tmp_path: Path, keys) -> None:
    plans = (ArtifactPlan("fixed.tflite", "tflite", batch=1), ArtifactPlan("free.onnx"))
    bundle = make_support_bundle(tmp_path / "b", keys[0], plans=plans)
    with EdgeModel.open(bundle, keys[1], format="tflite") as fixed:
        assert not fixed.dynamic_batch
    with EdgeModel.open(bundle, keys[1], format="onnx") as free:
        assert free.dynamic_batch
    config = ServeConfig(trusted_key=keys[1], bundle=bundle, format="tflite")
    with TestClient(create_app(config)) as c:
        for _ in range(3):
            assert c.post("/predict", json={"inputs": [[[1] * 8] * 8]}).status_code == 200
        assert "fedge_batches_total 0" in c.get("/metrics").text
