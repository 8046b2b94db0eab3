"""Where fedge keeps its state on a machine: ``$FEDGE_HOME`` (default ``~/.fedge``)."""

import os
from pathlib import Path


def fedge_home() -> Path:
    """Root of fedge's per-machine state (keys, server data, site enrollment)."""
    return Path(os.environ.get("FEDGE_HOME", "~/.fedge")).expanduser()


def server_data_dir() -> Path:
    """Default ``fedge server start --data-dir``: SuperLink state, CA, registry."""
    return fedge_home() / "server"


def signing_key_path() -> Path:
    """Default Ed25519 private key that signs model bundles (public key beside it)."""
    return fedge_home() / "keys" / "signing.key"


def trusted_key_path() -> Path:
    """Default public key a device trusts and the registry checks: ``signing.pub``."""
    return signing_key_path().with_suffix(".pub")


def site_dir(name: str) -> Path:
    """A site's enrollment folder: its private key, public key, the server's CA."""
    return fedge_home() / "sites" / name
