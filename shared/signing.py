"""Ed25519 keys and signatures for model bundles (torch-free, ``cryptography`` only).

The server signs a bundle's ``manifest.json`` with its private key; a device
trusts only the server's public key (``signing.pub``) and refuses anything
else. Private keys are PEM PKCS8, unencrypted, mode 0600; public keys are PEM
SubjectPublicKeyInfo. A key's fingerprint is ``"sha256:" + sha256(raw 32-byte
public key)``, which the manifest records so a device can say which key signed it.
"""

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.shared.atomic import atomic_write_bytes
from fedge.shared.errors import SecurityError

ALGORITHM = "Ed25519"
SIGNATURE_SIZE = 64
PUBLIC_SUFFIX = ".pub"

__all__ = [
    "ALGORITHM",
    "SIGNATURE_SIZE",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "generate_signing_key",
    "load_private_key",
    "load_public_key",
    "public_key_fingerprint",
    "public_key_path_for",
    "sign",
    "verify",
]


def public_key_path_for(private_path: Path | str) -> Path:
    """Where the public key of ``private_path`` lives: ``signing.key`` -> ``signing.pub``."""
    return Path(private_path).with_suffix(PUBLIC_SUFFIX)


def generate_signing_key(private_path: Path | str, overwrite: bool = False) -> Path:
    """Create a new Ed25519 key pair: the private key at ``private_path``, the public beside it.

    Parameters
    ----------
    private_path
        Where to write the private key (PEM PKCS8, mode 0600, written atomically).
        The public key goes to ``private_path.with_suffix(".pub")``.
    overwrite
        Replace an existing key pair. Bundles signed by the old key will no longer
        verify on devices that are given the new public key.

    Returns
    -------
    Path
        The path of the public key file (the file to copy onto devices).

    Raises
    ------
    SecurityError
        If a key already exists there and ``overwrite`` is false.
    """
    private_path = Path(private_path)
    public_path = public_key_path_for(private_path)
    if private_path.suffix == PUBLIC_SUFFIX:
        raise SecurityError(
            f"{private_path} ends in {PUBLIC_SUFFIX!r}, the suffix of the public key; "
            "choose a private key path such as signing.key"
        )
    for path in (private_path, public_path):
        if path.is_dir():
            # Even with --force: a directory is never "an old key" to replace.
            raise SecurityError(f"{path} is a directory; give a key file path such as signing.key")
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise SecurityError(
                    f"{path} already exists; refusing to overwrite a signing key "
                    "(pass overwrite / --force to replace it, which invalidates old bundles)"
                )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The private key is written first: a public key never exists without its private half.
        atomic_write_bytes(private_path, private_pem, mode=0o600)
        atomic_write_bytes(public_path, public_pem, mode=0o644)
    except OSError as e:
        raise SecurityError(f"cannot write the key pair at {private_path}: {e.strerror}") from e
    return public_path


def _read_key_file(path: Path | str, what: str) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        hint = (
            "copy the server's signing.pub to this device, or pass its path with --key"
            if what == "public key"
            else "create a key pair with `fedge keys`, or pass the right path"
        )
        raise SecurityError(f"{what} {path} does not exist", hint=hint) from e
    except OSError as e:
        raise SecurityError(f"cannot read {what} {path}: {e.strerror}") from e


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM PKCS8, unencrypted).

    Raises
    ------
    SecurityError
        If the file is missing, unreadable, corrupt or not an Ed25519 private key.
    """
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise SecurityError(f"{path} is not a readable unencrypted PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise SecurityError(f"{path} holds a {type(key).__name__}, not an Ed25519 signing key")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM SubjectPublicKeyInfo).

    Raises
    ------
    SecurityError
        If the file is missing, unreadable, corrupt or not an Ed25519 public key.
    """
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise SecurityError(f"{path} is not a readable PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise SecurityError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def public_key_fingerprint(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``"sha256:<hex>"`` of the raw 32-byte public key (a private key gives its public one's)."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The raw 64-byte Ed25519 signature of ``data``."""
    return private_key.sign(data)


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` under ``public_key``."""
    if len(signature) != SIGNATURE_SIZE:
        return False
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
