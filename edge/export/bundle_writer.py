"""Write exported artifacts into a signed ``fedge-bundle/1`` directory, then record validation.

Two steps, as export and validation are two steps. ``write_bundle`` copies the
artifacts in byte for byte (the ONNX ones already carry ``onnx_metadata`` in
``metadata_props``), writes ``model_card.json`` and signs a manifest whose
artifacts have no validation result (``"validation": null``): a device runs none
of them, and the registry can refuse the bundle. ``record_validation`` then
writes what validation measured into the manifest and the card, the self-test
logits the device runtime computed, leaves out the artifacts that failed, and
signs again. Each step builds in a temporary directory beside its destination
and renames it into place, so a reader sees either the old bundle or a complete,
signed new one. Format details: ``fedge.shared.bundle`` and docs/export.md.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.edge.export.onnx_export import INPUT_NAME, OUTPUT_NAME
from fedge.edge.export.validate import ValidationResult
from fedge.shared import bundle, signing
from fedge.shared.atomic import atomic_write_json
from fedge.shared.errors import ExportError, SecurityError
from fedge.shared.tasks import TaskSpec

SELF_TEST_EXAMPLES = 4


@dataclass(frozen=True)
class BuiltArtifact:
    """An exported model file waiting to be bundled."""

    name: str  # file name inside artifacts/, e.g. "model-int8-static.onnx"
    path: Path  # where export wrote it
    format: str  # "onnx" | "tflite"
    precision: str  # "fp32" | "int8"
    quantization: str  # "none" | "dynamic" | "static"

    @property
    def file(self) -> str:
        """The path inside the bundle (what the manifest lists)."""
        return f"{bundle.ARTIFACTS_DIR}/{self.name}"


def layout_of(task: TaskSpec) -> str:
    """``NCHW`` for image tasks (fedge's preprocessing layout), ``NF`` for tabular."""
    return task.preprocessing.layout if task.kind == "image" else "NF"  # type: ignore[union-attr]


def canonical_io(task: TaskSpec) -> tuple[bundle.TensorSpec, bundle.TensorSpec]:
    """The bundle's model input and output: free batch, float32, preprocessed layout."""
    inp = bundle.TensorSpec(INPUT_NAME, (-1, *task.input_shape), "float32", layout_of(task))
    out = bundle.TensorSpec(OUTPUT_NAME, (-1, task.num_classes), "float32")
    return inp, out


def artifact_io(
    artifact: BuiltArtifact, task: TaskSpec
) -> tuple[bundle.TensorSpec, bundle.TensorSpec]:
    """The input/output an artifact really has (TFLite: a fixed batch of 1, its tensor names)."""
    if artifact.format == "onnx":
        return canonical_io(task)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(artifact.path))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def spec(detail: Mapping[str, Any], layout: str | None) -> bundle.TensorSpec:
        shape = tuple(int(d) for d in detail.get("shape_signature", detail["shape"]))
        return bundle.TensorSpec(str(detail["name"]), shape, np.dtype(detail["dtype"]).name, layout)

    return spec(inp, layout_of(task)), spec(out, None)


def onnx_metadata(
    version: str, task: TaskSpec, fingerprint: str, privacy: Mapping[str, Any] | None
) -> dict[str, str]:
    """The facts stamped into every ONNX artifact's ``metadata_props``."""
    props = {
        "fedge.bundle_version": version,
        "fedge.task": task.name,
        "fedge.labels": json.dumps(list(task.classes)),
        "fedge.signing_key_fingerprint": fingerprint,
    }
    dp = (privacy or {}).get("dp") or {}
    if dp.get("level", "none") != "none":
        props["fedge.privacy.dp_level"] = str(dp["level"])
        for key in ("epsilon", "delta"):
            if dp.get(key) is not None:
                props[f"fedge.privacy.{key}"] = repr(float(dp[key]))
    return props


