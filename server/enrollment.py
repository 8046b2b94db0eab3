"""The operator's side of enrollment: approve, list and revoke sites on the SuperLink.

The SuperLink is the authority on which keys may connect (``flwr supernode register /
unregister / list``, run as a subprocess against a connection kept under the data dir);
fedge keeps a registry beside it (``DATA_DIR/sites.json``) that maps site names to keys
and node ids and remembers revoked keys, which Flower never lets back in. See
README.md, "Security: TLS and site enrollment" for the whole flow.
"""

import datetime
import json
import logging
import os
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.server.flwr_control import parse_time, remote_nodes, run_flwr
from fedge.shared.atomic import atomic_write_json, exclusive_lock, read_json_object
from fedge.shared.enrollment_files import (
    APPROVAL_SUFFIX,
    Approval,
    read_request,
    same_fingerprint,
    utc_now,
    validate_site_name,
)
from fedge.shared.errors import ConfigError, SecurityError
from fedge.shared.processes import split_address
from fedge.shared.tls import SERVER_CERT_NAME, certificate_fingerprint, certificate_sans

log = logging.getLogger(__name__)

REGISTRY_NAME = "sites.json"
REGISTRY_FORMAT = "fedge-site-registry/1"
MAX_REGISTRY_BYTES = 16 << 20  # about 1 KiB a site

APPROVED, REVOKED = "approved", "revoked"


@dataclass(frozen=True)
class ApprovedSite:
    """The result of ``approve``: what to tell the operator and where the answer file is."""

    name: str
    fingerprint: str
    node_id: int
    approved_at: str
    server_address: str
    ca_fingerprint: str
    approval_path: Path
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class SiteRow:
    """One row of ``fedge server clients``.

    ``status``: online, offline, never-connected, revoked, missing (approved but unknown to
    the SuperLink, e.g. after its database was reset) or unknown (not queried). A node the
    SuperLink knows but fedge never approved has ``enrolled=False`` and no name.
    """

    name: str
    fingerprint: str
    status: str
    node_id: int | None
    last_seen: datetime.datetime | None
    enrolled: bool = True


# --- registry -------------------------------------------------------------------------


def _locked(data_dir: Path) -> AbstractContextManager[None]:
    """Serialize read-modify-write of the registry between concurrent fedge commands."""
    return exclusive_lock(data_dir / (REGISTRY_NAME + ".lock"))


