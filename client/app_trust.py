"""Only code the site trusts runs at the site: the run's app package (FAB) is checked first.

Whoever can start a run chooses the FAB, and Flower's SuperNode installs it and imports
its ClientApp. Flower's own guard (``flower-supernode --trusted-entities``) cannot help
with an open-source SuperLink, which gives every locally submitted FAB empty
``verifications`` (STACK.md). So fedge checks in the one place it controls at the site,
the executor that starts each ClientApp (``fedge.client.warm_executor``): before
Flower's ``install_from_fab`` unpacks the FAB, the FAB's SHA-256 must equal the hash of
the fedge app this site has installed, rebuilt with Flower's own deterministic builder
(``flwr.cli.build.build_fab_from_disk``: fixed timestamps, sorted entries; the same
bytes every time). fedge's FAB holds only a ``pyproject.toml`` naming
``fedge.client.app:app``; the code is the site's installed fedge package. A FAB with any
other file, another component path or another config is refused before any of its code
is unpacked or imported, and the reason reaches the server as a failed round.

Why a hash of the installed app rather than an operator signature: the site then trusts
only what its own administrator installed, with no key to manage and nothing the
operator (or a thief of the operator's key) could sign into it. The price: server and
sites must run the same fedge version, and a mismatch is refused with both hashes named.
"""

import functools
import logging
from collections.abc import Callable
from typing import Any

from fedge.shared.ml.app_package import UntrustedApp, check_fab, installed_fab_hash

__all__ = ["UntrustedApp", "check_fab", "checked", "guard_clientapp_installs", "installed_fab_hash"]
log = logging.getLogger(__name__)


def checked(install: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap Flower's ``install_from_fab``: check the FAB first, then install it."""

    @functools.wraps(install)
    def install_trusted_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else fab_file.read_bytes()
        try:
            check_fab(content)
        except UntrustedApp as e:
            log.error("%s", e)
            raise
        return install(fab_file, *args, **kwargs)

    return install_trusted_fab


def guard_clientapp_installs() -> None:
    """Make Flower's ClientApp runner check every FAB before installing it.

    The replacement goes through ``fedge.shared.ml.flower_compat.wrap_fab_install``,
    which fails loudly (the site refuses to start) if Flower no longer installs FABs
    that way, instead of running unchecked apps.
    """
    from fedge.shared.ml.flower_compat import wrap_fab_install

    wrap_fab_install(checked)
    installed_fab_hash()  # once, before any fork
