"""Fuzz ``edge serve``: hypothesis bodies and schemathesis against ``/openapi.json``; no 5xx.

Also checks the event loop stays responsive while a large multipart body is in
flight, on a real uvicorn server: ``/healthz`` must answer within 100 ms.
"""

import asyncio
import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from deploy_support import make_bundle, make_keys
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.testclient import TestClient

from fedge.edge.device.metrics import ServeMetrics
from fedge.edge.device.openapi import openapi_schema
from fedge.edge.device.payload import Limits
from fedge.edge.device.serve import ModelSlot, ServeConfig, create_app
from fedge.shared.processes import ProcessGroup, free_port, port_open, wait_until

FUZZ_CASES = 1000


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> ServeConfig:
    bundle = make_bundle(tmp_path_factory.mktemp("b") / "v1", keys[0], "v1")
    return ServeConfig(trusted_key=keys[1], bundle=bundle, max_body_bytes=256_000)


@pytest.fixture(scope="module")
def client(config: ServeConfig) -> Iterator[TestClient]:
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        yield c


class AsgiClient:
    """Requests straight into the ASGI app on one event loop (no sockets, no threads)."""

    def __init__(self, config: ServeConfig) -> None:
        model, choice = ModelSlot(config, ServeMetrics()).load(config.bundle)  # type: ignore[arg-type]
        self.app = create_app(config, model, choice)
        self.loop = asyncio.new_event_loop()
        transport = httpx.ASGITransport(app=self.app)
        self.http = httpx.AsyncClient(transport=transport, base_url="http://edge")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.http.request(method, path, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def asgi(config: ServeConfig) -> Iterator[AsgiClient]:
    client = AsgiClient(config)
    yield client
    client.close()


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


SEEDS = [
    _png(np.arange(64, dtype=np.uint8).reshape(8, 8)),
    _npy(np.zeros((2, 8, 8), np.uint8)),
    _npy(np.zeros((1, 1, 8, 8), np.float32)),
    np.zeros((1, 1, 8, 8), "<f4").tobytes(),
    b'--B\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n'
    b"Content-Type: image/png\r\n\r\n" + _png(np.zeros((8, 8), np.uint8)) + b"\r\n--B--\r\n",
    json.dumps({"inputs": [[[1] * 8] * 8]}).encode(),
]
CONTENT_TYPES = [
    "application/json", "application/x-npy", "application/octet-stream", "image/png",
    "image/jpeg", "multipart/form-data; boundary=B", "multipart/form-data", "text/plain", "",
    "multipart/form-data; boundary=", "application/json; charset=utf-16",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=40,
)
pixels = st.integers(min_value=-2, max_value=300) | st.floats(-1, 256) | scalars
images = st.lists(
    st.lists(st.lists(pixels, min_size=0, max_size=4) | pixels, min_size=0, max_size=9),
    min_size=0, max_size=9,
)  # fmt: skip
payloads = st.fixed_dictionaries(
    {"inputs": st.lists(images, max_size=3) | json_values},
    optional={"preprocessed": st.booleans() | json_values, "return_logits": json_values},
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid body with a few bytes flipped, cut or inserted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and data:
            data[where] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[where:]
        else:
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


bodies = st.one_of(
    payloads.map(lambda p: json.dumps(p, allow_nan=True).encode()),
    mutated(),
    st.binary(max_size=256),
)


@settings(
    max_examples=FUZZ_CASES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(body=bodies, content_type=st.sampled_from(CONTENT_TYPES))
def test_fuzzed_predict_requests_never_get_5xx(
    asgi: AsgiClient, body: bytes, content_type: str
) -> None:
    headers = {"content-type": content_type}
    response = asgi.request("POST", "/predict", content=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text, body[:200])
    assert "error" in response.json() or "predictions" in response.json()


def test_the_server_is_healthy_after_the_fuzz(asgi: AsgiClient) -> None:
    assert asgi.request("GET", "/healthz").json()["status"] == "ok"
    metrics = asgi.request("GET", "/metrics").text
    assert 'fedge_predict_requests_total{code="500"}' not in metrics
    counted = sum(int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("fedge_predict_requests_total{"))  # fmt: skip
    assert counted >= FUZZ_CASES


# ------------------------------------------------------------------ schemathesis


# The schema the server serves, as schemathesis loads it (the limits match ``config``).
API = schemathesis.openapi.from_dict(openapi_schema(Limits(max_body_bytes=256_000)))
OPERATIONS = st.one_of(
    *(API[path][method].as_strategy() for path, method in
      [("/predict", "POST"), ("/healthz", "GET"), ("/metrics", "GET"), ("/openapi.json", "GET")])
)  # fmt: skip


def test_the_served_schema_is_the_one_tested(client: TestClient) -> None:
    assert client.get("/openapi.json").json() == API.raw_schema


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(case=OPERATIONS)
def test_the_api_conforms_to_its_openapi_schema(
    client: TestClient, case: schemathesis.Case
) -> None:
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
    request = client.build_request(**kwargs)
    try:
        request.read()  # negative cases can hold what no client can encode (an int as a file)
    except (TypeError, AttributeError, ValueError):
        reject()
    response = client.send(request)
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


# ------------------------------------------------------------------ event loop


def test_a_large_multipart_body_never_blocks_the_event_loop(tmp_path: Path, keys) -> None:
    """``/healthz`` answers within 100 ms while 8 MiB multipart bodies are being handled.

    On a shared machine the OS alone can stall a process that long, so a
    measurement over 100 ms is repeated, up to three times; the server that
    parsed multipart on its event loop stalled ``/healthz`` for ~27 s every time.
    """
    bundle = make_bundle(tmp_path / "v1", keys[0], "v1")
    part = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'
    tiny_parts = (part * 161_000)[: (8 << 20) - 16] + b"--B--\r\n"
    # 1600x1600 RGB noise: a 7.3 MiB PNG that takes ~100 ms to decode and resize here
    # (parsed on the event loop, as a mutation check showed, /healthz took 101-121 ms).
    noise = np.random.default_rng(0).integers(0, 256, (1600, 1600, 3), dtype=np.uint8)
    big_file = (
        b'--B\r\nContent-Disposition: form-data; name="f"; filename="n.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + _png(noise) + b"\r\n--B--\r\n"
    )
    assert len(big_file) > 7 << 20
    headers = {"content-type": "multipart/form-data; boundary=B"}
    attempts = []
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Its own process, as on a device: the test's client threads do not share its GIL.
    command = [sys.executable, "-m", "fedge", "edge", "serve", str(bundle), "--key",
               str(keys[1]), "--port", str(port), "--workers", "1"]  # fmt: skip
    log = tmp_path / "serve.log"
    with ProcessGroup() as group, httpx.Client(base_url=url, timeout=60) as http:
        proc = group.start("serve", command, log)
        wait_until(lambda: port_open("127.0.0.1", port), 90, "edge serve", proc, log)
        http.get("/healthz")  # connect once before measuring
        for _ in range(3):
            statuses: list[int] = []

            def upload(body: bytes, statuses: list[int] = statuses) -> None:
                with httpx.Client(base_url=url, timeout=60) as other:
                    for _ in range(3):
                        response = other.post("/predict", content=body, headers=headers)
                        statuses.append(response.status_code)

            uploads = [threading.Thread(target=upload, args=(b,)) for b in (tiny_parts, big_file)]
            for thread in uploads:
                thread.start()
            worst = 0.0
            while any(t.is_alive() for t in uploads):
                start = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                worst = max(worst, time.perf_counter() - start)
                time.sleep(0.01)
            for thread in uploads:
                thread.join()
            assert sorted(statuses) == [200, 200, 200, 413, 413, 413]
            attempts.append(worst)
            if worst < 0.1:
                break
    assert min(attempts) < 0.1, f"/healthz took {[round(w * 1000) for w in attempts]} ms"