def _load_registry(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / REGISTRY_NAME
    if not os.path.lexists(path):
        return []
    data = read_json_object(
        path,
        MAX_REGISTRY_BYTES,
        SecurityError,
        "fedge site registry",
        fmt=REGISTRY_FORMAT,
        hint="restore the site registry from a backup",
    )
    return list(data.get("sites", []))


def _save_registry(data_dir: Path, sites: list[dict[str, Any]]) -> None:
    atomic_write_json(data_dir / REGISTRY_NAME, {"format": REGISTRY_FORMAT, "sites": sites})


def _current(sites: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The latest entry for ``name`` (a re-enrolled site has older, revoked ones)."""
    matches = [s for s in sites if s["name"] == name]
    return matches[-1] if matches else None


def approve(
    request_path: Path | str,
    data_dir: Path | str,
    superlink_address: str,
    tls_ca: Path | str | None,
    *,
    expected_fingerprint: str | None = None,
    public_address: str | None = None,
    out_path: Path | str | None = None,
) -> ApprovedSite:
    """Register a site's key with the SuperLink and write its approval file.

    Approving the same site and key again only rewrites the approval file.

    Parameters
    ----------
    request_path
        The site's ``SITE.enroll.json``.
    data_dir
        The server's data dir (registry, ``flwr`` connection).
    superlink_address
        ``HOST:PORT`` where this machine reaches the SuperLink (``0.0.0.0`` means loopback).
    tls_ca
        The CA certificate the SuperLink's certificate was issued by. None (an
        ``--insecure`` server) is refused: Flower's SuperNode authentication needs TLS.
    expected_fingerprint
        The key fingerprint the site admin read out; a mismatch is refused.
    public_address
        ``HOST:PORT`` the site should dial, if not the one in its request.
    out_path
        Where to write the approval; default ``SITE.approved.json`` beside the request.

    Returns
    -------
    ApprovedSite
        With ``warnings`` (e.g. the site's host is not in the server certificate).

    Raises
    ------
    ConfigError
        Missing request file, bad site name or address.
    SecurityError
        Malformed request, fingerprint mismatch, name taken by another key, a revoked
        key, an ``--insecure`` server, or the SuperLink refusing the key.
    ConnectionFailed
        When the SuperLink cannot be reached.
    """
    request = read_request(request_path)
    if expected_fingerprint is not None and not same_fingerprint(
        expected_fingerprint, request.fingerprint
    ):
        raise SecurityError(
            f"the key in {request_path} has fingerprint {request.fingerprint}, not "
            f"{expected_fingerprint}; the request may have been tampered with",
            hint="do not approve it; ask the site to send its request again",
        )
    if tls_ca is None:
        raise SecurityError(
            "sites cannot be enrolled with a server started with --insecure: Flower's "
            "SuperNode authentication needs TLS",
            hint="restart the server without --insecure",
        )
    tls_ca, data_dir = Path(tls_ca), Path(data_dir)
    server_address = public_address or request.server_address
    split_address(server_address)

    with _locked(data_dir):
        sites = _load_registry(data_dir)
        entry = _check_can_approve(sites, request.site, request.fingerprint)
        if entry is None:
            try:
                node_id = _register(
                    request.public_key, request.site, data_dir, superlink_address, tls_ca
                )
            except SecurityError as e:
                # An approval that crashed between Flower's register and our save left the
                # key registered but unknown here: adopt that node if it holds this key.
                if "already in use" not in str(e).lower():
                    raise
                node_id = _adopt(request.public_key, data_dir, superlink_address, tls_ca, e)
            entry = {
                "name": request.site,
                "fingerprint": request.fingerprint,
                "public_key": request.public_key,
                "node_id": node_id,
                "status": APPROVED,
                "approved_at": utc_now(),
                "revoked_at": None,
            }
            sites.append(entry)
            _save_registry(data_dir, sites)
            log.info("approved site %s as node %s", request.site, entry["node_id"])

    ca_pem = tls_ca.read_text(encoding="ascii")
    approval = Approval(
        site=request.site,
        fingerprint=request.fingerprint,
        node_id=int(entry["node_id"]),
        server_address=server_address,
        ca_certificate=ca_pem,
        ca_fingerprint=certificate_fingerprint(tls_ca),
        approved_at=str(entry["approved_at"]),
    )
    target = (
        Path(out_path)
        if out_path is not None
        else Path(request_path).with_name(f"{request.site}{APPROVAL_SUFFIX}")
    )
    atomic_write_json(target, approval.to_dict())
    return ApprovedSite(
        name=approval.site,
        fingerprint=approval.fingerprint,
        node_id=approval.node_id,
        approved_at=approval.approved_at,
        server_address=server_address,
        ca_fingerprint=approval.ca_fingerprint,
        approval_path=target,
        warnings=tuple(_san_warnings(tls_ca.parent / SERVER_CERT_NAME, server_address)),
    )


def _check_can_approve(
    sites: list[dict[str, Any]], name: str, fingerprint: str
) -> dict[str, Any] | None:
    """The existing entry when this exact site and key are approved already, else None.

    Raises ``SecurityError`` for a revoked key, a key approved under another name, or a
    name held by another, still approved key.
    """
    for entry in sites:
        if not same_fingerprint(entry["fingerprint"], fingerprint):
            continue
        if entry["status"] == REVOKED:
            raise SecurityError(
                f"key {fingerprint} of site {entry['name']!r} was revoked on "
                f"{entry['revoked_at']}; a revoked key cannot be approved again",
                hint=f"the site makes a new key with `fedge client enroll --force --name {name} "
                "--server HOST:PORT` and sends the new request",
            )
        if entry["name"] != name:
            raise SecurityError(
                f"key {fingerprint} is already approved as site {entry['name']!r}",
                hint="each site needs its own key; the site should enroll with a new one",
            )
        return entry
    current = _current(sites, name)
    if current is not None and current["status"] == APPROVED:
        raise SecurityError(
            f"site {name!r} is already enrolled with another key ({current['fingerprint']})",
            hint=f"if the site replaced its key, revoke the old one first: "
            f"`fedge server revoke {name}`",
        )
    return None


def _register(
    public_key: str, name: str, data_dir: Path, superlink_address: str, tls_ca: Path
) -> int:
    """``flwr supernode register`` the key (it wants a file) and return the node id."""
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        key_file = Path(tmp) / f"{name}.pub"
        key_file.write_text(public_key + "\n", encoding="ascii")
        answer = run_flwr(
            ["register", str(key_file), "--name", name],
            data_dir,
            superlink_address,
            tls_ca,
            f"register site {name!r}",
        )
    try:
        return int(answer["node-id"])
    except (KeyError, TypeError, ValueError) as e:
        raise SecurityError(f"`flwr supernode register` gave no node id: {answer}") from e


# Flower's `supernode list --format json` leaves out each node's public key; its own
# Control API client (what that command uses) returns it.
_LIST_KEYS = """
import base64, json
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection
from flwr.proto.control_pb2 import ListNodesRequest
client = init_http_client_from_connection(read_superlink_connection(%r))
try:
    nodes = client.ListNodes(ListNodesRequest()).nodes_info
finally:
    client.close()
print(json.dumps([{"node_id": n.node_id, "status": n.status,
                   "public_key": base64.b64encode(n.public_key).decode()} for n in nodes]))
"""


def _adopt(
    public_key: str, data_dir: Path, superlink_address: str, tls_ca: Path, error: SecurityError
) -> int:
    """The node id the SuperLink holds for ``public_key`` (checked key by key), else ``error``."""
    import base64
    import subprocess
    import sys

    from cryptography.hazmat.primitives import serialization

    from fedge.server.flwr_control import CONNECTION, FLWR_TIMEOUT_S, flwr_home, probe
    from fedge.shared.processes import child_environment

    probe(superlink_address, tls_ca)
    home = flwr_home(data_dir, superlink_address, tls_ca)
    env = child_environment({"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"})
    done = subprocess.run(
        [sys.executable, "-c", _LIST_KEYS % CONNECTION],
        env=env,
        capture_output=True,
        text=True,
        timeout=FLWR_TIMEOUT_S,
        check=False,
    )
    try:
        nodes = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise SecurityError(f"{error} (and listing the SuperLink's keys failed)") from e
    wanted = serialization.load_ssh_public_key(public_key.encode("ascii"))
    for node in nodes:
        if node.get("status") == "unregistered":
            continue
        try:
            held = serialization.load_pem_public_key(base64.b64decode(node["public_key"]))
        except (ValueError, KeyError, TypeError):
            continue
        if held == wanted:
            log.warning(
                "key already registered as node %s (an interrupted approval); adopting it",
                node["node_id"],
            )
            return int(node["node_id"])
    raise error


def _san_warnings(server_cert: Path, server_address: str) -> list[str]:
    """Warn when the host the site dials is not in the SuperLink's certificate."""
    if not server_cert.exists():
        return []
    host, _ = split_address(server_address)
    sans = certificate_sans(server_cert)
    if host.lower().rstrip(".") in {san.lower() for san in sans}:
        return []
    return [
        f"the site dials {host}, which the server certificate does not cover "
        f"({', '.join(sans)}); restart the server with `--san {host}` before the site "
        "connects"
    ]


def list_sites(
    data_dir: Path | str,
    superlink_address: str,
    tls_ca: Path | str | None,
    *,
    live: bool = True,
) -> list[SiteRow]:
    """Every enrolled site with its live status from the SuperLink.

    Parameters
    ----------
    data_dir
        The server's data dir.
    superlink_address
        ``HOST:PORT`` where this machine reaches the SuperLink.
    tls_ca
        The SuperLink's CA certificate (None for an ``--insecure`` server).
    live
        Ask the SuperLink (``flwr supernode list``); False lists the registry alone
        with status ``unknown`` for approved sites.

    Returns
    -------
    list[SiteRow]
        One row per site name (its latest key), then nodes the SuperLink knows that
        fedge never approved (``enrolled=False``).

    Raises
    ------
    ConnectionFailed, SecurityError
        When ``live`` and the SuperLink cannot be reached or refuses.
    """
    data_dir = Path(data_dir)
    sites = _load_registry(data_dir)
    ca = Path(tls_ca) if tls_ca is not None else None
    nodes = remote_nodes(data_dir, superlink_address, ca) if live else {}
    now = datetime.datetime.now(datetime.UTC)
    rows: list[SiteRow] = []
    latest = {entry["name"]: entry for entry in sites}  # later entries win: the current key
    for entry in latest.values():
        node_id = int(entry["node_id"])
        status, last_seen = _status(entry, nodes.get(node_id), live, now)
        rows.append(SiteRow(entry["name"], entry["fingerprint"], status, node_id, last_seen))
    known = {int(entry["node_id"]) for entry in sites}
    for node_id, node in nodes.items():
        if node_id in known or node.get("status") == "unregistered":
            continue
        status, last_seen = _status(None, node, live, now)
        rows.append(SiteRow("", "", status, node_id, last_seen, enrolled=False))
    return rows


def _status(
    entry: dict[str, Any] | None,
    node: dict[str, Any] | None,
    live: bool,
    now: datetime.datetime,
) -> tuple[str, datetime.datetime | None]:
    """Registry status + flwr's node status -> (status, last seen)."""
    if entry is not None and entry["status"] == REVOKED:
        return REVOKED, parse_time(node.get("offline-at")) if node else None
    if not live:
        return "unknown", None
    if node is None:
        return "missing", None
    flwr_status = str(node.get("status", ""))
    if flwr_status == "online":
        return "online", now
    if flwr_status == "offline":
        return "offline", parse_time(node.get("offline-at"))
    if flwr_status == "registered":
        return "never-connected", None
    if flwr_status == "unregistered":
        return REVOKED, parse_time(node.get("offline-at"))
    return flwr_status or "unknown", None


def revoke(
    site_name: str,
    data_dir: Path | str,
    superlink_address: str,
    tls_ca: Path | str | None,
) -> SiteRow:
    """Unregister a site's node from the SuperLink and mark its key revoked.

    A connected SuperNode is disconnected at once, and the key can never connect again;
    to come back the site enrolls with a new key.

    Returns
    -------
    SiteRow
        The site, now with status ``revoked``.

    Raises
    ------
    ConfigError
        When no site has this name, or it is revoked already.
    ConnectionFailed, SecurityError
        When the SuperLink cannot be reached or refuses.
    """
    validate_site_name(site_name)
    data_dir = Path(data_dir)
    ca = Path(tls_ca) if tls_ca is not None else None
    with _locked(data_dir):
        sites = _load_registry(data_dir)
        entry = _current(sites, site_name)
        if entry is None:
            raise ConfigError(
                f"no enrolled site is named {site_name!r}", hint="see `fedge server clients`"
            )
        if entry["status"] == REVOKED:
            raise ConfigError(f"site {site_name!r} was revoked already on {entry['revoked_at']}")
        node_id = int(entry["node_id"])
        try:
            run_flwr(
                ["unregister", str(node_id)],
                data_dir,
                superlink_address,
                ca,
                f"unregister site {site_name!r} (node {node_id})",
            )
        except SecurityError as e:
            # The SuperLink no longer knows the node (its database was reset): the key
            # cannot connect anyway, so recording the revocation is all that is left.
            if "not found" not in str(e).lower():
                raise
            log.warning("node %s of site %s was not on the SuperLink", node_id, site_name)
        entry["status"] = REVOKED
        entry["revoked_at"] = utc_now()
        _save_registry(data_dir, sites)
    return SiteRow(site_name, entry["fingerprint"], REVOKED, node_id, None)