def choose_self_test(reference_logits: np.ndarray, n: int = SELF_TEST_EXAMPLES) -> np.ndarray:
    """Indices of up to ``n`` evaluation examples, preferring different predicted classes."""
    predicted = reference_logits.argmax(1)
    chosen: list[int] = []
    seen: set[int] = set()
    for i, label in enumerate(predicted):
        if int(label) not in seen:
            chosen.append(i)
            seen.add(int(label))
        if len(chosen) == n:
            break
    rest = [i for i in range(len(predicted)) if i not in chosen]
    return np.asarray(sorted(chosen + rest[: n - len(chosen)]), dtype=np.int64)


def _artifact_entry(artifact: BuiltArtifact, task: TaskSpec) -> dict[str, Any]:
    """A manifest entry without a validation result (``record_validation`` adds it)."""
    inp, out = artifact_io(artifact, task)
    return {
        "file": artifact.file,
        "format": artifact.format,
        "precision": artifact.precision,
        "quantization": artifact.quantization,
        "inputs": [inp.to_dict()],
        "outputs": [out.to_dict()],
        "validation": None,
    }


def replace_dir(staged: Path, target: Path) -> None:
    """Rename ``staged`` to ``target``; an old ``target`` is moved aside first, then removed."""
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staged, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_signing_key(path: Path | None) -> signing.Ed25519PrivateKey:
    """The bundle signing key at ``path`` (default ``fedge_home()/keys/signing.key``).

    Raises
    ------
    SecurityError
        If there is no key yet (saying to run ``fedge keys create``) or it is unreadable.
    """
    from fedge.shared.paths import signing_key_path

    path = Path(path) if path is not None else signing_key_path()
    if not path.is_file():
        raise SecurityError(
            f"no bundle signing key at {path}",
            hint="create one with `fedge keys create` (or pass --key PATH), then copy the "
            "public key it prints onto your devices",
        )
    return signing.load_private_key(path)


