"""``fedge export`` of a user image-folder task through its sites (real SuperLink, 3 SuperNodes).

One secured federation (TLS, enrolled sites, the operator's token through the front) of
three sites, each with its own folder of digit PNGs; the coordinator holds no data. The
run was trained with SecAgg+, so export evaluates with SecAgg+. Checked in one export:

- ``fedge export RUN`` chooses the federated path by itself (no central data) and writes a
  signed bundle whose card says "evaluated at 3 sites on N examples (federated)";
- each artifact's federated accuracy and agreement equal, exactly, what the device runtime
  gives centrally on the union of the sites' held-out splits (DP noise off);
- a static int8 artifact with its scales multiplied by 100 fails the federated gate, is left
  out of the signed manifest and is named under ``failed_validation``;
- under SecAgg+ the strategy's ``aggregate_fit`` received one vector (the sum) for three
  results; a plain job on the same artifacts hands it three distinct vectors and the same
  sums.
"""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from federated_export_support import images_config, make_images_run, site_splits, write_digit_sites
from federation_support import local_federation
from typer.testing import CliRunner

from fedge.shared import artifact_job_dir, bundle

pytestmark = pytest.mark.slow
SITES = 3


def corrupt_scales(path: Path, factor: float = 100.0) -> None:
    """Multiply every float quantization scale of an ONNX QDQ model by ``factor``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if "scale" in init.name and init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    onnx.save(model, str(path))


def corrupted_static(*_args: Any, **_kwargs: Any) -> Any:
    """A stand-in for federated calibration: static int8 ONNX with scales x100, no TFLite."""
    from fedge.edge.export.calibration import CalibrationReader
    from fedge.edge.export.quantize import quantize_onnx_static

    def quantize(fp32: Path, out: Path) -> Path:
        x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
        quantize_onnx_static(fp32, out, CalibrationReader(x))
        corrupt_scales(out)
        return out

    return quantize, None


def with_artifact(bundle_dir: Path, extra: Path, work: Path) -> tuple[Path, bytes]:
    """A copy of the bundle's artifacts plus ``extra`` (static int8), and its manifest JSON."""
    raw = json.loads((bundle_dir / bundle.MANIFEST).read_text())
    entry = dict(next(a for a in raw["artifacts"] if a["file"].endswith("model-fp32.onnx")))
    content = extra.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    entry.update(file=f"artifacts/{extra.name}", precision="int8", quantization="static",
                 sha256=digest, size=len(content), validation=None)  # fmt: skip
    raw["artifacts"].append(entry)
    shutil.copytree(bundle_dir / "artifacts", work / "artifacts")
    shutil.copy(extra, work / "artifacts" / extra.name)
    text = json.dumps(raw).encode()
    (work / bundle.MANIFEST).write_bytes(text)
    return work, text


def central_counts(bundle_dir: Path, cfg: Any, folders: list[Path]) -> dict[str, Any]:
    """Each artifact's correct/agree counts on the union of the held-out splits."""
    from fedge.edge.device.runtime import load_artifact
    from fedge.shared.ml.checkpoint import load_checkpoint, load_model_from_checkpoint
    from fedge.shared.ml.training import predict_logits

    splits = site_splits(cfg, folders)
    x = np.concatenate([s.x_eval for s in splits])  # type: ignore[attr-defined]
    y = np.concatenate([s.y_eval for s in splits])  # type: ignore[attr-defined]
    model = load_model_from_checkpoint(load_checkpoint(Path(cfg.run_dir) / "model.safetensors"))
    reference = predict_logits(model, x).argmax(1)
    manifest = bundle.read_manifest(bundle_dir)
    out: dict[str, Any] = {"n": len(y), "reference": int(np.sum(reference == y))}
    for entry in manifest.artifacts:
        with load_artifact(bundle_dir, manifest, entry) as edge:
            predicted = edge.predict(x).logits.argmax(1)
        out[Path(entry.file).name] = (
            int(np.sum(predicted == y)),
            int(np.sum(predicted == reference)),
        )
    return out


