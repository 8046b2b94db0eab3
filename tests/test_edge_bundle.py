"""The bundle format: keys, signatures, verification, tampering, tar packing, self-test."""

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from edge_device_support import ArtifactPlan, digits_task, make_bundle, make_keys

from fedge.shared import bundle, signing
from fedge.shared.errors import BundleError, SecurityError

PLANS = (ArtifactPlan("model-fp32.onnx"), ArtifactPlan("model-fp32.tflite", "tflite"))


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return make_keys(tmp_path / "keys")


@pytest.fixture()
def signed(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    return make_bundle(tmp_path / "bundle", keys[0], plans=PLANS)


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ keys and signatures


def test_generate_key_writes_private_0600_and_public_beside(tmp_path: Path) -> None:
    private = tmp_path / "keys" / "signing.key"
    public = signing.generate_signing_key(private)
    assert public == tmp_path / "keys" / "signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    key, pub = signing.load_private_key(private), signing.load_public_key(public)
    fingerprint = signing.public_key_fingerprint(pub)
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64
    assert fingerprint == signing.public_key_fingerprint(key)
    signature = signing.sign(key, b"payload")
    assert len(signature) == 64
    assert signing.verify(pub, b"payload", signature)
    assert not signing.verify(pub, b"payloae", signature)
    assert not signing.verify(pub, b"payload", signature[:-1])


def test_generate_key_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    private = tmp_path / "signing.key"
    signing.generate_signing_key(private)
    before = private.read_bytes()
    with pytest.raises(SecurityError, match="already exists"):
        signing.generate_signing_key(private)
    assert private.read_bytes() == before
    signing.generate_signing_key(private, overwrite=True)
    assert private.read_bytes() != before


def test_another_key_does_not_verify(tmp_path: Path) -> None:
    signing.generate_signing_key(tmp_path / "a.key")
    one = signing.load_private_key(tmp_path / "a.key")
    other = signing.load_public_key(signing.generate_signing_key(tmp_path / "b.key"))
    assert not signing.verify(other, b"x", signing.sign(one, b"x"))


def test_missing_corrupt_and_wrong_type_keys_are_security_errors(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="does not exist"):
        signing.load_private_key(tmp_path / "nope.key")
    with pytest.raises(SecurityError, match="does not exist"):
        signing.load_public_key(tmp_path / "nope.pub")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(SecurityError, match="not a readable"):
        signing.load_private_key(tmp_path / "junk.pem")
    with pytest.raises(SecurityError, match="not a readable"):
        signing.load_public_key(tmp_path / "junk.pem")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "ec.pub").write_bytes(pem)
    with pytest.raises(SecurityError, match="not an Ed25519"):
        signing.load_public_key(tmp_path / "ec.pub")


# ------------------------------------------------------------------ manifest and verification


def test_canonical_json_is_sorted_compact_and_refuses_nan() -> None:
    assert bundle.canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()
    with pytest.raises(BundleError):
        bundle.canonical_json({"x": float("nan")})


def test_signed_bundle_verifies_and_fills_facts(signed: Path, keys: tuple[Path, Path]) -> None:
    manifest = bundle.verify_bundle(signed, keys[1])
    assert manifest.format == "fedge-bundle/1"
    assert (signed / "manifest.json").read_bytes() == bundle.canonical_json(manifest.raw)
    assert len((signed / "manifest.sig").read_bytes()) == 64
    public = signing.load_public_key(keys[1])
    assert manifest.signing == {
        "algorithm": "Ed25519",
        "public_key_fingerprint": signing.public_key_fingerprint(public),
    }
    for entry in manifest.artifacts:
        path = signed / entry.file
        assert entry.sha256 == bundle.sha256_file(path) and entry.size == path.stat().st_size
    assert manifest.bundle_id == bundle.compute_bundle_id(a.sha256 for a in manifest.artifacts)
    assert manifest.model_card is not None and manifest.model_card.file == "model_card.json"
    assert manifest.task == digits_task()
    assert manifest.inputs[0].describe() == "(N, 1, 8, 8) float32"
    assert bundle.read_manifest(signed).raw == manifest.raw


