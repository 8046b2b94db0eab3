"""Benchmark fedge's edge artifacts: int8 vs fp32 size and latency, runtime overhead, accuracy.

For torchvision ResNet-18 and MobileNetV3-small (random init, 3xSxS inputs,
S=224 by default) and the demo model (the small CNN trained a few epochs on the
built-in digits), it exports a signed bundle with ``fedge.edge.export`` (ONNX
fp32 / int8 dynamic / int8 static, TFLite fp32 / int8) and measures, in one run:

* size ratio int8 / fp32 of every int8 artifact (target <= 0.30);
* latency ratio int8 / fp32 at batch 1 for ONNX Runtime and LiteRT (target <= 0.6
  on ResNet-18), single-threaded, runs of the artifacts interleaved, medians;
* fedge's runtime overhead: ``EdgeModel.predict_tensor`` vs a bare
  ``onnxruntime.InferenceSession.run`` on the same fp32 ONNX file (target <= 5%);
* the accuracy drop of every artifact on the demo task's test split (target <= 1 point).

    python benchmarks/edge_formats.py [--size 224] [--rounds 60] [--json results.json]
    python benchmarks/edge_formats.py --variants --models resnet18,mobilenet_v3_small

``--variants`` instead compares static int8 settings side by side on the same
fp32 ONNX file (``fedge.edge.export.quantize``): each target's types
(``STATIC_TARGETS``), per-tensor weights, and leaving all but Conv (and Gemm)
in fp32, with the latency ratio to fp32 and the largest logit difference.

Random-init backbones have meaningless accuracy; their export runs with the
accuracy check off (``max_accuracy_drop=100``): they are here for size and speed.
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

THREADS = 1  # one thread: stable numbers on a shared machine, and like a small device
TARGETS = {"size": 0.30, "latency": 0.6, "overhead": 0.05, "drop": 1.0}


def build_model(name: str, size: int, epochs: int) -> tuple[Any, Any, Any, Any]:
    """(model, task, eval set, calibration set) for ``name`` on digits at ``size``."""
    import torch

    from fedge.edge.export.calibration import PreparedData, load_prepared
    from fedge.shared.config import RunConfig
    from fedge.shared.ml.data import load_data, task_for_run
    from fedge.shared.ml.models import build_run_model
    from fedge.shared.ml.training import make_loader, train
    from fedge.shared.preprocess import prepare

    torch.manual_seed(0)
    cfg = RunConfig(model=name, image_size=0 if name == "cnn" else size)
    task = task_for_run(cfg)
    model = build_run_model(cfg, task, load_weights=False)
    if epochs:
        data = load_data("digits", task)
        loader = make_loader(prepare(data.x, task.preprocessing), data.y, 32, True)
        train(model, loader, epochs, 0.05, torch.device("cpu"))
    evaluation = load_prepared("digits:test", task)
    calibration = load_prepared("digits:public", task, 64 if name != "cnn" else 256)
    if name != "cnn":  # accuracy is not judged: a few examples exercise validation
        evaluation = PreparedData(evaluation.x[:32], evaluation.y[:32], evaluation.spec)
    return model.eval(), task, evaluation, calibration


def export(name: str, size: int, epochs: int, work: Path, key: Any) -> Any:
    """A signed bundle of every format and quantization for ``name``; its report."""
    from fedge.edge.export.pipeline import export_model

    model, task, evaluation, calibration = build_model(name, size, epochs)
    started = time.perf_counter()
    report = export_model(
        model, task, work / f"bundle-{name}", eval_set=evaluation, calibration=calibration,
        private_key=key, version=f"bench-{name}", progress=False,
        max_accuracy_drop=1.0 if name == "cnn" else 100.0,
    )  # fmt: skip
    print(f"  exported {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return report, evaluation.x[:1]


def bare_runner(path: Path, fmt: str) -> Callable[[np.ndarray], Any]:
    """The runtime on its own, batch 1, ``THREADS`` threads."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(["logits"], {"input": x})
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=THREADS)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]

    def run(x: np.ndarray) -> Any:
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        return interpreter.get_tensor(out)

    return run


def interleaved(runners: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, rounds: int
                ) -> dict[str, float]:  # fmt: skip
    """Median ms per runner; each round runs every runner once, in rotating order."""
    names = list(runners)
    for name in names:  # warm up: first runs allocate and pick kernels
        for _ in range(3):
            runners[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            runners[name](x)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: float(np.median(values)) for name, values in times.items()}


