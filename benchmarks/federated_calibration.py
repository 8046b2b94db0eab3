"""Benchmark federated static-int8 calibration against central and shifted-public calibration.

For fedge's digits CNN (8x8 grey) and torchvision ``mobilenet_v3_small`` (digits
upscaled by fedge's preprocessing to SxS RGB, S=32 by default), each trained a few
epochs on the federated pool of digits, with three non-IID sites (``digits#i/3``),
it quantizes the fp32 ONNX and TFLite models to static int8 four ways, in one run:

(a) central: calibrated on the union of the sites' data (ORT ``quantize_static``,
    percentile; ai-edge-quantizer's own ``calibrate`` for TFLite);
(b) federated: ``fedge.shared.activation_histograms`` at each site (two passes),
    summed, ranges by ORT's percentile on the histograms
    (``fedge.edge.export.federated_quantize``);
(c) public, shifted: central calibration on the public split made darker
    (pixel values x0.5), a split from another distribution;
(d) federated with DP: as (b), Gaussian noise on both passes' sums
    (``noise_multiplier`` x the L2 sensitivity).

It prints the accuracy on digits:test, the drop against fp32 (points) and top-1
agreement with the fp32 artifact. It also prints an in-process time estimate:
one site's histogram passes vs one local training epoch on the same data (the
ratio to a real federated round, messaging included, comes from the end-to-end
``fedge export --federated`` path, not from here).

    python benchmarks/federated_calibration.py [--size 32] [--epochs 3] [--json out.json]
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SITES = 3
DARKER = 0.5  # the public split's brightness factor for (c)


def load_sets(name: str, size: int, per_site: int) -> dict[str, Any]:
    """The task, sites' inputs/labels, union, test set and the shifted public split.

    ``per_site`` > 0 keeps that many examples per site (the first ones), for
    calibration and the timed epoch alike; training uses them all.
    """
    from fedge.shared.config import RunConfig
    from fedge.shared.ml.data import load_data, task_for_run
    from fedge.shared.preprocess import prepare

    cfg = RunConfig(model=name, image_size=0 if name == "cnn" else size)
    task = task_for_run(cfg)
    sites = [load_data(f"digits#{i}/{SITES}", task) for i in range(SITES)]
    train_x = np.concatenate([prepare(s.x, task.preprocessing) for s in sites])
    train_y = np.concatenate([s.y for s in sites])
    if per_site:
        sites = [type(s)(s.x[:per_site], s.y[:per_site], s.classes) for s in sites]
    public = load_data("digits:public", task)
    shifted = np.clip(public.x.astype(np.float32) * DARKER, 0, 255).astype(np.uint8)
    test = load_data("digits:test", task)
    site_x = [prepare(s.x, task.preprocessing) for s in sites]
    return {
        "cfg": cfg, "task": task, "sites": site_x, "site_y": [s.y for s in sites],
        "train_x": train_x, "train_y": train_y,
        "union": np.concatenate(site_x), "union_y": np.concatenate([s.y for s in sites]),
        "public": prepare(shifted, task.preprocessing),
        "test": prepare(test.x, task.preprocessing), "test_y": test.y,
    }  # fmt: skip


def train_model(sets: dict[str, Any], epochs: int) -> tuple[Any, float]:
    """The model trained centrally on the sites' data; seconds of one local epoch at site 0."""
    import torch

    from fedge.shared.ml.models import build_run_model
    from fedge.shared.ml.training import make_loader, train

    torch.manual_seed(0)
    model = build_run_model(sets["cfg"], sets["task"], load_weights=False)
    loader = make_loader(sets["train_x"], sets["train_y"], 32, True)
    train(model, loader, epochs, 0.05, torch.device("cpu"))
    site = make_loader(sets["sites"][0], sets["site_y"][0], 32, True)
    scratch = copy.deepcopy(model)  # the timed epoch must not change the benchmarked model
    started = time.perf_counter()
    train(scratch, site, 1, 0.05, torch.device("cpu"))
    return model.eval(), time.perf_counter() - started


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: np.asarray(session.run(None, {name: x})[0])