@pytest.mark.parametrize(
    "target", ["artifacts/model-fp32.onnx", "artifacts/model-fp32.tflite", "model_card.json"]
)
def test_a_flipped_byte_in_any_file_is_refused(
    signed: Path, keys: tuple[Path, Path], target: str
) -> None:
    flip_byte(signed / target, offset=len((signed / target).read_bytes()) // 2)
    with pytest.raises(BundleError, match=f"{target} does not match its sha256"):
        bundle.verify_bundle(signed, keys[1])


def test_an_edited_manifest_is_refused(signed: Path, keys: tuple[Path, Path]) -> None:
    path = signed / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"test-1"', b'"test-2"'))
    with pytest.raises(BundleError, match=r"manifest\.sig is not a valid signature"):
        bundle.verify_bundle(signed, keys[1])


def test_a_manifest_nested_past_jsons_stack_is_refused(
    signed: Path, keys: tuple[Path, Path]
) -> None:
    """A tampered manifest of 200k nested lists escaped as RecursionError (a traceback)."""
    (signed / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(BundleError, match=r"manifest\.sig is not a valid signature"):
        bundle.verify_bundle(signed, keys[1])
    with pytest.raises(BundleError, match="not valid JSON"):
        bundle.read_manifest(signed)


def test_a_bundle_signed_by_another_key_is_refused(
    tmp_path: Path, signed: Path, keys: tuple[Path, Path]
) -> None:
    _, other_public = make_keys(tmp_path / "other")
    with pytest.raises(BundleError, match="but this device trusts"):
        bundle.verify_bundle(signed, other_public)
    # Re-signing a modified manifest with an attacker's key does not help either.
    attacker, _ = make_keys(tmp_path / "attacker")
    data = bundle.read_manifest(signed).to_dict()
    data["version"] = "evil"
    data.pop("signing")
    bundle.write_signed_manifest(signed, data, signing.load_private_key(attacker))
    with pytest.raises(BundleError, match="refusing"):
        bundle.verify_bundle(signed, keys[1])


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("manifest.sig", "manifest.sig is missing"),
        ("manifest.json", "manifest.json is missing"),
        ("artifacts/model-fp32.tflite", "model-fp32.tflite is listed in manifest.json but missing"),
        ("model_card.json", "model_card.json is listed in manifest.json but missing"),
    ],
)
def test_missing_files_are_named(
    signed: Path, keys: tuple[Path, Path], remove: str, message: str
) -> None:
    (signed / remove).unlink()
    with pytest.raises(BundleError, match=message):
        bundle.verify_bundle(signed, keys[1])


def test_missing_bundle_dir_and_missing_key(tmp_path: Path, signed: Path, keys: tuple) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        bundle.verify_bundle(tmp_path / "nowhere", keys[1])
    with pytest.raises(SecurityError, match="does not exist"):
        bundle.verify_bundle(signed, tmp_path / "nowhere.pub")


def test_extra_files_and_links_are_refused(signed: Path, keys: tuple[Path, Path]) -> None:
    extra = signed / "artifacts" / "model-fp32.onnx.data"
    extra.write_bytes(b"weights an attacker controls")
    with pytest.raises(BundleError, match=r"model-fp32.onnx.data is not listed"):
        bundle.verify_bundle(signed, keys[1])
    extra.unlink()
    os.symlink("/etc/hostname", signed / "link")
    with pytest.raises(BundleError, match="symbolic link"):
        bundle.verify_bundle(signed, keys[1])


