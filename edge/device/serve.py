"""HTTP serving of a verified bundle on a device: ``/predict``, ``/healthz``, ``/metrics``.

Starlette on uvicorn: both are already edge dependencies, torch-free and small,
parse HTTP robustly, and let slow clients wait without holding a thread while
inference runs in a thread pool (onnxruntime runs concurrent calls in
parallel). With ``--agent-dir`` the server follows the agent's ``current``
symlink: a new version is loaded and self-tested first, then one reference is
swapped; requests already running keep the model object they started with, so
a switch never fails a request.
"""

import asyncio
import contextlib
import io
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fedge.edge.device.metrics import ServeMetrics
from fedge.edge.device.runtime import EdgeModel
from fedge.shared.atomic import atomic_write_json
from fedge.shared.errors import BundleError, DataError
from fedge.shared.tasks import ImagePreprocessing

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
MAX_BATCH = 256
MAX_IMAGE_PIXELS = 25_000_000


class HTTPProblem(Exception):
    """A request the server refuses, with the status code and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeConfig:
    """What to serve and the limits on requests."""

    trusted_key: Path
    bundle: Path | None = None
    agent_dir: Path | None = None
    format: str | None = None
    precision: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_batch: int = MAX_BATCH
    watch_interval: float = 0.5
    threads: int | None = None  # runtime intra-op threads; 1 suits many small concurrent calls


class ModelSlot:
    """The model being served. Replaced by assigning one reference, never mutated."""

    def __init__(self, config: ServeConfig, metrics: ServeMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.model: EdgeModel | None = None
        self.target: str | None = None  # resolved bundle path the model came from

    def _source(self) -> Path | None:
        if self.config.bundle is not None:
            return self.config.bundle.resolve()
        link = self.config.agent_dir / "current"  # type: ignore[operator]
        return link.resolve() if os.path.lexists(link) and link.exists() else None

    def set(self, model: EdgeModel, source: Path) -> None:
        """Serve ``model`` from now on: one reference assignment (atomic for other tasks)."""
        self.model, self.target = model, str(source)
        self.metrics.reloads += 1
        self.metrics.model_info = {k: str(v) for k, v in model.describe().items() if k != "size"}
        log.info("serving version %s (%s)", model.manifest.version, model.artifact.file)

    def load(self, path: Path) -> EdgeModel:
        """Verify, load and self-test the bundle at ``path`` (blocking)."""
        model = EdgeModel.open(
            path,
            self.config.trusted_key,
            self.config.format,
            self.config.precision,
            threads=self.config.threads,
        )
        result = model.self_test()
        if not result.passed:
            raise BundleError(f"{path}: self-test failed ({result.detail}); not serving it")
        return model

    async def refresh(self) -> None:
        """Load the bundle ``current`` points at if it changed; keep the old one on failure."""
        source = self._source()
        if source is None or str(source) == self.target:
            return
        try:
            model = await run_in_threadpool(self.load, source)
        except Exception as e:  # FedgeError, or a runtime's own error type while self-testing
            self.metrics.reload_failures += 1
            self.target = str(source)  # do not retry a broken version on every tick
            log.error("cannot serve %s, keeping the previous model: %s", source, e)
            return
        # The swap: new requests see the new model; running ones hold the old object.
        self.set(model, source)


def _reject_constant(name: str) -> Any:
    raise HTTPProblem(400, f"JSON contains {name}; numbers must be finite")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, f"request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPProblem(413, f"request body is over the {limit}-byte limit")
    return bytes(body)


def _decode_image(data: bytes, spec: ImagePreprocessing) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise HTTPProblem(413, f"image is {image.width}x{image.height}; too many pixels")
            return np.asarray(image.convert("L" if spec.channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise HTTPProblem(400, f"the uploaded file is not a readable image ({e})") from e


def _multipart_images(body: bytes, content_type: str) -> list[bytes]:
    """File parts of a multipart/form-data body (stdlib parser: no python-multipart needed)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise HTTPProblem(400, "malformed multipart body")
    files = [
        part.get_payload(decode=True)
        for part in message.iter_parts()
        if part.get_filename() is not None or part.get_content_maintype() == "image"
    ]
    if not files:
        raise HTTPProblem(400, "multipart body has no file part (send the image as a file)")
    return [f for f in files if isinstance(f, bytes)]


