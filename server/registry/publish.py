"""Publish a signed bundle into the registry: verify, stage, verify the copy, commit.

Only a bundle that verifies under the server's signing public key and whose
every artifact passed export's validation gets in. The tar that devices will
download is made here once and checked by unpacking and verifying it again,
so what a device receives is exactly what was verified at publish.
"""

import hashlib
import logging
import shutil
from pathlib import Path

from fedge.server.registry.store import Registry, VersionRecord, check_version, now_iso
from fedge.shared.bundle import Manifest, pack_bundle, sha256_file, unpack_bundle, verify_bundle
from fedge.shared.errors import BundleError, SecurityError

log = logging.getLogger(__name__)


REGISTRY_SUBDIR = "registry"


def default_registry_dir() -> Path:
    """``server_data_dir()/registry``: where ``fedge registry`` keeps its data by default."""
    from fedge.shared.paths import server_data_dir

    return server_data_dir() / REGISTRY_SUBDIR


def default_public_key() -> Path:
    """The server's signing public key, ``signing.pub`` beside ``signing.key``."""
    from fedge.shared.paths import trusted_key_path

    return trusted_key_path()


def publish_bundle(
    registry: Registry,
    bundle_dir: Path | str,
    public_key: Path | str,
    channel: str | None = None,
) -> tuple[VersionRecord, bool]:
    """Verify ``bundle_dir`` and store it as an immutable version (optionally on a channel).

    Parameters
    ----------
    registry
        The registry to publish into.
    bundle_dir
        A bundle directory (or a ``.tar`` of one, as devices download it).
    public_key
        The server's signing public key; the bundle must be signed by its private half.
    channel
        Point this channel at the version once it is stored (e.g. ``"canary"``).

    Returns
    -------
    tuple[VersionRecord, bool]
        The stored version, and False when the same content was already published.

    Raises
    ------
    BundleError
        Unsigned, signed by another key, tampered with, or an artifact that failed validation.
    RegistryError
        The version already exists with different content, or the channel name is invalid.
    """
    bundle_dir = Path(bundle_dir)
    if channel is not None:
        _check_same_key(registry, public_key)
    staged = registry.new_staging()
    try:
        if bundle_dir.is_file():
            unpack_bundle(bundle_dir, staged / "source")
            bundle_dir = staged / "source"
        manifest = verify_bundle(bundle_dir, public_key)
        _check_validation(bundle_dir, manifest)
        check_version(manifest.version)

        # Copy, then verify the copy and the tar made from it: a disk or copy error
        # is caught here rather than on every device.
        shutil.copytree(bundle_dir, staged / "bundle", symlinks=True)
        verify_bundle(staged / "bundle", public_key)
        pack_bundle(staged / "bundle", staged / "bundle.tar")
        unpack_bundle(staged / "bundle.tar", staged / "check")
        verify_bundle(staged / "check", public_key)
        shutil.rmtree(staged / "check")
        if (staged / "source").exists():
            shutil.rmtree(staged / "source")

        manifest_bytes = (staged / "bundle" / "manifest.json").read_bytes()
        tar = staged / "bundle.tar"
        record = VersionRecord(
            version=manifest.version,
            bundle_id=manifest.bundle_id,
            manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
            tar_sha256=sha256_file(tar),
            tar_size=tar.stat().st_size,
            task=manifest.task.name,
            artifacts=tuple(
                f"{a.format}/{a.precision}/{a.quantization}" for a in manifest.artifacts
            ),
            created_at=manifest.created_at,
            published_at=now_iso(),
        )
        stored, created = registry.add_version(staged, record, channel)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    log.info("published %s (new=%s) channel=%s", stored.version, created, channel)
    return stored, created


def _check_same_key(registry: Registry, public_key: Path | str) -> None:
    """The operator key that signs channel statements must be the one bundles are checked with."""
    from fedge.shared import signing

    registry.adopt_signing_key_beside(public_key)
    signer = signing.public_key_fingerprint(registry.signing_key())
    trusted = signing.public_key_fingerprint(signing.load_public_key(public_key))
    if signer != trusted:
        raise SecurityError(
            f"the operator signing key ({signer[:23]}…) is not the pair of {public_key} "
            f"({trusted[:23]}…): devices would refuse the channel statement",
            hint="pass the matching --key and --signing-key",
        )


def _check_validation(bundle_dir: Path, manifest: Manifest) -> None:
    """Refuse a bundle with any artifact whose export validation did not pass (all listed)."""
    failed = [a.file for a in manifest.artifacts if not a.passed]
    if failed:
        raise BundleError(
            f"bundle {bundle_dir}: {', '.join(failed)} did not pass export validation "
            "(validation.passed is not true); the registry only stores validated bundles",
            hint="re-export, or leave failed artifacts out of the bundle",
        )
