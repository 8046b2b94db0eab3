"""The signed model bundle format ``fedge-bundle/1``: manifest, writer, verifier, self-test.

A bundle is the unit that moves from the server to a device: ``manifest.json``
(canonical JSON), ``manifest.sig`` (Ed25519 over the manifest's exact bytes),
``model_card.json`` and ``artifacts/*``, each hashed in the manifest. The export
side writes it with ``write_signed_manifest``; a device accepts it only through
``verify_bundle``. Torch-free: numpy, ``cryptography`` and the stdlib only.
"""

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from fedge.shared import signing
from fedge.shared.atomic import atomic_write_bytes
from fedge.shared.bundle_selftest import (
    DEFAULT_ATOL,
    SelfTestResult,
    decode_array,
    encode_array,
    make_self_test,
    run_self_test,
    self_test_inputs,
)
from fedge.shared.bundle_tar import pack_bundle, unpack_bundle
from fedge.shared.errors import BundleError, ConfigError
from fedge.shared.tasks import TaskSpec

FORMAT = "fedge-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL_CARD = "model_card.json"
ARTIFACTS_DIR = "artifacts"
# The artifact formats a bundle may carry, and the device runtime runs.
ARTIFACT_FORMATS = ("onnx", "tflite")

__all__ = [
    "ARTIFACTS_DIR",
    "ARTIFACT_FORMATS",
    "DEFAULT_ATOL",
    "FORMAT",
    "MANIFEST",
    "MODEL_CARD",
    "SIGNATURE",
    "ArtifactEntry",
    "FileEntry",
    "Manifest",
    "SelfTestResult",
    "TensorSpec",
    "canonical_json",
    "compute_bundle_id",
    "decode_array",
    "encode_array",
    "make_self_test",
    "pack_bundle",
    "read_manifest",
    "run_self_test",
    "self_test_inputs",
    "sha256_file",
    "unpack_bundle",
    "verify_bundle",
    "write_signed_manifest",
]


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: ``shape`` uses -1 for a free dimension (the batch)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str | None = None

    def describe(self) -> str:
        """``"(N, 1, 8, 8) float32"``: the batch dimension shows as N."""
        dims = [
            "N" if i == 0 and d < 0 else ("?" if d < 0 else str(d))
            for i, d in enumerate(self.shape)
        ]
        return f"({', '.join(dims)}) {self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.layout is not None:
            out["layout"] = self.layout
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "TensorSpec":
        return TensorSpec(
            name=str(data["name"]),
            shape=tuple(int(d) for d in data["shape"]),
            dtype=str(data.get("dtype", "float32")),
            layout=None if data.get("layout") is None else str(data["layout"]),
        )


