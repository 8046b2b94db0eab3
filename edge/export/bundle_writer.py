"""Assemble validated artifacts into a signed ``fedge-bundle/1`` directory, atomically.

The bundle is built in a temporary directory beside its destination: the
artifacts are copied in byte for byte (the files validation ran; the ONNX ones
already carry ``onnx_metadata`` in ``metadata_props``, stamped by the pipeline
before validation and hashing), ``model_card.json`` is written, and the manifest
is signed with ``fedge.shared.bundle.write_signed_manifest``. Only then is the directory
renamed into place, so a reader sees either no bundle or a complete, signed one.
Format details: ``fedge.shared.bundle`` and the bundle spec in the README.
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
        return bundle.TensorSpec(
            str(detail["name"]), shape, np.dtype(detail["dtype"]).name, layout
        )

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


def _artifact_entry(
    artifact: BuiltArtifact, result: ValidationResult, task: TaskSpec
) -> dict[str, Any]:
    inp, out = artifact_io(artifact, task)
    return {
        "file": artifact.file,
        "format": artifact.format,
        "precision": artifact.precision,
        "quantization": artifact.quantization,
        "inputs": [inp.to_dict()],
        "outputs": [out.to_dict()],
        "validation": result.manifest_record(),
        "tolerance": {"atol": result.atol},
    }


def _replace_dir(staged: Path, target: Path) -> None:
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
    artifacts: Sequence[tuple[BuiltArtifact, ValidationResult]],
    self_test_inputs: np.ndarray,
    self_test_expected: Mapping[str, np.ndarray],
    self_test_labels: Sequence[int],
    model_card: Mapping[str, Any],
    privacy: Mapping[str, Any] | None,
    version: str,
    private_key: signing.Ed25519PrivateKey,
    force: bool = False,
) -> bundle.Manifest:
    """Write a signed bundle of ``artifacts`` to ``out_dir`` (atomically).

    Parameters
    ----------
    out_dir
        The bundle directory to create.
    task
        The model's task (classes and preprocessing) for the manifest.
    artifacts
        The artifacts to include, final (ONNX metadata stamped), with their validation
        results (all should have passed).
    self_test_inputs
        A few preprocessed inputs, (n, ...) float32.
    self_test_expected
        Each artifact's logits on ``self_test_inputs``, keyed by ``BuiltArtifact.name``.
    self_test_labels
        PyTorch's top-1 class for each self-test input.
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
        The signed manifest.

    Raises
    ------
    ExportError
        If ``out_dir`` exists (without ``force``) or there is nothing to bundle.
    BundleError
        If the assembled bundle does not verify.
    """
    check_destination(out_dir, force)
    if not artifacts:
        raise ExportError("no artifact passed validation; nothing to bundle")
    inp, out = canonical_io(task)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (staged / bundle.ARTIFACTS_DIR).mkdir()
        entries = []
        for artifact, result in artifacts:
            target = staged / artifact.file
            shutil.copyfile(artifact.path, target)
            entries.append(_artifact_entry(artifact, result, task))
        atomic_write_json(staged / bundle.MODEL_CARD, dict(model_card))
        self_test = bundle.make_self_test(
            self_test_inputs,
            {a.file: self_test_expected[a.name] for a, _ in artifacts},
            self_test_labels,
        )
        manifest = {
            "format": bundle.FORMAT,
            "version": version,
            "task": task.to_dict(),
            "labels": list(task.classes),
            "inputs": [inp.to_dict()],
            "outputs": [out.to_dict()],
            "artifacts": entries,
            "self_test": self_test,
            "privacy": None if privacy is None else dict(privacy),
        }
        signed = bundle.write_signed_manifest(staged, manifest, private_key)
        # Belt and braces: the bundle must verify exactly as a device will check it.
        bundle.verify_bundle(staged, private_key.public_key())
        staged.chmod(0o755)
        _replace_dir(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return signed
