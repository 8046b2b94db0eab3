"""A whole federation on one machine: a SuperLink and N enrolled SuperNodes on loopback.

Used by ``fedge demo``, the integration tests and the benchmarks. It goes
through the same steps a real deployment does (TLS certificate, each site's key
pair, the operator's approval, SuperNodes started with the site's key and the
CA), only with every folder under one work directory.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.client.supernode import SuperNodeSpec, start_supernode
from fedge.server.superlink import SuperLinkSpec, start_superlink
from fedge.shared.processes import ProcessGroup, free_port
from fedge.shared.tls import TLSFiles

log = logging.getLogger(__name__)


def threads_per_site(sites: int) -> int:
    """This machine's cores (those this process may use) split evenly between ``sites``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, sites))


@dataclass
class LocalFederation:
    """Start with ``start()``; everything runs inside ``group`` and stops with it."""

    work_dir: Path
    data_specs: list[str]
    group: ProcessGroup
    secure: bool = True
    warm: bool = True
    idle_poll: float = 0.2  # on loopback a SuperNode may ask for work often (Flower: 3 s)
    # torch threads per site; 0: this machine's cores split evenly between the sites, which
    # all train at once on them (see ``SuperNodeSpec.threads``).
    threads: int = 0
    site_names: list[str] = field(default_factory=list)
    # Folders besides work_dir where runs may write and read (fedge.server.run_paths).
    run_roots: tuple[Path, ...] = ()
    address: str = ""
    tls: TLSFiles | None = None
    supernodes: dict[str, Any] = field(default_factory=dict)
    control_address: str = ""  # the SuperLink itself, on loopback (past the front)
    token: str | None = None  # the operator's control credential (secure only)

    def start(self) -> "LocalFederation":
        """Start the SuperLink, enroll every site, start its SuperNode."""
        from fedge.shared.tls import ensure_server_certificate

        port = free_port()
        server_dir = self.work_dir / "server"
        self.address = f"127.0.0.1:{port}"
        self.control_address = self.address
        if self.secure:
            from fedge.server.front import FrontSpec, start_front
            from fedge.server.operators import grant

            # As `fedge server start` does: the SuperLink on an internal loopback port, the
            # authenticating front on the public one, and an operator credential.
            self.tls = ensure_server_certificate(server_dir / "tls", ["127.0.0.1", "localhost"])
            internal = free_port()
            self.control_address = f"127.0.0.1:{internal}"
            roots = (self.work_dir, *self.run_roots)
            spec = SuperLinkSpec(server_dir, "127.0.0.1", internal, self.tls, roots)
            start_superlink(spec, self.group)
            tls = self.tls
            front = FrontSpec(
                server_dir, "127.0.0.1", port, internal, tls.cert, tls.key, tls.ca_cert
            )
            start_front(front, self.group)
            self.token = grant(server_dir, "demo-operator", "operator").token
        else:
            # Runs of the demo and the tests live in the work folder: allow it.
            roots = (self.work_dir, *self.run_roots)
            spec = SuperLinkSpec(server_dir, "127.0.0.1", port, self.tls, roots)
            start_superlink(spec, self.group)
        self.site_names = self.site_names or [f"site-{i + 1}" for i in range(len(self.data_specs))]
        for name, data in zip(self.site_names, self.data_specs, strict=True):
            self.start_site(name, data)
        return self

    def start_site(self, name: str, data: str) -> Any:
        """Enroll (when secure) and start one site's SuperNode."""
        key = ca = None
        if self.tls is not None:
            key, ca = self._enroll(name)
        spec = SuperNodeSpec(
            superlink=self.address,
            site=name,
            data=data,
            log_dir=self.work_dir / "logs",
            root_certificates=ca,
            private_key=key,
            warm=self.warm,
            idle_poll=self.idle_poll,
            threads=self.threads or threads_per_site(len(self.data_specs)),
            # Each site's own policy and privacy ledger, in its folder (as `fedge client start`).
            policy=self.work_dir / "sites" / name / "policy.toml",
            ledger=self.work_dir / "sites" / name / "privacy-ledger.json",
        )
        self.supernodes[name] = start_supernode(spec, self.group)
        return self.supernodes[name]

    def _enroll(self, name: str) -> tuple[Path, Path]:
        """The site's enrollment, the operator's approval, the site installing it."""
        from fedge.client.enrollment import create_enrollment, install_approval
        from fedge.server.enrollment import approve

        assert self.tls is not None
        site_dir = self.work_dir / "sites" / name
        request = create_enrollment(name, self.address, out_dir=site_dir)
        assert request.path is not None
        approved = approve(
            request.path, self.work_dir / "server", self.control_address, self.tls.ca_cert
        )
        identity = install_approval(approved.approval_path, directory=site_dir)
        assert identity.ca_cert_path is not None
        return identity.private_key_path, identity.ca_cert_path

    def submit(self, cfg: Any, on_event: Any = None) -> dict[str, Any]:
        """Run ``cfg`` on this federation and wait for its summary."""
        from fedge.server.submit import submit_run

        ca = self.tls.ca_cert if self.tls is not None else None
        return submit_run(cfg, self.address, ca, on_event=on_event, token=self.token)
