"""The fedge Flower app package (FAB) as installed here, and the check that a FAB is it.

A site (``fedge.client.app_trust``) and the coordinator's control-plane front
(``fedge.server.front``) both refuse any app package but the fedge app they have
installed: the FAB's SHA-256 must equal the hash of that app rebuilt with Flower's own
deterministic builder (``flwr.cli.build.build_fab_from_disk``: fixed timestamps, sorted
entries; the same bytes every time). Lives in ``shared/ml`` because it imports flwr.
"""

import functools
import hashlib

from fedge.shared.errors import SecurityError

# A FAB larger than this is refused unread (fedge's is a few kilobytes).
MAX_FAB_BYTES = 1 << 20


class UntrustedApp(SecurityError):
    """The run's app package is not the fedge app this site has installed."""


@functools.cache
def installed_fab_hash() -> str:
    """SHA-256 of the fedge Flower app as installed at this site, built as ``flwr run`` does."""
    from flwr.cli.build import build_fab_from_disk

    from fedge.shared.paths import flower_app_dir

    return hashlib.sha256(build_fab_from_disk(flower_app_dir())).hexdigest()


def check_fab(content: bytes) -> str:
    """Return the FAB's hash if it is exactly the installed fedge app.

    Raises
    ------
    UntrustedApp
        Otherwise, naming the FAB's hash and the one expected.
    """
    if not isinstance(content, bytes | bytearray) or len(content) > MAX_FAB_BYTES:
        raise UntrustedApp("refused the run's app package: not a fedge app (too large)")
    got = hashlib.sha256(content).hexdigest()
    expected = installed_fab_hash()
    if got != expected:
        raise UntrustedApp(
            f"refused the run's app package (sha256 {got[:16]}...): only the fedge app "
            f"installed here runs (sha256 {expected[:16]}...); same fedge version?"
        )
    return got