def tflite_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from fedge.edge.device.runtime import _TFLiteBackend  # the device runtime's int8 I/O

    backend = _TFLiteBackend(path, None)
    return backend.run


def federated_ranges(
    model: bytes, fmt: str, spec: Any, sites: list[np.ndarray], noise: float
) -> tuple[dict[str, tuple[float, float]], float]:
    """Two passes over the sites; the ranges, and the seconds site 0 spent on histograms."""
    from fedge.edge.export.federated_quantize import federated_ranges
    from fedge.shared.activation_histograms import gaussian_noise, site_histograms

    rng = np.random.default_rng(0)
    seconds = 0.0

    def at_sites(model: bytes, fmt: str, bins: Any) -> np.ndarray:
        nonlocal seconds
        counts = []
        for index, x in enumerate(sites):
            started = time.perf_counter()
            counts.append(site_histograms(model, fmt, x, bins))
            if index == 0:
                seconds += time.perf_counter() - started
        summed = np.sum(counts, axis=0)
        return gaussian_noise(summed, bins, noise, rng) if noise else summed

    return federated_ranges(model, fmt, spec, at_sites, noise_multiplier=noise), seconds


def onnx_variants(model: Any, sets: dict[str, Any], work: Path, noise: float) -> dict[str, Any]:
    """fp32 and the four static int8 ONNX artifacts; site histogram time."""
    import torch

    from fedge.edge.export.calibration import CalibrationReader
    from fedge.edge.export.federated_quantize import (
        onnx_coarse_spec,
        quantize_onnx_static_from_ranges,
    )
    from fedge.edge.export.onnx_export import export_onnx
    from fedge.edge.export.quantize import quantize_onnx_static

    fp32 = export_onnx(model, torch.from_numpy(sets["test"][:1]), work / "fp32.onnx")
    shipped, spec = onnx_coarse_spec(fp32)
    paths = {"fp32": fp32}
    paths["central"] = quantize_onnx_static(fp32, work / "c.onnx", CalibrationReader(sets["union"]))
    ranges, seconds = federated_ranges(shipped, "onnx", spec, sets["sites"], 0.0)
    paths["federated"] = quantize_onnx_static_from_ranges(fp32, work / "f.onnx", ranges)
    paths["public-shifted"] = quantize_onnx_static(
        fp32, work / "p.onnx", CalibrationReader(sets["public"])
    )
    ranges, _ = federated_ranges(shipped, "onnx", spec, sets["sites"], noise)
    paths[f"federated+dp({noise:g})"] = quantize_onnx_static_from_ranges(
        fp32, work / "d.onnx", ranges
    )
    return {"runners": {k: (onnx_runner, p) for k, p in paths.items()}, "site_seconds": seconds}


def tflite_central(model: bytes, x: np.ndarray, out: Path) -> Path:
    """ai-edge-quantizer's own static calibration on ``x`` (one example per step)."""
    from ai_edge_quantizer import quantizer, recipe

    from fedge.edge.export.tflite_export import _quiet_litert
    from fedge.shared.activation_histograms import tflite_signature

    with _quiet_litert():
        engine = quantizer.Quantizer(model)
        engine.load_quantization_recipe(recipe.static_wi8_ai8())
        signature, name = tflite_signature(model)
        result = engine.calibrate({signature: [{name: row[None]} for row in x]})
        quantized = engine.quantize(calibration_result=result, enable_progress_report=False)
    out.write_bytes(bytes(quantized.quantized_model))
    return out


def tflite_variants(model: Any, sets: dict[str, Any], work: Path, noise: float) -> dict[str, Any]:
    """fp32 and the four static int8 TFLite artifacts; site histogram time."""
    import torch

    from fedge.edge.export.federated_quantize import quantize_tflite_static_from_ranges
    from fedge.edge.export.tflite_export import export_tflite
    from fedge.shared.activation_histograms import coarse_spec

    fp32 = export_tflite(model, torch.from_numpy(sets["test"][:1]), work / "fp32.tflite")
    data = fp32.read_bytes()
    spec = coarse_spec(data, "tflite")
    paths = {"fp32": fp32, "central": tflite_central(data, sets["union"], work / "c.tflite")}
    ranges, seconds = federated_ranges(data, "tflite", spec, sets["sites"], 0.0)
    paths["federated"] = quantize_tflite_static_from_ranges(fp32, work / "f.tflite", ranges)
    paths["public-shifted"] = tflite_central(data, sets["public"], work / "p.tflite")
    ranges, _ = federated_ranges(data, "tflite", spec, sets["sites"], noise)
    paths[f"federated+dp({noise:g})"] = quantize_tflite_static_from_ranges(
        fp32, work / "d.tflite", ranges
    )
    return {"runners": {k: (tflite_runner, p) for k, p in paths.items()}, "site_seconds": seconds}