def test_writer_refuses_disagreeing_hashes_and_unlisted_files(
    signed: Path, keys: tuple[Path, Path]
) -> None:
    key = signing.load_private_key(keys[0])
    data = bundle.read_manifest(signed).to_dict()
    data["artifacts"][0]["sha256"] = "0" * 64
    with pytest.raises(BundleError, match="changed after hashing"):
        bundle.write_signed_manifest(signed, data, key)
    (signed / "stray.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"stray\.bin is not listed"):
        bundle.write_signed_manifest(signed, bundle.read_manifest(signed).to_dict(), key)
    with pytest.raises(BundleError, match="malformed"):
        bundle.Manifest.from_dict({"format": "fedge-bundle/1"})


# ------------------------------------------------------------------ tar


def test_pack_unpack_round_trip_is_reproducible(
    tmp_path: Path, signed: Path, keys: tuple[Path, Path]
) -> None:
    first = bundle.pack_bundle(signed, tmp_path / "a.tar")
    second = bundle.pack_bundle(signed, tmp_path / "b.tar")
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        assert tar.getnames()[0] == "manifest.json"
        assert all(not m.name.startswith(("/", "..")) for m in tar.getmembers())
    out = bundle.unpack_bundle(first, tmp_path / "unpacked")
    assert bundle.verify_bundle(out, keys[1]).raw == bundle.read_manifest(signed).raw
    with pytest.raises(BundleError, match="not empty"):
        bundle.unpack_bundle(first, out)


def test_a_wrapping_folder_is_stripped(tmp_path: Path, signed: Path, keys: tuple) -> None:
    archive = tmp_path / "wrapped.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(signed, arcname="bundle")
    out = bundle.unpack_bundle(archive, tmp_path / "out")
    bundle.verify_bundle(out, keys[1])


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tar:
        manifest = tarfile.TarInfo("manifest.json")
        manifest.size = 2
        tar.addfile(manifest, io.BytesIO(b"{}"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tarfile.TarInfo("/etc/evil"), "absolute path"),
        (tarfile.TarInfo("../evil"), "outside the bundle"),
        (tarfile.TarInfo("artifacts/../../evil"), "outside the bundle"),
        (_link("artifacts/model.onnx", "/etc/passwd", tarfile.SYMTYPE), "is a link"),
        (_link("artifacts/model.onnx", "manifest.json", tarfile.LNKTYPE), "is a link"),
        (_link("dev", "", tarfile.CHRTYPE), "special file"),
    ],
)
def test_unsafe_tars_are_refused_before_writing(
    tmp_path: Path, member: tarfile.TarInfo, message: str
) -> None:
    archive = _tar_with(tmp_path / "evil.tar", member, b"boom")
    dest = tmp_path / "dest" / "bundle"
    with pytest.raises(BundleError, match=message):
        bundle.unpack_bundle(archive, dest)
    assert not dest.exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path / "dest" / "evil").exists()
    assert list((tmp_path / "dest").iterdir()) == []  # no staging folder left behind


def test_bad_archives_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="not a readable tar"):
        bundle.unpack_bundle(tmp_path / "junk.tar", tmp_path / "a")
    with pytest.raises(BundleError, match="does not exist"):
        bundle.unpack_bundle(tmp_path / "missing.tar", tmp_path / "b")
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(BundleError, match="does not contain a bundle"):
        bundle.unpack_bundle(tmp_path / "empty.tar", tmp_path / "c")
    archive = _tar_with(tmp_path / "big.tar", tarfile.TarInfo("artifacts/x"), b"y" * 100)
    with pytest.raises(BundleError, match="over the 50 limit"):
        bundle.unpack_bundle(archive, tmp_path / "d", max_bytes=50)
    with pytest.raises(BundleError, match="not a bundle"):
        bundle.pack_bundle(tmp_path, tmp_path / "out.tar")


# ------------------------------------------------------------------ self-test


def test_arrays_round_trip_as_float32_little_endian() -> None:
    x = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    text = bundle.encode_array(x)
    assert np.array_equal(bundle.decode_array(text, (2, 3)), x.astype(np.float32))
    with pytest.raises(BundleError, match="does not decode"):
        bundle.decode_array(text, (4, 3))


def test_run_self_test_compares_with_the_artifacts_expectation(signed: Path) -> None:
    manifest = bundle.read_manifest(signed)
    entry = manifest.artifacts[0]
    record = manifest.self_test or {}
    expected = bundle.decode_array(record["expected"][entry.file], record["expected_shape"])
    ok = bundle.run_self_test(manifest, entry, lambda x: expected + 5e-5)
    assert ok.passed and ok.max_abs_diff == pytest.approx(5e-5, rel=1e-2)
    assert ok.label_agreement == 1.0 and ok.examples == 4
    bad = bundle.run_self_test(manifest, entry, lambda x: expected + 1e-3)
    assert not bad.passed
    swapped = expected.copy()
    swapped[0] = -swapped[0]
    assert bundle.run_self_test(manifest, entry, lambda x: swapped).label_agreement == 0.75
    shape = bundle.run_self_test(manifest, entry, lambda x: expected[:, :3])
    assert not shape.passed and "output shape" in shape.detail
    assert json.loads(bundle.canonical_json(manifest.raw))["self_test"]["shape"] == [4, 1, 8, 8]
