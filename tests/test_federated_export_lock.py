"""Two federated exports of one run cannot interleave their jobs in the run's staging folder."""

import socket
from pathlib import Path

import pytest

from fedge.edge.export.federated import FederatedTarget, one_export_at_a_time
from fedge.edge.export.federated_export import FederatedSource, export_federated
from fedge.shared.config import RunConfig
from fedge.shared.errors import ConfigError
from fedge.shared.signing import Ed25519PrivateKey
from tests.edge_device_support import digits_task


def test_a_second_export_of_the_same_run_fails_at_once(tmp_path: Path) -> None:
    with (
        one_export_at_a_time(tmp_path),
        pytest.raises(ConfigError, match="another federated"),
        one_export_at_a_time(tmp_path),
    ):
        pass
    with one_export_at_a_time(tmp_path):  # released: the next export may run
        pass


def test_export_federated_holds_the_run_lock(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # the "server" is reachable
    port = listener.getsockname()[1]

    def never(*args: object, **kwargs: object) -> dict:
        raise AssertionError("no job may be submitted while another export holds the run")

    target = FederatedTarget(f"127.0.0.1:{port}", None, None, never)
    source = FederatedSource(RunConfig(), tmp_path, tmp_path / "checkpoint.pt")
    try:
        with one_export_at_a_time(tmp_path), pytest.raises(ConfigError, match="another"):
            export_federated(
                None,  # type: ignore[arg-type]  # never reached
                digits_task(),
                tmp_path / "bundle",
                source=source, target=target, private_key=Ed25519PrivateKey.generate(),
                version="1.0.0", formats=("onnx",), quantize=("none",), max_accuracy_drop=1.0,
                model_card=None, privacy=None, progress=False,
            )  # fmt: skip
    finally:
        listener.close()