def check_destination(out_dir: Path, force: bool) -> None:
    """Refuse to overwrite an existing path unless ``force``.

    Raises
    ------
    ExportError
        If ``out_dir`` exists and ``force`` is false, or it is a file.
    """
    if out_dir.exists() and not force:
        raise ExportError(
            f"{out_dir} already exists; delete it, choose another --out, or pass --force",
            hint="a bundle is replaced only when you ask for it",
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a bundle directory")


def write_bundle(
    out_dir: Path,
    *,
    task: TaskSpec,
    artifacts: Sequence[BuiltArtifact],
    model_card: Mapping[str, Any],
    privacy: Mapping[str, Any] | None,
    version: str,
    private_key: signing.Ed25519PrivateKey,
    force: bool = False,
) -> bundle.Manifest:
    """Write a signed, not yet validated bundle of ``artifacts`` to ``out_dir`` (atomically).

    Parameters
    ----------
    out_dir
        The bundle directory to create.
    task
        The model's task (classes and preprocessing) for the manifest.
    artifacts
        The exported artifacts, final (ONNX metadata stamped).
    model_card
        Facts for ``model_card.json`` (covered by the signature through its hash).
    privacy
        The run's privacy record, or ``None``.
    version
        The bundle version string.
    private_key
        The Ed25519 key that signs the manifest.
    force
        Replace an existing ``out_dir``.

    Returns
    -------
    Manifest
        The signed manifest; every artifact has ``"validation": null``.

    Raises
    ------
    ExportError
        If ``out_dir`` exists (without ``force``) or there is nothing to bundle.
    BundleError
        If the assembled bundle does not verify.
    """
    check_destination(out_dir, force)
    if not artifacts:
        raise ExportError("no artifact was exported; nothing to bundle")
    inp, out = canonical_io(task)
    manifest = {
        "format": bundle.FORMAT,
        "version": version,
        "task": task.to_dict(),
        "labels": list(task.classes),
        "inputs": [inp.to_dict()],
        "outputs": [out.to_dict()],
        "artifacts": [_artifact_entry(a, task) for a in artifacts],
        "self_test": None,
        "privacy": None if privacy is None else dict(privacy),
    }
    files = {a.file: a.path for a in artifacts}
    return _write(out_dir, files, model_card, manifest, private_key)


def _write(
    out_dir: Path,
    files: Mapping[str, Path],
    model_card: Mapping[str, Any],
    manifest: Mapping[str, Any],
    private_key: signing.Ed25519PrivateKey,
) -> bundle.Manifest:
    """Stage ``files`` (bundle path -> source), the card and the signed manifest; rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (staged / bundle.ARTIFACTS_DIR).mkdir()
        for name, source in files.items():
            shutil.copyfile(source, staged / name)
        atomic_write_json(staged / bundle.MODEL_CARD, dict(model_card))
        signed = bundle.write_signed_manifest(staged, manifest, private_key)
        # Belt and braces: the bundle must verify exactly as a device will check it.
        bundle.verify_bundle(staged, private_key.public_key())
        staged.chmod(0o755)
        replace_dir(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return signed


def record_validation(
    bundle_dir: Path,
    results: Sequence[ValidationResult],
    *,
    self_test_inputs: np.ndarray,
    self_test_labels: Sequence[int],
    card_updates: Mapping[str, Any],
    private_key: signing.Ed25519PrivateKey,
) -> bundle.Manifest:
    """Write validation results into a bundle, leave out failed artifacts, and sign it again.

    The self-test expectations are each passing artifact's logits on
    ``self_test_inputs`` computed by the device runtime
    (``fedge.edge.device.runtime.load_artifact``, one batch, as a device's
    self-test runs), so a device compares against what a device computes.

    Parameters
    ----------
    bundle_dir
        A bundle signed by ``private_key`` (``write_bundle``, or one validated before).
    results
        ``validate``'s result for every artifact, keyed by the artifact's base name.
    self_test_inputs
        A few preprocessed inputs, (n, ...) float32 (``choose_self_test``).
    self_test_labels
        PyTorch's top-1 class for each self-test input.
    card_updates
        Keys to set in ``model_card.json`` (the validation table, data, time).
    private_key
        The Ed25519 key that signs the manifest.

    Returns
    -------
    Manifest
        The new signed manifest (its ``bundle_id`` changes when artifacts are left out).

    Raises
    ------
    ExportError
        No artifact passed (the bundle is left as it was).
    BundleError
        The bundle does not verify under ``private_key``'s public half.
    """
    from fedge.edge.device.runtime import load_artifact

    manifest = bundle.verify_bundle(bundle_dir, private_key.public_key())
    by_name = {r.artifact: r for r in results}
    kept = [
        a for a in manifest.artifacts
        if Path(a.file).name in by_name and by_name[Path(a.file).name].passed
    ]  # fmt: skip
    if not kept:
        raise ExportError(f"no artifact of {bundle_dir} passed validation; bundle left as it was")
    probe = np.ascontiguousarray(self_test_inputs, dtype=np.float32)
    expected = {}
    for entry in kept:
        with load_artifact(bundle_dir, manifest, entry) as model:
            expected[entry.file] = model.predict_tensor(probe)
    raw = manifest.to_dict()
    entries = []
    for entry in raw["artifacts"]:
        if entry["file"] in expected:
            result = by_name[Path(entry["file"]).name]
            entry["validation"] = result.manifest_record()
            entry["tolerance"] = {"atol": result.atol}
            entries.append(entry)
    raw["artifacts"] = entries
    raw["self_test"] = bundle.make_self_test(probe, expected, self_test_labels)
    for derived in ("bundle_id", "model_card", "signing"):  # recomputed from the new files
        raw.pop(derived, None)
    card = json.loads((bundle_dir / bundle.MODEL_CARD).read_text(encoding="utf-8"))
    card.update(card_updates)
    # _write copies the files into a new staged bundle before it replaces this one.
    files = {e["file"]: bundle_dir / e["file"] for e in entries}
    return _write(bundle_dir, files, card, raw, private_key)