@dataclass(frozen=True)
class FileEntry:
    """A file covered by the signature through its hash (``model_card.json``)."""

    file: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ArtifactEntry:
    """One runnable model file in the bundle and what export measured about it."""

    file: str
    format: str  # "onnx" | "tflite"
    precision: str  # "fp32" | "int8"
    quantization: str  # "none" | "dynamic" | "static" | ...
    sha256: str
    size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    validation: dict[str, Any] = field(default_factory=dict)
    tolerance: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether export's validation passed (a device never runs one that did not)."""
        return self.validation.get("passed") is True

    @property
    def atol(self) -> float:
        """The self-test tolerance: max |logit difference| allowed against the expectation."""
        return float(self.tolerance.get("atol", DEFAULT_ATOL))

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "ArtifactEntry":
        return ArtifactEntry(
            file=str(data["file"]),
            format=str(data["format"]),
            precision=str(data["precision"]),
            quantization=str(data.get("quantization", "none")),
            sha256=str(data["sha256"]),
            size=int(data["size"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            validation=dict(data.get("validation") or {}),
            tolerance=dict(data.get("tolerance") or {}),
        )


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``; ``raw`` is the exact JSON object that was signed."""

    format: str
    bundle_id: str
    version: str
    created_at: str
    task: TaskSpec
    labels: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    artifacts: tuple[ArtifactEntry, ...]
    self_test: dict[str, Any] | None
    signing: dict[str, Any]
    privacy: dict[str, Any] | None
    model_card: FileEntry | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    def artifact(self, file: str) -> ArtifactEntry:
        """The artifact entry for ``file`` (e.g. ``"artifacts/model-fp32.onnx"``)."""
        for entry in self.artifacts:
            if entry.file == file:
                return entry
        known = ", ".join(a.file for a in self.artifacts)
        raise BundleError(f"bundle {self.bundle_id} has no artifact {file!r} (it has: {known})")

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON data (a deep copy of what was signed)."""
        return json.loads(json.dumps(self.raw))

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "Manifest":
        """Parse manifest data; a missing or malformed field is a ``BundleError``."""
        try:
            card = data.get("model_card")
            return Manifest(
                format=str(data["format"]),
                bundle_id=str(data["bundle_id"]),
                version=str(data["version"]),
                created_at=str(data["created_at"]),
                task=TaskSpec.from_dict(data["task"]),
                labels=tuple(str(label) for label in data["labels"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                artifacts=tuple(ArtifactEntry.from_dict(a) for a in data["artifacts"]),
                self_test=None if data.get("self_test") is None else dict(data["self_test"]),
                signing=dict(data.get("signing") or {}),
                privacy=None if data.get("privacy") is None else dict(data["privacy"]),
                model_card=(
                    None
                    if card is None
                    else FileEntry(str(card["file"]), str(card["sha256"]), int(card["size"]))
                ),
                raw=dict(data),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise BundleError(f"manifest.json is malformed ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------- encoding and hashing


def _json_default(obj: Any) -> Any:
    """Let export pass numpy scalars and arrays in the manifest dict."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces, UTF-8, no NaN/Infinity."""
    try:
        text = json.dumps(
            obj,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_json_default,
        )
    except (TypeError, ValueError) as e:
        raise BundleError(f"manifest cannot be written as canonical JSON: {e}") from e
    return text.encode("utf-8")


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def compute_bundle_id(artifact_sha256s: Iterable[str]) -> str:
    """First 16 hex chars of sha256 over the artifacts' hex hashes, concatenated in order."""
    joined = "".join(artifact_sha256s).encode("ascii")
    return hashlib.sha256(joined).hexdigest()[:16]


# ---------------------------------------------------------------- files of a bundle


def _safe_relative(bundle_dir: Path, name: str) -> Path:
    """Resolve a manifest file name inside the bundle, refusing anything that escapes it."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\\" in name:
        raise BundleError(f"bundle {bundle_dir}: manifest names an unsafe path {name!r}")
    return bundle_dir.joinpath(*pure.parts)


def _file_entry(bundle_dir: Path, name: str) -> FileEntry:
    path = _safe_relative(bundle_dir, name)
    if not path.is_file():
        raise BundleError(f"bundle {bundle_dir}: {name} is missing")
    return FileEntry(name, sha256_file(path), path.stat().st_size)


def _check_file(bundle_dir: Path, entry: FileEntry | ArtifactEntry) -> None:
    path = _safe_relative(bundle_dir, entry.file)
    if path.is_symlink():
        raise BundleError(f"bundle {bundle_dir}: {entry.file} is a symbolic link; refusing it")
    if not path.is_file():
        raise BundleError(
            f"bundle {bundle_dir}: {entry.file} is listed in manifest.json but missing; refusing it"
        )
    if path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
        raise BundleError(
            f"bundle {bundle_dir}: {entry.file} does not match its sha256 in manifest.json "
            "(tampered or corrupt); refusing it"
        )


def _listed_files(manifest: Manifest) -> set[str]:
    listed = {MANIFEST, SIGNATURE, *(a.file for a in manifest.artifacts)}
    if manifest.model_card is not None:
        listed.add(manifest.model_card.file)
    return listed


def _check_no_extra_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Every file in the bundle must be covered by the signature (ORT follows external data)."""
    listed = _listed_files(manifest)
    for root, dirs, files in os.walk(bundle_dir):
        for name in sorted(dirs + files):
            path = Path(root) / name
            rel = path.relative_to(bundle_dir).as_posix()
            if path.is_symlink():
                raise BundleError(f"bundle {bundle_dir}: {rel} is a symbolic link; refusing it")
            if name in files and rel not in listed:
                raise BundleError(
                    f"bundle {bundle_dir}: {rel} is not listed in manifest.json "
                    "(not covered by the signature); refusing the bundle"
                )


def _check_consistency(bundle_dir: Path, manifest: Manifest) -> None:
    if manifest.format != FORMAT:
        raise BundleError(
            f"bundle {bundle_dir}: format {manifest.format!r} is not {FORMAT!r} "
            "(made by a newer or older fedge?)"
        )
    if not manifest.artifacts:
        raise BundleError(f"bundle {bundle_dir}: manifest.json lists no artifacts")
    files = [a.file for a in manifest.artifacts]
    if len(set(files)) != len(files):
        raise BundleError(f"bundle {bundle_dir}: manifest.json lists an artifact twice")
    if manifest.bundle_id != compute_bundle_id(a.sha256 for a in manifest.artifacts):
        raise BundleError(f"bundle {bundle_dir}: bundle_id does not match the artifact hashes")


# ---------------------------------------------------------------- write, read, verify


def _fill_and_check(bundle_dir: Path, data: dict[str, Any], fingerprint: str) -> None:
    """Fill hashes, sizes, bundle_id and signing facts; refuse values that disagree."""

    def settle(target: dict[str, Any], key: str, value: Any, what: str) -> None:
        if key in target and target[key] != value:
            raise BundleError(
                f"bundle {bundle_dir}: {what} {key} is {target[key]!r} in the manifest but "
                f"{value!r} on disk (changed after hashing?)"
            )
        target[key] = value

    settle(data, "format", FORMAT, "manifest")
    artifacts = [dict(a) for a in data.get("artifacts", [])]
    for artifact in artifacts:
        entry = _file_entry(bundle_dir, str(artifact.get("file", "")))
        settle(artifact, "sha256", entry.sha256, entry.file)
        settle(artifact, "size", entry.size, entry.file)
    data["artifacts"] = artifacts
    settle(data, "bundle_id", compute_bundle_id(a["sha256"] for a in artifacts), "manifest")
    card_name = (data.get("model_card") or {}).get("file", MODEL_CARD)
    if (bundle_dir / card_name).exists() or data.get("model_card") is not None:
        card = _file_entry(bundle_dir, card_name)
        data["model_card"] = dict(data.get("model_card") or {})
        settle(data["model_card"], "file", card.file, MODEL_CARD)
        settle(data["model_card"], "sha256", card.sha256, card.file)
        settle(data["model_card"], "size", card.size, card.file)
    signing_facts = dict(data.get("signing") or {})
    settle(signing_facts, "algorithm", signing.ALGORITHM, "signing")
    settle(signing_facts, "public_key_fingerprint", fingerprint, "signing")
    data["signing"] = signing_facts
    data.setdefault("created_at", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    data.setdefault("privacy", None)


def write_signed_manifest(
    bundle_dir: Path | str,
    manifest_dict: Mapping[str, Any],
    private_key: signing.Ed25519PrivateKey,
) -> Manifest:
    """Write ``manifest.json`` and ``manifest.sig`` into a bundle whose files are in place.

    Hashes and sizes of the artifacts and of ``model_card.json`` (when present),
    ``bundle_id``, ``format``, ``signing``, ``created_at`` (UTC now) and
    ``privacy`` (null) are filled in when absent, and checked against the
    files when present. The bundle is checked as ``verify_bundle`` would check
    it before anything is signed, so a signed bundle always verifies.

    Parameters
    ----------
    bundle_dir
        The bundle directory, with ``artifacts/*`` (and ``model_card.json``) already written.
    manifest_dict
        The manifest fields (see ``docs``/bundle spec); it is not modified.
    private_key
        The Ed25519 signing key (``signing.load_private_key``).

    Returns
    -------
    Manifest
        The manifest exactly as signed.

    Raises
    ------
    BundleError
        Missing or unlisted files, disagreeing hashes, malformed fields.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    data = json.loads(canonical_json(dict(manifest_dict)))
    _fill_and_check(bundle_dir, data, signing.public_key_fingerprint(private_key))
    payload = canonical_json(data)
    manifest = Manifest.from_dict(json.loads(payload))
    _check_consistency(bundle_dir, manifest)
    _check_no_extra_files(bundle_dir, manifest)
    # Two renames cannot be one atomic step; a crash between them leaves a pair
    # that fails verification, which a device refuses: safe.
    atomic_write_bytes(bundle_dir / MANIFEST, payload)
    atomic_write_bytes(bundle_dir / SIGNATURE, signing.sign(private_key, payload))
    return manifest


def _read_manifest_bytes(bundle_dir: Path) -> bytes:
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir} does not exist or is not a directory")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is missing; this is not a bundle")
    return path.read_bytes()


def _parse(bundle_dir: Path, payload: bytes) -> Manifest:
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        # RecursionError: nested deeper than json's stack (read_manifest parses unverified).
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is not valid JSON") from e
    if not isinstance(data, dict):
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is not a JSON object")
    try:
        return Manifest.from_dict(data)
    except BundleError as e:
        raise BundleError(f"bundle {bundle_dir}: {e}") from e


def read_manifest(bundle_dir: Path | str) -> Manifest:
    """Parse a bundle's manifest WITHOUT verifying anything (for tools, never for running)."""
    bundle_dir = Path(bundle_dir)
    return _parse(bundle_dir, _read_manifest_bytes(bundle_dir))


def verify_bundle(
    bundle_dir: Path | str,
    trusted_public_key: Path | str | signing.Ed25519PublicKey,
) -> Manifest:
    """Check a bundle against the one public key this device trusts; return its manifest.

    Order: ``manifest.sig`` is a valid signature of ``manifest.json`` under the
    trusted key and the manifest names that key's fingerprint; then every
    artifact and ``model_card.json`` matches its size and sha256; then no file
    is missing and none is present that the manifest does not list.

    Parameters
    ----------
    bundle_dir
        The bundle directory.
    trusted_public_key
        The trusted public key file (the server's ``signing.pub``) or the key itself.

    Raises
    ------
    BundleError
        Naming the file that failed; the bundle must not be used.
    SecurityError
        If the trusted key file itself is missing or unreadable.
    """
    bundle_dir = Path(bundle_dir)
    key = (
        trusted_public_key
        if isinstance(trusted_public_key, signing.Ed25519PublicKey)
        else signing.load_public_key(trusted_public_key)
    )
    trusted = signing.public_key_fingerprint(key)
    payload = _read_manifest_bytes(bundle_dir)
    sig_path = bundle_dir / SIGNATURE
    if not sig_path.is_file():
        raise BundleError(
            f"bundle {bundle_dir}: {SIGNATURE} is missing; refusing an unsigned bundle"
        )
    if not signing.verify(key, payload, sig_path.read_bytes()):
        raise BundleError(_signature_failure(bundle_dir, payload, trusted))
    manifest = _parse(bundle_dir, payload)
    if manifest.signing.get("public_key_fingerprint") != trusted:
        raise BundleError(f"bundle {bundle_dir}: manifest.json names a different signing key")
    _check_consistency(bundle_dir, manifest)
    if manifest.model_card is not None:
        _check_file(bundle_dir, manifest.model_card)
    for artifact in manifest.artifacts:
        _check_file(bundle_dir, artifact)
    _check_no_extra_files(bundle_dir, manifest)
    return manifest


def _signature_failure(bundle_dir: Path, payload: bytes, trusted: str) -> str:
    """Say whether another key signed it or the manifest was modified."""
    try:
        claimed = json.loads(payload)["signing"]["public_key_fingerprint"]
    except (ValueError, KeyError, TypeError, RecursionError):  # tampered: any shape at all
        claimed = None
    if isinstance(claimed, str) and claimed != trusted:
        return (
            f"bundle {bundle_dir}: manifest.sig was made by key {claimed[:23]}… but this device "
            f"trusts {trusted[:23]}…; refusing it"
        )
    return (
        f"bundle {bundle_dir}: manifest.sig is not a valid signature of manifest.json under the "
        "trusted key (manifest.json tampered with, or signed by another key); refusing it"
    )
