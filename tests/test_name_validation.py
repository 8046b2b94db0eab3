"""Every name check matches the whole string: a trailing newline is not a valid name.

Python's ``$`` also matches before a final ``\\n``, so ``re.match(r"^name$", "name\\n")``
succeeds; the checks use ``fullmatch`` instead. A name with a newline would split log
lines, headers and file names where it is used.
"""

from collections.abc import Callable
from pathlib import Path

import pytest

from fedge.server.front import _ROUTE
from fedge.server.registry.devices import _check_name
from fedge.server.registry.store import check_channel, check_version
from fedge.shared import fleet_protocol
from fedge.shared.access_files import validate_user_name
from fedge.shared.enrollment_files import validate_site_name
from fedge.shared.errors import FedgeError
from fedge.shared.ml.checkpoint import latest_checkpoint
from fedge.shared.tls import _DNS_LABEL

CHECKS: dict[str, tuple[Callable[[str], object], str]] = {
    "user": (validate_user_name, "alice"),
    "site": (validate_site_name, "hospital-a"),
    "channel": (check_channel, "stable"),
    "version": (check_version, "1.0.0"),
    "device": (_check_name, "cam-1"),
}


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_a_trailing_newline_is_refused(kind: str) -> None:
    check, good = CHECKS[kind]
    check(good)  # the plain name passes
    for bad in (good + "\n", good + "\n\n", "\n" + good):
        with pytest.raises(FedgeError):
            check(bad)


def test_protocol_names_and_hashes_match_whole_strings() -> None:
    assert fleet_protocol.is_version("1.0") and not fleet_protocol.is_version("1.0\n")
    assert fleet_protocol.is_channel("beta") and not fleet_protocol.is_channel("beta\n")
    with pytest.raises(fleet_protocol.ProtocolError):
        fleet_protocol._sha256({"h": "a" * 64 + "\n"}, "h")
    with pytest.raises(fleet_protocol.ProtocolError):
        fleet_protocol._detail({"key\n": 1})
    assert fleet_protocol._detail({"key": 1}) == {"key": 1}


def test_front_routes_and_dns_labels_match_whole_strings() -> None:
    assert _ROUTE.fullmatch("/v1/control/list-nodes") is not None
    assert _ROUTE.fullmatch("/v1/control/list-nodes\n") is None
    # (--san values are stripped of surrounding blanks first; the label check itself is strict.)
    assert _DNS_LABEL.fullmatch("example") is not None
    assert _DNS_LABEL.fullmatch("example\n") is None


def test_checkpoint_names_match_whole_file_names(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "round-0001.safetensors").write_bytes(b"")
    (folder / "round-0009.safetensors\n").write_bytes(b"")
    (folder / "xround-0008.safetensors").write_bytes(b"")
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.name == "round-0001.safetensors"
