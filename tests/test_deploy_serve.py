"""Edge serving over real HTTP: predictions, malformed requests, metrics, hot version switch."""

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from deploy_support import make_bundle, make_keys, serving
from PIL import Image

from fedge.edge.device.agent import AgentConfig, run_agent_once
from fedge.edge.device.runtime import EdgeModel
from fedge.edge.device.serve import ServeConfig, create_app
from fedge.server.registry.api import create_app as registry_app
from fedge.server.registry.devices import DeviceStore
from fedge.server.registry.publish import publish_bundle
from fedge.server.registry.store import Registry


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory, keys) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "v1", keys[0], "v1")


@pytest.fixture(scope="module")
def client(image_bundle: Path, keys) -> Iterator[httpx.Client]:
    config = ServeConfig(trusted_key=keys[1], bundle=image_bundle, max_body_bytes=64_000)
    with serving(create_app(config)) as server, httpx.Client(base_url=server.url) as http:
        yield http


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_predict_raw_tensor_and_image_upload(client: httpx.Client, image_bundle, keys) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    raw = client.post("/predict", json={"inputs": images.tolist()})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["version"] == "v1" and len(body["predictions"]) == 3
    with EdgeModel.open(image_bundle, keys[1]) as model:
        expected = model.predict_raw(images)
        tensor = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
        expected_logits = model.predict_tensor(tensor)
    assert [p["label"] for p in body["predictions"]] == expected.labels

    pre = client.post(
        "/predict", json={"inputs": tensor.tolist(), "preprocessed": True, "return_logits": True}
    )
    assert pre.status_code == 200, pre.text
    got = np.array([p["logits"] for p in pre.json()["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected_logits, atol=1e-5)

    png = _png(images[0])
    upload = client.post("/predict", content=png, headers={"content-type": "image/png"})
    assert (
        upload.status_code == 200 and upload.json()["predictions"][0]["label"] == expected.labels[0]
    )
    multi = client.post("/predict", files={"file": ("digit.png", png, "image/png")})
    assert multi.status_code == 200, multi.text
    assert multi.json()["predictions"][0]["label"] == expected.labels[0]

    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["version"] == "v1"


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "JSON"),
        ({"json": {"examples": []}}, 400, "inputs"),
        ({"json": {"inputs": []}}, 422, "non-empty"),
        ({"json": {"inputs": [[1, 2], [3]]}}, 422, "shape"),
        ({"json": {"inputs": [[["a"] * 8] * 8]}}, 422, "numbers"),
        ({"json": {"inputs": [[[300] * 8] * 8]}}, 422, "0..255"),
        ({"json": {"inputs": [[[1.0] * 8] * 7], "preprocessed": True}}, 422, "expects"),
        ({"json": {"inputs": [[[0] * 8] * 8] * 300}}, 413, "limit"),
        ({"content": b"x" * 70_000, "headers": {"content-type": "image/png"}}, 413, "limit"),
        ({"content": b"not an image", "headers": {"content-type": "image/png"}}, 400, "image"),
        ({"content": b"a,b", "headers": {"content-type": "text/csv"}}, 415, "content type"),
        (
            {"content": b'{"inputs": [NaN]}', "headers": {"content-type": "application/json"}},
            400,
            "NaN",
        ),
    ],
)
def test_malformed_requests_get_4xx_and_server_stays_up(
    client: httpx.Client, kwargs, status: int, words: str
) -> None:
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    assert words.lower() in response.json()["error"].lower()
    assert client.get("/healthz").status_code == 200


def test_metrics_are_prometheus_text(client: httpx.Client) -> None:
    client.post("/predict", json={"inputs": [[[0] * 8] * 8]})
    text = client.get("/metrics").text
    assert 'fedge_predict_requests_total{code="200"}' in text
    assert "# TYPE fedge_predict_latency_seconds histogram" in text
    assert 'fedge_predict_latency_seconds_bucket{le="+Inf"}' in text
    assert (
        'fedge_model_info{artifact="artifacts/model-fp32.onnx"' in text and 'version="v1"' in text
    )


def test_tabular_rows_as_lists_or_objects(tmp_path: Path, keys) -> None:
    bundle = make_bundle(tmp_path / "tab", keys[0], "t1", kind="tabular")
    with serving(create_app(ServeConfig(trusted_key=keys[1], bundle=bundle))) as server:
        rows = [[0.1, 0.2, 0.3, 0.4]]
        as_list = httpx.post(f"{server.url}/predict", json={"inputs": rows}).json()
        named = [{"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}]
        as_obj = httpx.post(f"{server.url}/predict", json={"inputs": named}).json()
        assert as_list["predictions"] == as_obj["predictions"]
        short = httpx.post(f"{server.url}/predict", json={"inputs": [[0.1, 0.2]]})
        assert short.status_code == 422 and "columns" in short.json()["error"]
        image = httpx.post(
            f"{server.url}/predict", content=b"x", headers={"content-type": "image/png"}
        )
        assert image.status_code == 415


def test_version_switch_under_load_fails_no_request(tmp_path: Path, keys) -> None:
    private, public = keys
    data = tmp_path / "registry"
    registry = Registry(data)
    token = DeviceStore(data).add("cam-1")
    publish_bundle(registry, make_bundle(tmp_path / "v1", private, "v1", seed=1), public, "stable")
    with serving(registry_app(data)) as reg:
        agent = AgentConfig(reg.url, "stable", tmp_path / "device", token, public, interval=0.1)
        assert run_agent_once(agent).active_version == "v1"
        config = ServeConfig(trusted_key=public, agent_dir=agent.dir, watch_interval=0.05)
        with serving(create_app(config)) as server:
            results: list[tuple[int, str]] = []
            stop = threading.Event()

            def load(client: httpx.Client) -> None:
                # A bounded stream: stops when told, or after 400 requests per worker.
                for _ in range(400):
                    if stop.is_set():
                        return
                    r = client.post("/predict", json={"inputs": [[[7] * 8] * 8]})
                    results.append((r.status_code, r.json().get("version", "")))

            with httpx.Client(base_url=server.url, timeout=30) as client:
                workers = [threading.Thread(target=load, args=(client,)) for _ in range(4)]
                for w in workers:
                    w.start()
                publish_bundle(
                    registry, make_bundle(tmp_path / "v2", private, "v2", seed=2), public, "stable"
                )
                assert run_agent_once(agent).active_version == "v2"
                deadline = threading.Event()
                for _ in range(400):  # at most 20 s: until v2 has answered a few requests
                    if sum(v == "v2" for _, v in results) >= 10:
                        break
                    deadline.wait(0.05)
                stop.set()
                for w in workers:
                    w.join()
                metrics = client.get("/metrics").text
    codes = {code for code, _ in results}
    versions = [v for _, v in results]
    assert codes == {200}, f"failed requests during the switch: {codes}"
    assert versions.count("v1") >= 10 and versions.count("v2") >= 10
    assert versions.index("v2") > 0 and versions[-1] == "v2"
    assert "fedge_model_reloads_total 2" in metrics
