"""Typer options that several commands share (one help text each), and what they default to."""

from pathlib import Path
from typing import Annotated

import typer

# Not "[default: ...]" in a help text: rich takes the brackets for markup and drops them.

# Reaching the federation server's control API (`fedge run`, `fedge export --federated`).
SuperLink = Annotated[str, typer.Option("--server", help="The SuperLink, HOST:PORT.")]
ServerCa = Annotated[
    Path | None,
    typer.Option("--ca", help="CA certificate of the server (TLS); default: the local server's."),
]
Insecure = Annotated[
    bool, typer.Option("--insecure", help="Connect without TLS (server started --insecure).")
]
TokenFile = Annotated[
    Path | None,
    typer.Option(
        "--token-file", help="Your control credential (`fedge server grant`); or $FEDGE_TOKEN."
    ),
]

# The server's side (`fedge server`, `fedge registry`, `fedge fleet`).
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Server state folder (default: $FEDGE_HOME/server): database, TLS files, site "
        "registry, credentials, and the device registry in its registry/ subfolder.",
    ),
]

# A device's side (`fedge edge ...`).
TrustedKey = Annotated[
    Path | None,
    typer.Option(
        "--key", help="Public key this device trusts (default: $FEDGE_HOME/keys/signing.pub)."
    ),
]


def data_dir_or_default(data_dir: Path | None) -> Path:
    """``--data-dir`` as given, or the default server folder; absolute."""
    from fedge.shared.paths import server_data_dir

    return (data_dir or server_data_dir()).expanduser().resolve()


def trusted_key_or_default(key: Path | None) -> Path:
    """``--key`` as given, or the default key a device trusts (``signing.pub``)."""
    from fedge.shared.paths import trusted_key_path

    return key if key is not None else trusted_key_path()
