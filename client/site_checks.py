"""Checks ``fedge client start`` makes before a site joins, so mistakes surface at once."""

from pathlib import Path

from fedge.shared.errors import ConnectionFailed, DataError
from fedge.shared.ml.data import DataSpec
from fedge.shared.processes import port_open, split_address


def check_data(data: str, config: Path | None) -> None:
    """The data spec parses and exists; with a run config, it loads for the run's task.

    Raises
    ------
    DataError
        If the data is missing, unreadable, or its labels do not match the run.
    """
    spec = DataSpec.parse(data)
    if not spec.is_builtin and not Path(spec.source).expanduser().exists():
        raise DataError(f"data path {spec.source} does not exist")
    if config is not None:
        from fedge.shared.config import load_run_config
        from fedge.shared.ml.data import load_data, task_for_run

        cfg = load_run_config(config)
        load_data(spec, task_for_run(cfg), label_column=cfg.label_column)


def check_server(address: str) -> None:
    """The server answers on HOST:PORT."""
    host, port = split_address(address)
    if not port_open(host, port, timeout=3.0):
        raise ConnectionFailed(f"cannot reach the server at {address}")