def _json_inputs(body: bytes, model: EdgeModel, max_batch: int) -> tuple[Any, bool, bool]:
    """``{"inputs": [...], "preprocessed": bool, "return_logits": bool}`` -> (inputs, flags)."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPProblem(400, f"body is not valid JSON: {e}") from e
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise HTTPProblem(400, 'expected a JSON object {"inputs": [...]}')
    inputs, preprocessed = payload["inputs"], payload.get("preprocessed", False)
    if not isinstance(inputs, list) or not inputs:
        raise HTTPProblem(422, '"inputs" must be a non-empty list of examples')
    if len(inputs) > max_batch:
        raise HTTPProblem(413, f"{len(inputs)} examples in one request; the limit is {max_batch}")
    if not isinstance(preprocessed, bool):
        raise HTTPProblem(422, '"preprocessed" must be true or false')
    pre = model.task.preprocessing
    if preprocessed:
        return _array(inputs, np.float32), True, bool(payload.get("return_logits"))
    if isinstance(pre, ImagePreprocessing):
        images = []
        for i, item in enumerate(inputs):
            array = _array(item, np.float64)
            if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
                raise HTTPProblem(
                    422, f"inputs[{i}] has shape {array.shape}; expected HxW or HxWxC"
                )
            if array.min() < 0 or array.max() > 255 or not np.all(array == np.round(array)):
                raise HTTPProblem(422, f"inputs[{i}] must hold integer pixel values 0..255")
            images.append(array.astype(np.uint8))
        return images, False, bool(payload.get("return_logits"))
    rows = [_row(item, pre.columns, i) for i, item in enumerate(inputs)]
    return _array(rows, np.float32), False, bool(payload.get("return_logits"))


def _row(item: Any, columns: tuple[str, ...], i: int) -> Any:
    """A tabular row given as a list, or as an object keyed by column name."""
    if not isinstance(item, dict):
        return item
    missing = [c for c in columns if c not in item]
    if missing:
        raise HTTPProblem(422, f"inputs[{i}] lacks columns {missing}")
    return [item[c] for c in columns]


def _array(value: Any, dtype: type) -> np.ndarray:
    try:
        array: np.ndarray = np.asarray(value, dtype=dtype)
    except (ValueError, TypeError) as e:
        raise HTTPProblem(422, f"inputs are not a regular array of numbers ({e})") from e
    if not np.all(np.isfinite(array)):
        raise HTTPProblem(422, "inputs contain non-finite numbers")
    return array


def _answer(model: EdgeModel, inputs: Any, preprocessed: bool, logits: bool) -> dict[str, Any]:
    """Run the model (in a worker thread) and shape the JSON answer."""
    prediction = model.predict(inputs) if preprocessed else model.predict_raw(inputs)
    predictions = [
        {"label": label, "index": int(index), "score": float(score)}
        for label, index, score in zip(
            prediction.labels, prediction.indices, prediction.scores, strict=True
        )
    ]
    if logits:
        for entry, row in zip(predictions, prediction.logits.tolist(), strict=True):
            entry["logits"] = row
    return {
        "version": model.manifest.version,
        "bundle_id": model.manifest.bundle_id,
        "artifact": model.artifact.file,
        "predictions": predictions,
    }


def create_app(config: ServeConfig, model: EdgeModel | None = None) -> Starlette:
    """The serving app; with ``config.agent_dir`` it follows the agent's activations.

    Parameters
    ----------
    config
        What to serve and the request limits.
    model
        The already loaded model of ``config.bundle`` (``load_bundle``); loaded at
        start-up when omitted.

    Raises
    ------
    ConfigError
        Neither or both of ``bundle`` and ``agent_dir`` given.
    """
    from fedge.shared.errors import ConfigError

    if (config.bundle is None) == (config.agent_dir is None):
        raise ConfigError("serve either a BUNDLE or --agent-dir DIR (exactly one)")
    metrics = ServeMetrics()
    slot = ModelSlot(config, metrics)
    if model is not None and config.bundle is not None:
        slot.set(model, config.bundle.resolve())

    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        model = slot.model  # held for the whole request, whatever is swapped meanwhile
        status, count = 200, 0
        try:
            if model is None:
                raise HTTPProblem(503, "no model is active yet")
            content_type = request.headers.get("content-type", "application/json")
            kind = content_type.split(";")[0].strip().lower()
            body = await _read_body(request, config.max_body_bytes)
            image_task = isinstance(model.task.preprocessing, ImagePreprocessing)
            if kind in ("application/json", "text/json"):
                inputs, preprocessed, logits = _json_inputs(body, model, config.max_batch)
            elif kind.startswith("image/") or kind == "multipart/form-data":
                if not image_task:
                    raise HTTPProblem(415, "this model takes tabular rows as JSON, not images")
                files = (
                    [body] if kind.startswith("image/") else _multipart_images(body, content_type)
                )
                if len(files) > config.max_batch:
                    raise HTTPProblem(413, f"{len(files)} images; the limit is {config.max_batch}")
                spec = model.task.preprocessing
                # Decoding can take milliseconds: off the event loop, like inference.
                inputs = await run_in_threadpool(lambda: [_decode_image(f, spec) for f in files])  # type: ignore[arg-type]
                preprocessed, logits = False, False
            else:
                raise HTTPProblem(415, f"unsupported content type {kind!r}; send JSON or an image")
            count = len(inputs)
            answer = await run_in_threadpool(_answer, model, inputs, preprocessed, logits)
            answer["latency_ms"] = (time.perf_counter() - start) * 1000
            return JSONResponse(answer)
        except HTTPProblem as e:
            status = e.status
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except DataError as e:
            status = 422
            return JSONResponse({"error": str(e)}, status_code=422)
        except Exception as e:  # the server must stay up whatever a request does
            status = 500
            log.exception("predict failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)
        finally:
            metrics.observe(status, time.perf_counter() - start, count)

    async def healthz(request: Request) -> Response:
        model = slot.model
        if model is None:
            return JSONResponse({"status": "no-model"}, status_code=503)
        return JSONResponse({"status": "ok", **model.describe()})

    async def metrics_endpoint(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def watch() -> None:
        """Follow ``current`` (agent mode) and hand latency figures to the agent."""
        last_stats = 0.0
        while True:
            await asyncio.sleep(config.watch_interval)
            try:
                await slot.refresh()
            except Exception:  # keep watching: the next activation may load fine
                log.exception("reloading the model failed")
            if config.agent_dir is not None and time.monotonic() - last_stats > 5.0:
                last_stats = time.monotonic()
                stats = metrics.stats()
                with contextlib.suppress(OSError):
                    await run_in_threadpool(
                        atomic_write_json, config.agent_dir / "serve-stats.json", stats
                    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await slot.refresh()
        if slot.model is None and config.bundle is not None:
            raise BundleError(f"cannot serve {config.bundle}; see the log above")
        task = asyncio.create_task(watch())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.slot = slot
    app.state.metrics = metrics
    return app


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted (blocking). A bad BUNDLE fails here, before listening.

    Raises
    ------
    BundleError, SecurityError, ConfigError, ModelError
        The bundle does not verify, fails its self-test, or cannot be loaded.
    """
    import uvicorn

    model = None
    if config.bundle is not None:
        model = ModelSlot(config, ServeMetrics()).load(config.bundle)
    uvicorn.run(create_app(config, model), host=host, port=port, log_level="warning")
