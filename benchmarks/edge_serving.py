"""Benchmark edge serving and over-the-air rollout on loopback.

Measures, for one bundle artifact:

* the bare runtime in-process: ``EdgeModel.predict_raw`` on one example (p50/p99);
* ``POST /predict`` of ``fedge edge serve`` (its own process) at concurrency 1, 4 and
  16: throughput, p50/p99 and the ratio of HTTP p50 to the bare p50;
* the time from ``registry promote`` until every agent (2-3, short poll interval)
  reports the new version active, and the same for ``registry rollback``.

By default it trains a small CNN on the built-in digits for a few epochs and
exports it with ``fedge.edge.export`` (ONNX fp32 + dynamic int8; the runtime
picks the smallest validated artifact, as on a device). ``--synthetic`` uses a
one-layer ONNX model instead (pure serving overhead, no torch needed).

    python benchmarks/edge_serving.py [--requests 400] [--agents 3] [--interval 0.5]
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def digits_bundles(work: Path, private: Path) -> tuple[list[Path], np.ndarray]:
    """Train a small CNN on digits briefly, export two signed bundle versions of it."""
    import torch

    from fedge.edge.export.pipeline import export_bundle
    from fedge.shared.config import load_run_config
    from fedge.shared.ml.checkpoint import save_checkpoint
    from fedge.shared.ml.data import load_data, task_for_run
    from fedge.shared.ml.models import build_model
    from fedge.shared.ml.training import make_loader, train
    from fedge.shared.preprocess import prepare

    torch.manual_seed(0)
    cfg = load_run_config(None, task="digits", model="cnn")
    task = task_for_run(cfg)
    data = load_data("digits", task)
    model = build_model("cnn", task)
    loader = make_loader(prepare(data.x, task.preprocessing), data.y, 32, shuffle=True)
    train(model, loader, epochs=3, lr=0.05, device=torch.device("cpu"))
    run = work / "run"
    save_checkpoint(run / "model.safetensors", model.state_dict(), 1, "cnn", task, {}, {})
    (run / "summary.json").write_text(json.dumps({"task": "digits", "model": "cnn", "rounds": 1}))
    bundles = []
    for version in ("bench-v1", "bench-v2"):
        report = export_bundle(
            run, work / version, formats=("onnx",), quantize=("none", "dynamic"),
            signing_key=private, progress=False, version=version,
        )  # fmt: skip
        assert report.bundle_dir is not None
        bundles.append(report.bundle_dir)
    test = load_data("digits:test", task)
    return bundles, np.asarray(test.x[:64], dtype=np.uint8)


def synthetic_bundles(work: Path, private: Path) -> tuple[list[Path], np.ndarray]:
    """Two versions of the one-layer test model (serving overhead only)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from deploy_support import make_bundle

    bundles = [
        make_bundle(work / v, private, v, seed=i) for i, v in enumerate(("syn-v1", "syn-v2"))
    ]
    rng = np.random.default_rng(0)
    return bundles, rng.integers(0, 256, size=(64, 8, 8), dtype=np.uint8)


def bare_runtime(bundle: Path, key: Path, examples: np.ndarray, runs: int) -> dict[str, Any]:
    """In-process latency of one-example predictions, raw (with preprocessing) and tensor."""
    from fedge.edge.device.runtime import EdgeModel
    from fedge.shared.preprocess import prepare

    with EdgeModel.open(bundle, key) as model:
        tensors = prepare(examples, model.task.preprocessing)
        for i in range(20):
            model.predict_raw(examples[i % len(examples)][None])
        raw, tensor = [], []
        for i in range(runs):
            j = i % len(examples)
            start = time.perf_counter()
            model.predict_raw(examples[j][None])
            raw.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            model.predict_tensor(tensors[j : j + 1])
            tensor.append((time.perf_counter() - start) * 1000)
        return {"artifact": model.artifact.file, "raw": _percentiles(raw),
                "tensor": _percentiles(tensor)}  # fmt: skip


async def _load(url: str, examples: np.ndarray, requests: int, concurrency: int) -> dict[str, Any]:
    import httpx

    bodies = [{"inputs": [examples[i % len(examples)].tolist()]} for i in range(requests)]
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                body = queue.get_nowait()
                start = time.perf_counter()
                response = await client.post("/predict", json=body)
                latencies.append((time.perf_counter() - start) * 1000)
                failures += response.status_code != 200

        for _ in range(3):  # warm-up
            await client.post("/predict", json=bodies[0])
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "failures": failures,
            "throughput_rps": requests / wall, **_percentiles(latencies)}  # fmt: skip


