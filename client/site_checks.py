"""Checks ``fedge client start`` makes before a site joins, so mistakes surface at once."""

from pathlib import Path
from typing import TYPE_CHECKING

from fedge.shared.errors import ConnectionFailed, DataError
from fedge.shared.ml.data import DataSpec
from fedge.shared.processes import port_open, split_address

if TYPE_CHECKING:
    from fedge.shared.tasks import TaskSpec


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
        task = task_for_run(cfg)
        check_model(cfg.model, task)
        load_data(spec, task, label_column=cfg.label_column)


def check_model(model: str, task: "TaskSpec") -> None:
    """A model factory (``package.module:callable``) imports here and builds a model with a
    clear head: the ClientApp on this site will import it for every round.

    Raises
    ------
    ModelError
        If the factory's module does not import or its model has no clear head.
    """
    from fedge.shared.model_names import is_factory, is_timm

    if is_factory(model) or is_timm(model):
        from fedge.shared.ml.models import build_model

        build_model(model, task)


def check_server(address: str) -> None:
    """The server answers on HOST:PORT."""
    host, port = split_address(address)
    if not port_open(host, port, timeout=3.0):
        raise ConnectionFailed(f"cannot reach the server at {address}")
