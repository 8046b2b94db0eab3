"""The Flower seam: each internal fedge relies on is checked, fails loudly, and is really used."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import flwr
import pytest

from fedge.shared.errors import RunError
from fedge.shared.ml import flower_compat


def test_the_installed_flower_passes_every_check() -> None:
    from fedge.server.app import PromptGrid

    assert flower_compat.check_version() == flwr.__version__
    flower_compat.superexec_module()
    flower_compat.check_grid_subclass(PromptGrid)
    api = flower_compat.executor_api()
    assert api.TaskType.CLIENT_APP


def test_an_untested_flower_release_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(RunError, match=r"flwr 1\.43\.0: untested release"):
        flower_compat.superexec_module()
    with pytest.raises(RunError, match="untested release"):
        flower_compat.shorten_supernode_polls(0.2)


def test_a_renamed_executor_factory_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Assigning to a name Flower no longer reads would succeed silently: the check catches it."""
    import flwr.supercore.superexec.run_superexec as module

    monkeypatch.delattr(module, "get_executor")
    with pytest.raises(RunError, match="get_executor is gone"):
        flower_compat.superexec_module()


def test_a_superexec_that_no_longer_asks_the_factory_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flwr.supercore.superexec.run_superexec as module

    def run_superexec(**_kwargs: object) -> None:
        return None  # picks its executor some other way

    monkeypatch.setattr(module, "run_superexec", run_superexec)
    with pytest.raises(RunError, match="no longer uses get_executor"):
        flower_compat.superexec_module()


def test_a_moved_poll_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supercore.superexec.run_superexec as module

    monkeypatch.setattr(module, "_TASK_POLL_INTERVAL_ENV", "FLWR_SOMETHING_ELSE")
    with pytest.raises(RunError, match="FLWR_SUPEREXEC_TASK_POLL_INTERVAL"):
        flower_compat.superexec_module()