def measure(report: Any, sample: np.ndarray, public_key: Path, rounds: int) -> dict[str, Any]:
    from fedge.edge.device.runtime import EdgeModel
    from fedge.shared.bundle import read_manifest

    bundle_dir = report.bundle_dir
    artifacts = {Path(a.file).name: a for a in read_manifest(bundle_dir).artifacts}
    runners = {n: bare_runner(bundle_dir / a.file, a.format) for n, a in artifacts.items()}
    edge = EdgeModel.open(bundle_dir, public_key, artifact="model-fp32.onnx", threads=THREADS)
    runners["edge:model-fp32.onnx"] = edge.predict_tensor
    ms = interleaved(runners, np.ascontiguousarray(sample, np.float32), rounds)
    sizes = {n: a.size for n, a in artifacts.items()}
    pairs = {
        "onnx int8-dynamic": ("model-int8-dynamic.onnx", "model-fp32.onnx"),
        "onnx int8-static": ("model-int8-static.onnx", "model-fp32.onnx"),
        "tflite int8": ("model-int8.tflite", "model-fp32.tflite"),
    }
    ratios = {
        label: {
            "size": sizes[q] / sizes[f],
            "latency": ms[q] / ms[f],
            "ms_fp32": ms[f],
            "ms_int8": ms[q],
        }
        for label, (q, f) in pairs.items()
        if q in sizes and f in sizes
    }
    overhead = ms["edge:model-fp32.onnx"] / ms["model-fp32.onnx"] - 1.0
    drops = {row["artifact"]: row.get("accuracy_drop_points") for row in report.rows}
    return {"ms": ms, "sizes": sizes, "ratios": ratios, "overhead": overhead, "drops": drops}


VARIANTS: dict[str, dict[str, Any]] = {
    "x86-64 (U8S8, 7-bit w)": {"target": "x86-64"},
    "x86-64-vnni (U8S8)": {"target": "x86-64-vnni"},
    "arm64 (S8S8)": {"target": "arm64"},
    "U8S8 per-tensor": {"settings": {"per_channel": False}},
    "U8S8 Conv+Gemm only": {"settings": {"op_types": ("Conv", "Gemm", "MatMul")}},
    "U8S8 Conv only": {"settings": {"op_types": ("Conv",)}},
}


def variants(name: str, size: int, work: Path, rounds: int) -> dict[str, dict[str, float]]:
    """Latency (ms, ratio to fp32) and max |logit diff| of each static int8 variant."""
    import dataclasses

    import torch

    from fedge.edge.export.calibration import CalibrationReader
    from fedge.edge.export.onnx_export import export_onnx
    from fedge.edge.export.quantize import STATIC_TARGETS, quantize_onnx_static

    model, _, evaluation, calibration = build_model(name, size, 0)
    fp32 = work / f"{name}-fp32.onnx"
    export_onnx(model, torch.from_numpy(evaluation.x[:1]), fp32)
    paths = {"fp32": fp32}
    reader = CalibrationReader(calibration.x)
    for label, spec in VARIANTS.items():
        target: Any = spec.get("target")
        if target is None:
            target = dataclasses.replace(STATIC_TARGETS["x86-64"], **spec["settings"])
        paths[label] = quantize_onnx_static(fp32, work / f"{name}-{len(paths)}.onnx", reader,
                                            method="minmax", target=target)  # fmt: skip
    runners = {label: bare_runner(path, "onnx") for label, path in paths.items()}
    x = np.ascontiguousarray(evaluation.x[:1], np.float32)
    ms = interleaved(runners, x, rounds)
    probe = np.ascontiguousarray(evaluation.x[:8], np.float32)
    reference = np.concatenate([runners["fp32"](row[None])[0] for row in probe])
    out = {}
    for label, runner in runners.items():
        got = np.concatenate([runner(row[None])[0] for row in probe])
        out[label] = {"ms": ms[label], "ratio": ms[label] / ms["fp32"],
                      "max_diff": float(np.abs(got - reference).max())}  # fmt: skip
    return out


