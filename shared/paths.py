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


def flower_app_dir() -> Path:
    """The fedge Flower app folder (``server/flower-app``) of this installation.

    Sites rebuild its FAB to check what a run asks them to execute
    (``fedge.client.app_trust``); the path is resolved here so the site side needs no
    server import.
    """
    return Path(__file__).resolve().parent.parent / "server" / "flower-app"