def test_a_superexec_that_ignores_the_executor_stops_the_process() -> None:
    """If Flower runs without asking for fedge's executor, the process exits with an error."""
    code = textwrap.dedent(
        """
        import logging, time
        import flwr.supercore.superexec.run_superexec as module
        from fedge.shared.ml import flower_compat

        logging.basicConfig()
        flower_compat._EXECUTOR_DEADLINE_S = 1.0
        def run_superexec(**_kwargs):  # looks up get_executor, but never calls it
            _ = get_executor  # noqa: F821
            time.sleep(30)
        run_superexec.__globals__["get_executor"] = None
        module.run_superexec = run_superexec
        flower_compat.run_superexec_with(object, "127.0.0.1:1", None, 0.2)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 70
    assert "did not use fedge's executor" in done.stderr


def test_the_supernode_idle_poll_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.start_client_internal as module

    monkeypatch.setattr(module, "time", time)
    flower_compat.shorten_supernode_polls(0.05)
    assert isinstance(module.time, flower_compat._CappedSleep)
    started = time.monotonic()
    module.time.sleep(3)  # what the SuperNode's loop does when the SuperLink has nothing
    assert time.monotonic() - started < 1
    assert module.time.monotonic() > 0  # everything else is the real time module


def _loop_polling_every_second() -> None:
    time.sleep(1)


def test_a_supernode_loop_without_the_3s_sleep_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.start_client_internal as module

    monkeypatch.setattr(module, "start_client_internal", _loop_polling_every_second)
    with pytest.raises(RunError, match="no longer sleeps 3 s"):
        flower_compat.shorten_supernode_polls(0.2)


def test_a_grid_missing_a_method_is_refused() -> None:
    from flwr.server import Grid

    from fedge.server.app import PromptGrid

    class Partial(Grid):
        send_and_receive = PromptGrid.send_and_receive

    with pytest.raises(RunError, match="Grid has methods Partial lacks: create_message"):
        flower_compat.check_grid_subclass(Partial)


def test_workflows_that_stop_calling_send_and_receive_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedge.server.app import PromptGrid

    monkeypatch.setattr(flower_compat, "_WORKFLOW_MODULES", ("flwr.server.workflow.constant",))
    with pytest.raises(RunError, match="no longer waits for replies"):
        PromptGrid(grid=None)  # type: ignore[arg-type]


def test_the_warm_executor_fails_loudly_when_the_check_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedge.client.warm_executor import ForkExecutor

    monkeypatch.setattr(flwr, "__version__", "2.0.0")
    with pytest.raises(RunError, match="untested release"):
        ForkExecutor()


def test_the_compat_module_documents_every_internal_it_touches() -> None:
    doc = flower_compat.__doc__ or ""
    source = Path(flower_compat.__file__).read_text()
    internals = (
        "get_executor",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL",
        "start_client_internal",
        "install_from_fab",
        "pull_objects",
        "pull_and_inflate_object_from_tree",
    )
    for internal in internals:
        assert internal in doc and internal in source


def test_a_forked_task_imports_nothing_the_warm_executor_could_have_imported() -> None:
    """A task forked from the warm executor trains and evaluates without importing a module.

    Each import in a forked task is paid again by every task: creating an optimizer lazily
    imports ``torch._dynamo`` (about 1 s here), which once made a tiny round's training
    stage ten times the training itself. Data is loaded first, as the executor's cache does.
    """
    code = textwrap.dedent(
        """
        import sys
        from fedge.client.warm_executor import _preimport
        _preimport()
        from fedge.client.site import Site, site_data
        from fedge.shared.config import RunConfig
        cfg = RunConfig(num_rounds=1, min_clients=2, federated_eval=False, server_eval=False)
        site_data(cfg, "digits#0/2", "label")  # the executor caches the site's data
        before = set(sys.modules)
        site = Site(cfg, {"data": "digits#0/2", "site": "s0"})
        site.fit(site.get_parameters(), {})
        site.evaluate(site.get_parameters(), {})
        print("NEW", sorted(set(sys.modules) - before))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NEW []" in done.stdout, done.stdout[-2000:]


@pytest.fixture
def pull_functions(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Flower's two pull functions, restored after the test (the cap is process-wide)."""
    import flwr.supercore.inflatable.inflatable_utils as utils

    funcs = [utils.pull_objects, utils.pull_and_inflate_object_from_tree]
    for func in funcs:
        monkeypatch.setattr(func, "__kwdefaults__", dict(func.__kwdefaults__ or {}))
        monkeypatch.setattr(func, "fedge_backoff_cap", None, raising=False)
        monkeypatch.delattr(func, "fedge_backoff_cap")
    return funcs


@pytest.mark.parametrize("caller", ["supernode", "clientapp", "serverapp"])
def test_object_pulls_are_retried_within_the_cap(pull_functions: list[Any], caller: str) -> None:
    import inspect

    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    flower_compat.shorten_object_pull_backoff(0.2, caller)
    flower_compat.shorten_object_pull_backoff(0.2, caller)  # again: same settings
    for func in pull_functions:
        params = inspect.signature(func).parameters
        assert params["initial_backoff"].default == 0.05
        assert params["backoff_cap"].default == 0.2
        assert params["max_tries_per_object"].default is None  # bounded by max_time (2 h)
        assert params["max_time"].default == 7200
    asked: list[str] = []

    def pull(object_id: str) -> bytes:  # not there for the first two asks, as in a race
        asked.append(object_id)
        if len(asked) < 3:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert pull_objects(["a" * 64], pull) == {"a" * 64: b"content"}
    assert len(asked) == 3


def test_changed_pull_settings_are_refused(
    pull_functions: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    func = pull_functions[0]
    monkeypatch.setitem(func.__kwdefaults__, "initial_backoff", 2)
    with pytest.raises(RunError, match="pull_objects no longer has Flower's retry settings"):
        flower_compat.shorten_object_pull_backoff(0.2, "supernode")


def test_a_caller_that_no_longer_pulls_through_flower_s_function_is_refused(
    pull_functions: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr.supernode.runtime.run_clientapp as runner

    def pull_task_input(_client: object) -> None:
        return None  # pulls some other way

    monkeypatch.setattr(runner, "pull_task_input", pull_task_input)
    with pytest.raises(RunError, match="no longer uses pull_and_inflate_object_from_tree"):
        flower_compat.shorten_object_pull_backoff(0.2, "clientapp")
    monkeypatch.undo()
    import flwr.superlink.grid.http_grid as http_grid

    monkeypatch.setattr(http_grid, "pull_objects", lambda *a, **k: {})
    with pytest.raises(RunError, match=r"http_grid\.pull_objects is not"):
        flower_compat.shorten_object_pull_backoff(0.2, "serverapp")


def test_a_caller_that_passes_its_own_retry_settings_is_refused(
    pull_functions: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr.supernode.start_client_internal as module

    def _pull_and_store_message(**_kwargs: object) -> None:
        module.pull_objects([], lambda _id: b"", initial_backoff=1)

    monkeypatch.setattr(module, "_pull_and_store_message", _pull_and_store_message)
    with pytest.raises(RunError, match="passes its own initial_backoff"):
        flower_compat.shorten_object_pull_backoff(0.2, "supernode")