def render_variants(results: dict[str, dict[str, dict[str, float]]]) -> None:
    print("static int8 settings vs fp32 (ONNX Runtime, batch 1, 1 thread, interleaved medians)")
    print(f"{'model':<20} {'variant':<26} {'ms':>8} {'ratio':>6} {'max |diff|':>11}")
    for model, rows in results.items():
        for label, r in rows.items():
            print(f"{model:<20} {label:<26} {r['ms']:8.3f} {r['ratio']:6.2f} {r['max_diff']:11.4f}")
        best = min((r["ratio"], label) for label, r in rows.items() if label != "fp32")
        verdict = "MET " if best[0] <= TARGETS["latency"] else "MISS"
        print(f"{verdict}  {model}: best static int8 <= 0.6x fp32: {best[0]:.2f} ({best[1]})")


def render(results: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    table = Table(title="int8 / fp32 (batch 1, 1 thread, medians of interleaved runs)")
    for column in ("model", "artifact", "size ratio", "fp32 ms", "int8 ms", "latency ratio"):
        table.add_column(column, justify="left" if column in ("model", "artifact") else "right")
    for model, result in results.items():
        for label, r in result["ratios"].items():
            table.add_row(
                model, label, f"{r['size']:.3f}", f"{r['ms_fp32']:.3f}", f"{r['ms_int8']:.3f}",
                f"{r['latency']:.2f}",
            )  # fmt: skip
    console.print(table)
    overhead = Table(title="fedge runtime vs bare onnxruntime, model-fp32.onnx")
    for column in ("model", "bare ms", "EdgeModel ms", "overhead"):
        overhead.add_column(column, justify="right" if column != "model" else "left")
    for model, result in results.items():
        ms = result["ms"]
        overhead.add_row(
            model, f"{ms['model-fp32.onnx']:.3f}", f"{ms['edge:model-fp32.onnx']:.3f}",
            f"{result['overhead'] * 100:+.1f}%",
        )  # fmt: skip
    console.print(overhead)
    demo = results.get("cnn (demo)")
    if demo:
        drops = ", ".join(f"{k} {v:+.2f}" for k, v in demo["drops"].items() if v is not None)
        console.print(f"demo accuracy drop (points) on digits:test: {drops}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input side of the backbones")
    parser.add_argument("--rounds", type=int, default=60, help="timed runs per artifact")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the demo CNN")
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small,cnn")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--variants", action="store_true", help="compare static int8 settings")
    args = parser.parse_args()
    if args.variants:
        with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
            found = {name: variants(name, args.size, Path(tmp), args.rounds)
                     for name in args.models.split(",") if name != "cnn"}  # fmt: skip
        render_variants(found)
        if args.json:
            args.json.write_text(json.dumps(found, indent=2))
        return
    from fedge.shared import signing

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        private = work / "signing.key"
        public = signing.generate_signing_key(private)
        key = signing.load_private_key(private)
        for name in args.models.split(","):
            label = "cnn (demo)" if name == "cnn" else f"{name} {args.size}x{args.size}"
            epochs = args.epochs if name == "cnn" else 0
            report, sample = export(name, args.size, epochs, work, key)
            results[label] = measure(report, sample, public, args.rounds)
    render(results)
    check(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


def check(results: dict[str, dict[str, Any]]) -> None:
    """Print each target as met or missed, per model (the script reports; it does not fail)."""
    for model, res in results.items():
        size = max(r["size"] for r in res["ratios"].values())
        latency = min(r["latency"] for r in res["ratios"].values())
        ms = res["ms"]
        extra_us = (ms["edge:model-fp32.onnx"] - ms["model-fp32.onnx"]) * 1000.0
        lines = [
            ("int8 size <= 0.30x fp32", size <= TARGETS["size"], f"worst {size:.3f}"),
            ("best int8 latency <= 0.6x fp32", latency <= TARGETS["latency"], f"{latency:.2f}"),
            (
                "runtime overhead <= 5%",
                res["overhead"] <= TARGETS["overhead"],
                f"{res['overhead'] * 100:+.1f}% ({extra_us:+.0f} us per call)",
            ),
        ]
        drops = [v for v in res["drops"].values() if v is not None]
        if model.startswith("cnn") and drops:
            drop = max(drops)
            lines.append(("accuracy drop <= 1 point", drop <= TARGETS["drop"], f"{drop:+.2f}"))
        for text, ok, detail in lines:
            print(f"{'MET ' if ok else 'MISS'}  {model}: {text}: {detail}")


if __name__ == "__main__":
    main()
