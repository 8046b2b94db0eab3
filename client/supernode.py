"""Start a Flower SuperNode that serves one site's data to the federation.

The node config carries the site's data spec and name; it stays on the site
(it reaches only this site's ClientApp processes). Each SuperNode also opens a
local port for its ClientApps; fedge picks a free one so that several sites can
run on one host.
"""

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedge.shared import records
from fedge.shared.config import toml_value
from fedge.shared.processes import ProcessGroup, child_environment, flower_tool, free_port, spawn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuperNodeSpec:
    """How to run one site's SuperNode."""

    superlink: str  # HOST:PORT
    site: str
    data: str
    log_dir: Path
    root_certificates: Path | None = None  # None: plaintext (only with an insecure server)
    private_key: Path | None = None  # the site's enrolled key (SuperNode authentication)
    label_column: str = "label"
    init_weights: str = ""
    local_port: int = 0  # 0: pick a free one
    # True: fedge's forking SuperExec (``fedge.client.warm_executor``) starts the ClientApps;
    # False: Flower's default, a fresh ``flwr-clientapp`` process per message.
    warm: bool = True
    policy: Path | None = None  # the site's privacy policy (TOML); None: accept any run
    ledger: Path | None = None  # the site's privacy ledger; None: no lifetime accounting

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"supernode-{self.site}.log"


def node_config(spec: SuperNodeSpec) -> str:
    """Flower's ``--node-config`` string: space-separated TOML key=value pairs."""
    values = {
        records.NODE_SITE: spec.site,
        records.NODE_DATA: spec.data,
        records.NODE_LABEL_COLUMN: spec.label_column,
    }
    if spec.init_weights:
        values[records.NODE_INIT_WEIGHTS] = spec.init_weights
    if spec.policy is not None:
        values[records.NODE_POLICY] = str(Path(spec.policy).resolve())
    if spec.ledger is not None:
        values[records.NODE_LEDGER] = str(Path(spec.ledger).resolve())
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def supernode_command(spec: SuperNodeSpec, port: int) -> list[str]:
    """The ``flower-supernode`` command line for ``spec``; ``port`` is its local Runtime API."""
    command = [
        flower_tool("flower-supernode"),
        "--superlink",
        spec.superlink,
        "--node-config",
        node_config(spec),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--isolation",
        "process" if spec.warm else "subprocess",
    ]
    if spec.root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(spec.root_certificates)]
    if spec.private_key is not None:
        command += ["--auth-supernode-private-key", str(spec.private_key)]
    return command


def start_supernode(
    spec: SuperNodeSpec, group: ProcessGroup | None = None
) -> subprocess.Popen[bytes]:
    """Start the SuperNode (and its warm executor) in the background.

    Output goes to ``spec.log_path``. The executor watches the SuperNode's pid
    and exits with it, so stopping the returned process stops the site.
    """
    port = spec.local_port or free_port()
    # The SuperExec polls the SuperNode's local Runtime API for tasks (default every 1 s);
    # on loopback a shorter interval costs nothing and takes a second off each message.
    env = child_environment({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"})
    node = _start(
        group, f"supernode {spec.site}", supernode_command(spec, port), spec.log_path, env
    )
    if not spec.warm:
        # Flower's own flwr-clientapp processes do not check the run's app package
        # (fedge.client.app_trust): only benchmarks comparing against Flower use this.
        log.warning("site %s: Flower's default executor, the app package is NOT checked", spec.site)
    if spec.warm:
        executor = [
            sys.executable,
            "-m",
            "fedge.client.warm_executor",
            "--runtime-api-address",
            f"127.0.0.1:{port}",
            "--parent-pid",
            str(node.pid),
        ]
        _start(group, f"executor {spec.site}", executor, spec.log_path, env)
    return node


def _start(
    group: ProcessGroup | None, name: str, command: list[str], log_path: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    if group is not None:
        return group.start(name, command, log_path, env)
    return spawn(command, log_path, env)