def score(variants: dict[str, Any], sets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Accuracy, drop vs fp32 (points) and top-1 agreement with fp32, per variant."""
    logits, failed = {}, {}
    for label, (runner, path) in variants["runners"].items():
        try:
            logits[label] = runner(path)(sets["test"])
        except Exception as e:  # an artifact the runtime cannot load is a result too
            failed[label] = str(e).strip().splitlines()[0][:120]
    reference = logits["fp32"].argmax(1)
    base = float((reference == sets["test_y"]).mean())
    rows: dict[str, dict[str, Any]] = {
        label: {"accuracy": float("nan"), "drop_points": float("nan"),
                "agreement": float("nan"), "error": why}
        for label, why in failed.items()
    }  # fmt: skip
    for label, out in logits.items():
        accuracy = float((out.argmax(1) == sets["test_y"]).mean())
        rows[label] = {
            "accuracy": accuracy,
            "drop_points": 100 * (base - accuracy),
            "agreement": float((out.argmax(1) == reference).mean()),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="input side of mobilenet_v3_small")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of each model")
    parser.add_argument("--models", default="cnn,mobilenet_v3_small")
    parser.add_argument("--noise", type=float, default=1.0, help="DP noise multiplier for (d)")
    parser.add_argument(
        "--backbone-per-site",
        type=int,
        default=150,
        help="calibration examples per site for backbones (0: all)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        for name in args.models.split(","):
            label = "cnn 8x8" if name == "cnn" else f"{name} {args.size}x{args.size}"
            print(f"  {label}: training", file=sys.stderr)
            sets = load_sets(name, args.size, 0 if name == "cnn" else args.backbone_per_site)
            model, epoch_seconds = train_model(sets, args.epochs)
            for fmt, build in (("onnx", onnx_variants), ("tflite", tflite_variants)):
                work = Path(tmp) / f"{name}-{fmt}"
                work.mkdir()
                started = time.perf_counter()
                variants = build(model, sets, work, args.noise)
                print(f"  {label}: {fmt} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
                results[f"{label} {fmt}"] = {
                    "rows": score(variants, sets),
                    "site_histogram_seconds": variants["site_seconds"],
                    "site_epoch_seconds": epoch_seconds,
                    "site_examples": [len(x) for x in sets["sites"]],
                }
                for row_label, row in results[f"{label} {fmt}"]["rows"].items():  # progress
                    print(f"    {row_label:<22} agreement {row['agreement']:.3f}", file=sys.stderr)
    render(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def render(results: dict[str, Any]) -> None:
    print(f"{'model / format':<32} {'calibration':<22} {'acc':>6} {'drop':>6} {'agree':>6}")
    for key, res in results.items():
        for label, row in res["rows"].items():
            note = f"  (cannot run: {row['error']})" if "error" in row else ""
            print(f"{key:<32} {label:<22} {row['accuracy']:6.3f} {row['drop_points']:6.2f} "
                  f"{row['agreement']:6.3f}{note}")  # fmt: skip
    print("\nin-process estimate, per site (both histogram passes vs one local training epoch;")
    print("excludes Flower messaging and process start-up, which dominate a real round):")
    for key, res in results.items():
        ratio = res["site_histogram_seconds"] / res["site_epoch_seconds"]
        print(f"  {key:<32} histograms {res['site_histogram_seconds']:6.2f} s   "
              f"epoch {res['site_epoch_seconds']:6.2f} s   ratio {ratio:5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