def http_serving(bundle: Path, key: Path, examples: np.ndarray, requests: int, work: Path) -> list:
    """``fedge edge serve BUNDLE`` in its own process, loaded at concurrency 1, 4 and 16."""
    import httpx

    from fedge.shared.processes import ProcessGroup, free_port, wait_until

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "fedge", "edge", "serve", str(bundle),
               "--port", str(port), "--key", str(key)]  # fmt: skip
    with ProcessGroup() as group:
        proc = group.start("serve", command, work / "serve.log")

        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "edge serve", proc, work / "serve.log")
        return [asyncio.run(_load(url, examples, requests, c)) for c in (1, 4, 16)]


def rollout(bundles: list[Path], key: Path, agents: int, interval: float, work: Path) -> dict:
    """Seconds from promote (and from rollback) until every agent reports the version active."""
    from fedge.server.registry.api import registry_command
    from fedge.server.registry.devices import DeviceStore
    from fedge.server.registry.fleet import fleet
    from fedge.server.registry.publish import publish_bundle
    from fedge.server.registry.store import Registry
    from fedge.shared.processes import ProcessGroup, free_port, port_open, wait_until

    edge_module = "fedge"
    data = work / "registry"
    registry = Registry(data)
    v1, _ = publish_bundle(registry, bundles[0], key, "stable")
    v2, _ = publish_bundle(registry, bundles[1], key)
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def all_active(version: str) -> bool:
        views = fleet(data)
        return len(views) == agents and all(v.active_version == version for v in views)

    def timed(action: Any, version: str) -> float:
        start = time.perf_counter()
        action()
        while not all_active(version):
            time.sleep(0.02)
        return time.perf_counter() - start

    with ProcessGroup() as group:
        proc = group.start("registry", registry_command(data, "127.0.0.1", port), work / "reg.log")
        wait_until(lambda: port_open("127.0.0.1", port), 60, "registry", proc, work / "reg.log")
        for i in range(agents):
            token = work / f"agent-{i}.token"
            token.write_text(DeviceStore(data).add(f"bench-{i}"))
            command = [sys.executable, "-m", edge_module, "edge", "agent", "--server", url,
                       "--dir", str(work / f"device-{i}"), "--token-file", str(token),
                       "--key", str(key), "--interval", str(interval)]  # fmt: skip
            group.start(f"agent-{i}", command, work / f"agent-{i}.log")
        wait_until(lambda: all_active(v1.version), 120, "agents on v1")
        promote = timed(lambda: registry.promote(v2.version, "stable"), v2.version)
        back = timed(lambda: registry.rollback("stable"), v1.version)
    return {"agents": agents, "interval_s": interval, "promote_to_all_active_s": promote,
            "rollback_to_all_active_s": back}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="Requests per concurrency.")
    parser.add_argument("--runs", type=int, default=300, help="Bare runtime predictions.")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.5, help="Agent poll interval (s).")
    parser.add_argument("--synthetic", action="store_true", help="One-layer model, no torch.")
    args = parser.parse_args(argv)

    from fedge.shared.signing import generate_signing_key

    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        private = work / "keys" / "signing.key"
        public = generate_signing_key(private)
        make = synthetic_bundles if args.synthetic else digits_bundles
        bundles, examples = make(work, private)
        bare = bare_runtime(bundles[0], public, examples, args.runs)
        http = http_serving(bundles[0], public, examples, args.requests, work)
        ota = rollout(bundles, public, args.agents, args.interval, work)
    for row in http:
        row["p50_vs_bare_raw"] = row["p50_ms"] / bare["raw"]["p50_ms"]
    result = {"bare": bare, "http": http, "rollout": ota}
    _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    bare = result["bare"]
    print(f"artifact: {bare['artifact']}")
    print(
        f"bare runtime, 1 example: raw p50 {bare['raw']['p50_ms']:.3f} ms, "
        f"p99 {bare['raw']['p99_ms']:.3f} ms; tensor p50 {bare['tensor']['p50_ms']:.3f} ms"
    )
    print("concurrency | requests | failures | throughput (req/s) | p50 ms | p99 ms | p50 / bare")
    for r in result["http"]:
        print(
            f"{r['concurrency']:>11} | {r['requests']:>8} | {r['failures']:>8} | "
            f"{r['throughput_rps']:>18.1f} | {r['p50_ms']:>6.2f} | {r['p99_ms']:>6.2f} | "
            f"{r['p50_vs_bare_raw']:>9.1f}x"
        )
    ota = result["rollout"]
    print(
        f"rollout, {ota['agents']} agents polling every {ota['interval_s']} s: promote -> all "
        f"active {ota['promote_to_all_active_s']:.2f} s; rollback -> all active "
        f"{ota['rollback_to_all_active_s']:.2f} s"
    )
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
