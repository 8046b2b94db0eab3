"""Typer option aliases that several commands share, so that each option has one help text."""

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
