"""HTTP serving of a verified bundle on a device: ``/predict``, ``/healthz``, ``/metrics``.

Starlette on uvicorn: both are already edge dependencies, torch-free and small,
parse HTTP robustly, and let slow clients wait without holding a thread. The
event loop only moves bytes: request bodies are parsed (``payload``) and models
run in worker threads, and concurrent requests for a model with a free batch
dimension run as one batch (``batching``). ``run_server`` can start several
worker processes, each with its own model. With ``--agent-dir`` every worker
follows the agent's ``current`` symlink: a new version is loaded and
self-tested first, then one reference is swapped; requests already running keep
the model object they started with, so a switch never fails a request.
"""

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fedge.edge.device.batching import MicroBatcher
from fedge.edge.device.metrics import ServeMetrics
from fedge.edge.device.openapi import openapi_schema
from fedge.edge.device.payload import BadRequest, Limits, parse_body, parses_inline
from fedge.edge.device.runtime import EdgeModel, softmax
from fedge.edge.device.selection import (
    CHOICE_FILE,
    ArtifactChoice,
    choose_and_record,
    choose_fastest_artifact,
)
from fedge.shared.atomic import atomic_write_json
from fedge.shared.errors import BundleError, ConfigError, DataError
from fedge.shared.listen import check_listen_address

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
MAX_BATCH = 256
# Bounds on the operator's own options: an unbounded wait holds every batch behind one slow
# upload, and thousands of worker processes (each a model copy) exhaust the device.
MAX_BODY_LIMIT = 1 << 30
MAX_BATCH_DELAY_MS = 1000.0
MAX_WORKERS_PER_CORE = 4
CONFIG_ENV = "FEDGE_SERVE_CONFIG"  # how ``run_server`` hands the config to worker processes
HTTPProblem = BadRequest  # the name this module used before ``payload`` existed


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
    artifact: str | None = None  # serve exactly this artifact (no measuring)
    select: str = "fastest"  # fastest (measured here) | smallest (no measuring)
    batching: bool = True  # micro-batch concurrent requests when the artifact allows it
    batch_delay_ms: float = 2.0
    max_request_pixels: int = Limits.max_request_pixels
    max_parts: int = Limits.max_parts
    workers: int = 1
    choice: dict[str, Any] | None = None  # a choice measured by the parent (workers)

    def __post_init__(self) -> None:
        if not 1 <= self.max_body_bytes <= MAX_BODY_LIMIT:
            raise ConfigError(f"the body limit must be 1 byte to {MAX_BODY_LIMIT >> 20} MiB")
        if not (
            math.isfinite(self.batch_delay_ms) and 0 <= self.batch_delay_ms <= MAX_BATCH_DELAY_MS
        ):
            raise ConfigError(
                f"--batch-delay-ms must be 0 to {MAX_BATCH_DELAY_MS:g}, not {self.batch_delay_ms}"
            )
        most = MAX_WORKERS_PER_CORE * default_workers()
        if not 0 <= self.workers <= most:
            raise ConfigError(
                f"--workers {self.workers}: at most {most} ({MAX_WORKERS_PER_CORE} per core here)"
            )
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise ConfigError(f"--threads {self.threads}: use 1 to 1024")

    @property
    def limits(self) -> Limits:
        return Limits(
            max_body_bytes=self.max_body_bytes,
            max_batch=self.max_batch,
            max_request_pixels=self.max_request_pixels,
            max_parts=self.max_parts,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @staticmethod
    def from_json(text: str) -> "ServeConfig":
        data = json.loads(text)
        for key in ("trusted_key", "bundle", "agent_dir"):
            if data.get(key) is not None:
                data[key] = Path(data[key])
        return ServeConfig(**data)


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

    def set(self, model: EdgeModel, source: Path, choice: ArtifactChoice | None = None) -> None:
        """Serve ``model`` from now on: one reference assignment (atomic for other tasks)."""
        self.model, self.target = model, str(source)
        self.metrics.reloads += 1
        self.metrics.model_info = {k: str(v) for k, v in model.describe().items() if k != "size"}
        self.metrics.artifact_choice = choice
        log.info("serving version %s (%s)", model.manifest.version, model.artifact.file)

    def choose(self, path: Path) -> ArtifactChoice | None:
        """The artifact to serve from ``path``: measured or recorded; None = the smallest."""
        config = self.config
        if config.artifact is not None or config.select != "fastest":
            return None
        if config.choice is not None and config.bundle is not None:
            return ArtifactChoice.from_dict(config.choice)  # measured once by the parent
        if config.agent_dir is not None:
            # Shared with the agent and the other workers: measured once per version.
            return choose_and_record(
                path,
                config.trusted_key,
                config.agent_dir / CHOICE_FILE,
                config.format,
                config.precision,
                threads=config.threads,
            )
        return choose_fastest_artifact(path, config.trusted_key, config.format,
                                       config.precision, threads=config.threads)  # fmt: skip

    def load(self, path: Path) -> tuple[EdgeModel, ArtifactChoice | None]:
        """Verify, choose an artifact, load it and self-test it (blocking)."""
        choice = self.choose(path)
        model = EdgeModel.open(
            path,
            self.config.trusted_key,
            self.config.format,
            self.config.precision,
            artifact=choice.file if choice is not None else self.config.artifact,
            threads=self.config.threads,
        )
        result = model.self_test()
        if not result.passed:
            model.close()
            raise BundleError(f"{path}: self-test failed ({result.detail}); not serving it")
        return model, choice

    async def refresh(self) -> None:
        """Load the bundle ``current`` points at if it changed; keep the old one on failure."""
        source = self._source()
        if source is None or str(source) == self.target:
            return
        try:
            model, choice = await run_in_threadpool(self.load, source)
        except Exception as e:  # FedgeError, or a runtime's own error type while self-testing
            self.metrics.reload_failures += 1
            self.target = str(source)  # do not retry a broken version on every tick
            log.error("cannot serve %s, keeping the previous model: %s", source, e)
            return
        # The swap: new requests see the new model; running ones hold the old object.
        self.set(model, source, choice)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one copy, not two


def _run_model(model: EdgeModel, x: np.ndarray) -> np.ndarray:
    """Logits for a batch (in a worker thread)."""
    return np.asarray(model.predict_tensor(x), dtype=np.float32)


def _answer(model: EdgeModel, logits: np.ndarray, return_logits: bool) -> dict[str, Any]:
    """Shape the JSON answer; non-finite scores (inputs far out of range) are the client's."""
    if not np.all(np.isfinite(logits)):
        raise BadRequest(
            422, "the model's output for these inputs is not finite; are they out of range?"
        )
    indices = logits.argmax(axis=1)
    scores = softmax(logits)[np.arange(len(indices)), indices]
    labels = model.labels
    predictions: list[dict[str, Any]] = [
        {"label": labels[i] if i < len(labels) else str(i), "index": int(i), "score": float(p)}
        for i, p in zip(indices.tolist(), scores.tolist(), strict=True)
    ]
    if return_logits:
        for entry, row in zip(predictions, logits.tolist(), strict=True):
            entry["logits"] = row
    return {
        "version": model.manifest.version,
        "bundle_id": model.manifest.bundle_id,
        "artifact": model.artifact.file,
        "predictions": predictions,
    }


def create_app(
    config: ServeConfig, model: EdgeModel | None = None, choice: ArtifactChoice | None = None
) -> Starlette:
    """The serving app; with ``config.agent_dir`` it follows the agent's activations.

    Parameters
    ----------
    config
        What to serve and the request limits.
    model
        The already loaded model of ``config.bundle`` (``load_bundle``); loaded at
        start-up when omitted.
    choice
        How ``model``'s artifact was chosen (shown in ``/metrics``).

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
    limits = config.limits
    if model is not None and config.bundle is not None:
        slot.set(model, config.bundle.resolve(), choice)
    batcher = MicroBatcher(_run_model, config.max_batch, config.batch_delay_ms / 1000.0)
    metrics.batcher = batcher

    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        model = slot.model  # held for the whole request, whatever is swapped meanwhile
        status, count = 200, 0
        try:
            if model is None:
                raise BadRequest(503, "no model is active yet")
            content_type = request.headers.get("content-type", "application/json")
            with batcher.arriving_request():
                body = await _read_body(request, config.max_body_bytes)
                if parses_inline(content_type):  # cheaper than a hop to a thread
                    parsed = parse_body(body, content_type, model.task, limits)
                else:  # JSON, .npy, images can take long: off the event loop, like inference
                    parsed = await run_in_threadpool(
                        parse_body, body, content_type, model.task, limits
                    )
            count = len(parsed.x)
            if config.batching and model.dynamic_batch and batcher.running():
                logits = await batcher.submit(model, parsed.x)
            else:
                logits = await run_in_threadpool(_run_model, model, parsed.x)
            answer = _answer(model, logits, parsed.return_logits)
            answer["latency_ms"] = (time.perf_counter() - start) * 1000
            return JSONResponse(answer)
        except BadRequest as e:
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
        chosen = metrics.artifact_choice
        selection = chosen.reason if chosen is not None else (
            "pinned" if config.artifact else "smallest"
        )  # fmt: skip
        return JSONResponse({"status": "ok", **model.describe(), "selection": selection,
                             "pid": os.getpid()})  # fmt: skip

    async def metrics_endpoint(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    schema = openapi_schema(limits)

    async def openapi(request: Request) -> Response:
        return JSONResponse(schema)

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
        batcher.start()
        task = asyncio.create_task(watch())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await batcher.stop()

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.slot = slot
    app.state.metrics = metrics
    app.state.batcher = batcher
    return app


def app_from_environment() -> Starlette:
    """The app of one worker process, configured by ``run_server`` through the environment."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        from fedge.shared.errors import ConfigError

        raise ConfigError(f"{CONFIG_ENV} is not set; start workers with run_server")
    return create_app(ServeConfig.from_json(text))


def body_limit_bytes(megabytes: float) -> int:
    """``--max-body-mb`` in bytes (NaN and infinity are no limit the server can hold)."""
    if not (math.isfinite(megabytes) and 0 < megabytes <= MAX_BODY_LIMIT >> 20):
        raise ConfigError(f"--max-body-mb must be above 0 and at most {MAX_BODY_LIMIT >> 20}")
    return max(1, int(megabytes * (1 << 20)))


def default_workers() -> int:
    """One worker process per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted (blocking). A bad BUNDLE fails here, before listening.

    With ``config.workers > 1`` uvicorn starts that many worker processes; each
    loads its own model (a BUNDLE's artifact is measured once, here) and, with
    ``agent_dir``, follows ``current`` on its own, so every worker switches.

    Raises
    ------
    BundleError, SecurityError, ConfigError, ModelError
        The bundle does not verify, fails its self-test, or cannot be loaded.
    """
    import uvicorn

    check_listen_address(host, port)
    workers = config.workers if config.workers > 0 else default_workers()
    if config.threads is None and workers > 1:
        # Workers x intra-op threads = cores: more only makes them fight for the CPUs.
        config = replace(config, threads=max(1, default_workers() // workers))
    model, choice = None, None
    if config.bundle is not None:
        model, choice = ModelSlot(config, ServeMetrics()).load(config.bundle)
        config = replace(config, choice=None if choice is None else choice.to_dict())
    if workers <= 1:
        uvicorn.run(create_app(config, model, choice), host=host, port=port, log_level="warning")
        return
    if model is not None:
        model.close()  # each worker loads its own copy
    os.environ[CONFIG_ENV] = config.to_json()
    uvicorn.run(
        "fedge.edge.device.serve:app_from_environment",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level="warning",
    )