def test_federated_export_of_an_image_folder_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedge.cli.export import export, validate
    from fedge.edge.export import federated_export
    from fedge.edge.export.federated import FederatedTarget, evaluate_artifacts
    from fedge.edge.export.federated_export import FederatedSource
    from fedge.edge.export.pipeline import ArtifactsFailed
    from fedge.server.submit import submit_run
    from fedge.shared.signing import generate_signing_key

    folders = write_digit_sites(tmp_path / "data", SITES)
    run_dir = tmp_path / "run"
    make_images_run(run_dir, folders, epochs=6, privacy_secagg=True)
    cfg = images_config(run_dir, privacy_secagg=True)
    key = tmp_path / "keys" / "signing.key"
    generate_signing_key(key)
    federated_calibration = federated_export.federated_static_quantizers
    monkeypatch.setattr(federated_export, "federated_static_quantizers", corrupted_static)
    with local_federation(tmp_path / "fed", [str(f) for f in folders], secure=True) as fed:
        assert fed.tls is not None and fed.token is not None
        token = tmp_path / "token"
        token.write_text(fed.token)
        app = typer.Typer()
        app.command()(export)
        app.command()(validate)  # two commands: `export` is a subcommand, as in `fedge`
        out = tmp_path / "bundle"
        result = CliRunner().invoke(app, [
            "export", str(run_dir), "--out", str(out), "--key", str(key),
            "--quantize", "none,dynamic,static", "--max-accuracy-drop", "5",
            "--server", fed.address, "--ca", str(fed.tls.ca_cert), "--token-file", str(token),
        ])  # fmt: skip
        # The corrupted artifact fails: the export says so (non-zero) but writes the bundle.
        assert isinstance(result.exception, ArtifactsFailed), result.output
        assert "model-int8-static.onnx" in str(result.exception)
        secure = artifact_job_dir.read_result(run_dir)

        manifest = bundle.read_manifest(out)
        card = json.loads((out / bundle.MODEL_CARD).read_text())
        names = {Path(a.file).name: a for a in manifest.artifacts}
        # The real federated calibration (two histogram passes through the sites, SecAgg+).
        target = FederatedTarget(fed.address, fed.tls.ca_cert, fed.token, submit_run)
        source = FederatedSource(cfg, run_dir, run_dir / "model.safetensors")
        fedcal = tmp_path / "model-int8-fedcal.onnx"
        onnx_static, _ = federated_calibration(source, target, 10)
        onnx_static(out / names["model-fp32.onnx"].file, fedcal)
        extended, manifest_json = with_artifact(out, fedcal, tmp_path / "extended")
        files = sorted((extended / "artifacts").iterdir())
        plain = evaluate_artifacts(
            cfg, run_dir, dataclasses.replace(target, secagg=False),
            manifest=manifest_json, checkpoint=(run_dir / "model.safetensors").read_bytes(),
            artifacts={f.name: f.read_bytes() for f in files}, classes=10,
        )  # fmt: skip

    central = central_counts(extended, cfg, folders)
    n = central["n"]
    federated = card["validation_data"]["federated"]
    assert federated["sites"] == SITES and federated["examples"] == n
    assert card["validation_data"]["eval_data"].startswith(f"evaluated at {SITES} sites on {n} ")
    assert federated["secagg"] is True and federated["exact_counts"] is True
    rows = {r["artifact"]: r for r in card["validation"]}
    # Corrupted static int8: measured at the sites, failed, left out of the signed bundle.
    assert rows["model-int8-static.onnx"]["passed"] is False
    assert "federated accuracy drop" in rows["model-int8-static.onnx"]["reason"]
    assert "model-int8-static.onnx" in card["failed_validation"]
    assert "model-int8-static.onnx" not in names
    assert set(names) == {"model-fp32.onnx", "model-int8-dynamic.onnx", "model-fp32.tflite",
                          "model-int8.tflite"}  # fmt: skip
    bundle.verify_bundle(out, key.with_suffix(".pub"))
    # Federated == central on the union of the held-out data, exactly.
    for name in names:
        correct, agree = central[name]
        assert rows[name]["accuracy"] == correct / n, name
        assert rows[name]["top1_agreement"] == agree / n, name
        assert rows[name]["reference_accuracy"] == central["reference"] / n
        assert plain.sums.artifacts[name].correct == correct
        assert plain.sums.artifacts[name].agree == agree
    assert plain.sums.examples == n and plain.sums.sites == SITES
    # The federally calibrated static int8 works: counted exactly, close to PyTorch.
    correct, agree = central["model-int8-fedcal.onnx"]
    assert plain.sums.artifacts["model-int8-fedcal.onnx"].correct == correct
    assert plain.sums.artifacts["model-int8-fedcal.onnx"].agree == agree
    assert agree / n >= 0.9 and (central["reference"] - correct) / n <= 0.05
    # What aggregate_fit received: under SecAgg+ only the sum; in the plain job each site's.
    assert secure["aggregation"] == {"results": SITES, "distinct_vectors": 1, "weights": [1],
                                     "metrics_keys": []}  # fmt: skip
    assert plain.aggregation["results"] == SITES and plain.aggregation["distinct_vectors"] == SITES
