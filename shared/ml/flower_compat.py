"""Every use of Flower's private internals, in one place, each checked before it is used.

fedge speeds up and hardens Flower 1.42 at five points Flower offers no public
hook for. Each one is guarded here: the installed flwr must be a tested version,
and every attribute fedge replaces or relies on must exist *and be the one Flower
actually uses* (checked on the bytecode of the function that uses it). If a check
fails, fedge stops with a ``RunError`` that names the missing piece,
instead of Flower quietly falling back to its own behaviour while every test
still passes.

Why each internal is used (see also ``docs/flower-seam.md``):

1. ``flwr.supercore.superexec.run_superexec.get_executor`` (replaced in the warm
   executor's own process only). A SuperExec picks its executor through this
   factory, which knows only ``subprocess`` (a fresh ``flwr-clientapp``
   interpreter per message, ~2-4 s of torch import each) and ``kubernetes``.
   Flower 1.42 has public exec *plugin* classes (``flwr.supercore.superexec.
   plugin.ExecPlugin``/``BaseExecPlugin``), but ``run_superexec`` always builds
   ``AutoExecPlugin`` itself and ``flower-superexec --plugin-type`` is ignored,
   so no public path leads to a custom executor. The executor fedge hands over
   implements Flower's public ``Executor`` protocol
   (``flwr.supercore.superexec.executor.types``) and runs each task with Flower's
   own ``run_clientapp``.
2. ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``: the SuperExec's poll of the SuperNode's
   Runtime API (default 1 s). An environment variable Flower reads but does not
   document; checked by the name of the constant that holds it.
3. ``flwr.supernode.start_client_internal``'s module global ``time``: the
   SuperNode's fleet loop sleeps a hard-coded 3 s whenever the SuperLink has no
   message for it, and 0.5 s between checks for the ClientApp's reply. Every stage
   of a round (train, evaluate, each SecAgg+ stage) waits for that poll, so
   it sets the floor of a round: measured, the idle poll is the largest single
   stage of a tiny round (``benchmarks/federation_overhead.py``). fedge replaces
   the module's ``time`` by a proxy that caps these sleeps (default 1 s for a
   real site, 0.2 s on loopback). Worth it because it is one attribute of one
   module, version-checked, and the cost is bounded: an idle site then asks the
   SuperLink for work up to 1/interval times a second instead of 1/3. Not done:
   patching the SuperLink, or any sleep outside that module.

4. ``flwr.supernode.runtime.run_clientapp``'s module global ``install_from_fab``
   (replaced in the warm executor's process, inherited by its forked tasks). A
   ClientApp task unpacks the run's app package (FAB) through it before importing
   any of its code; fedge wraps it so that a site checks the FAB against the app it
   installed first (``fedge.client.app_trust``). Flower's own ``--trusted-entities``
   cannot do this for FABs submitted to an open-source SuperLink (their
   verifications are always empty), so this is the only point before the code runs.
5. The keyword defaults of ``flwr.supercore.inflatable.inflatable_utils.pull_objects``
   and ``pull_and_inflate_object_from_tree`` (in the SuperNode, the warm executor and
   its tasks, and the ServerApp process; each its own process). A message is announced
   before its objects are stored, so the SuperNode (pulling from the SuperLink), a
   ClientApp (from its SuperNode) and the ServerApp (a reply, from the SuperLink)
   often ask too early; Flower then waits 1 s, then 2 s, before asking again.
   Measured, these waits were most of a tiny round's ClientApp start and reply
   stages. fedge retries after 0.05 s, doubling up to the same cap as its polls,
   and bounds a pull by Flower's 2 h ``max_time`` instead of 500 tries. No public
   option sets them; the guard checks Flower's values and that each caller still
   pulls through these functions.

The Grid wrapper of the ServerApp (``fedge.server.app.PromptGrid``) uses only the
public ``flwr.server.Grid`` interface; ``check_grid_subclass`` makes sure it still
implements every abstract method and that Flower's workflows still reach it
through ``send_and_receive``.

Lives in ``shared/ml`` (not the torch-free core) because it imports flwr, and both
the server and the client side import it.
"""

import importlib
import logging
import os
import threading
import time
import types
from collections.abc import Callable, Iterable
from typing import Any

from fedge.shared.errors import RunError

log = logging.getLogger(__name__)

# The flwr releases these internals were read in and tested against (pyproject pins the same).
TESTED_FLWR = ("1.42.",)
_HINT = "install the Flower release fedge is tested with: pip install 'flwr[dp]>=1.42,<1.43'"

_SUPEREXEC_MODULE = "flwr.supercore.superexec.run_superexec"
_SUPERNODE_MODULE = "flwr.supernode.start_client_internal"
_POLL_ENV_CONSTANT = "_TASK_POLL_INTERVAL_ENV"
_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
# Flower's SuperNode sleeps this long when the SuperLink has nothing for it.
_SUPERNODE_IDLE_SLEEP = 3
# How long a patched SuperExec may run before it must have asked for its executor.
_EXECUTOR_DEADLINE_S = 30.0


def _fail(what: str) -> RunError:
    import flwr

    return RunError(
        f"flwr {flwr.__version__}: {what}; fedge relies on it (fedge.shared.ml.flower_compat)",
        hint=_HINT,
    )


def check_version() -> str:
    """The installed flwr version, if fedge was tested with it.

    Raises
    ------
    RunError
        flwr is of a release these internals were not read in.
    """
    import flwr

    version = str(flwr.__version__)
    if not version.startswith(TESTED_FLWR):
        raise _fail(f"untested release (tested: {', '.join(v + 'x' for v in TESTED_FLWR)})")
    return version


def _code_names(code: types.CodeType) -> set[str]:
    """Global and attribute names a function's code (and its nested functions) looks up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _code_consts(code: types.CodeType) -> list[Any]:
    consts = list(code.co_consts)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            consts += _code_consts(const)
    return consts


def _module(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise _fail(f"module {name} is gone") from e


def _require_function_using(module: types.ModuleType, function: str, names: Iterable[str]) -> Any:
    """``module.function``, checked to look up each of ``names`` when it runs."""
    func = getattr(module, function, None)
    if not callable(func) or not hasattr(func, "__code__"):
        raise _fail(f"{module.__name__}.{function} is gone")
    missing = set(names) - _code_names(func.__code__)
    if missing:
        raise _fail(f"{module.__name__}.{function} no longer uses {', '.join(sorted(missing))}")
    return func


# -- 1 + 2: the SuperExec's executor and its task poll -------------------------------------


def superexec_module() -> types.ModuleType:
    """Flower's SuperExec module, checked for what ``run_superexec_with`` replaces.

    Raises
    ------
    RunError
        ``run_superexec`` no longer picks its executor through the module-level
        ``get_executor``, or the poll-interval variable moved.
    """
    check_version()
    module = _module(_SUPEREXEC_MODULE)
    if not callable(getattr(module, "get_executor", None)):
        raise _fail(f"{_SUPEREXEC_MODULE}.get_executor is gone")
    _require_function_using(module, "run_superexec", ["get_executor"])
    if getattr(module, _POLL_ENV_CONSTANT, None) != _POLL_ENV:
        raise _fail(f"{_SUPEREXEC_MODULE} no longer reads {_POLL_ENV}")
    return module


def run_superexec_with(
    executor_factory: Callable[[], Any],
    runtime_api_address: str,
    parent_pid: int | None,
    task_poll_interval: float,
) -> None:
    """Run Flower's SuperExec loop in this process with ``executor_factory``'s executor.

    Never returns while the SuperExec runs. If Flower does not ask for the
    executor within 30 s (it asks first thing), the process stops with an error
    rather than serve tasks through an executor fedge did not install.

    Raises
    ------
    RunError
        A check of ``superexec_module`` fails.
    """
    module = superexec_module()
    installed = threading.Event()

    def factory(*_args: Any, **_kwargs: Any) -> Any:
        installed.set()
        return executor_factory()

    def watch() -> None:
        if not installed.wait(_EXECUTOR_DEADLINE_S):
            log.critical(
                "flwr's SuperExec did not use fedge's executor (%s.get_executor): stopping",
                _SUPEREXEC_MODULE,
            )
            os._exit(70)

    setattr(module, "get_executor", factory)  # noqa: B010  (the guarded replacement, see 1.)
    os.environ[_POLL_ENV] = str(task_poll_interval)
    threading.Thread(target=watch, daemon=True, name="fedge-executor-check").start()
    module.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,  # the SuperNode's Runtime API listens on 127.0.0.1 only
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def executor_api() -> types.SimpleNamespace:
    """The public executor types of Flower's SuperExec (``TaskType``, ``LaunchResult``, ...)."""
    check_version()
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor

    return types.SimpleNamespace(
        TaskType=TaskType, LaunchResult=LaunchResult, SubprocessExecutor=SubprocessExecutor
    )


def run_clientapp_task(spec: Any) -> None:
    """Run one ClientApp task with Flower's own ``run_clientapp`` (what flwr-clientapp runs)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=False,
    )


# -- 3: the SuperNode's idle poll ---------------------------------------------------------


class _CappedSleep:
    """Stands in for the ``time`` module inside one Flower module: sleeps at most ``cap`` s."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_supernode_polls(cap: float) -> None:
    """Cap the SuperNode's hard-coded idle poll (3 s) and reply poll (0.5 s) at ``cap`` s.

    Call in the SuperNode's process before it starts (``fedge.client.supernode``).

    Raises
    ------
    RunError
        The SuperNode's loop no longer sleeps 3 s through the module's ``time``.
    """
    check_version()
    if not 0.01 <= cap <= 3:
        raise ValueError(f"SuperNode poll cap {cap} s is outside 0.01..3")
    module = _module(_SUPERNODE_MODULE)
    func = _require_function_using(module, "start_client_internal", ["time", "sleep"])
    current = getattr(module, "time", None)
    if not (current is time or isinstance(current, _CappedSleep)):
        raise _fail(f"{_SUPERNODE_MODULE}.time is not the time module")
    if _SUPERNODE_IDLE_SLEEP not in _code_consts(func.__code__):
        raise _fail(f"{_SUPERNODE_MODULE}.start_client_internal no longer sleeps 3 s when idle")
    module.time = _CappedSleep(cap)  # type: ignore[attr-defined]


def run_supernode(argv: list[str]) -> None:
    """Run Flower's ``flower-supernode`` in this process with ``argv`` (its console script)."""
    import sys

    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


# -- the ServerApp's Grid -----------------------------------------------------------------

_WORKFLOW_MODULES = (
    "flwr.server.workflow.default_workflows",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)


def check_grid_subclass(cls: type) -> None:
    """``cls`` implements all of ``flwr.server.Grid`` and Flower's workflows call its poll.

    Raises
    ------
    RunError
        Grid gained an abstract method ``cls`` lacks, or Flower's workflows no
        longer wait for replies through ``Grid.send_and_receive``.
    """
    check_version()
    from flwr.server import Grid

    if not issubclass(cls, Grid):
        raise _fail(f"{cls.__name__} is not a flwr.server.Grid")
    missing = sorted(name for name in Grid.__abstractmethods__ if name not in vars(cls))
    if missing:
        raise _fail(f"flwr.server.Grid has methods {cls.__name__} lacks: {', '.join(missing)}")
    for name in _WORKFLOW_MODULES:
        module = _module(name)
        names: set[str] = set()
        for value in vars(module).values():
            for func in _functions_of(value, module.__name__):
                names |= _code_names(func.__code__)
        if "send_and_receive" not in names:
            raise _fail(f"{name} no longer waits for replies with Grid.send_and_receive")


def _functions_of(value: Any, module_name: str) -> list[Any]:
    """Functions defined in ``module_name``: ``value`` itself, or a class's methods."""
    if getattr(value, "__module__", None) != module_name:
        return []
    if isinstance(value, types.FunctionType):
        return [value]
    if isinstance(value, type):
        return [v for v in vars(value).values() if isinstance(v, types.FunctionType)]
    return []


# -- 4: the ClientApp runner's FAB install -------------------------------------------------

_CLIENTAPP_RUNNER_MODULE = "flwr.supernode.runtime.run_clientapp"


def wrap_fab_install(wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace the ClientApp runner's ``install_from_fab`` by ``wrap(original)``, once.

    Raises
    ------
    RunError
        The runner no longer installs FABs through that module global: fedge could
        not check the apps a site runs, so it refuses to go on.
    """
    check_version()
    module = _module(_CLIENTAPP_RUNNER_MODULE)
    original = getattr(module, "install_from_fab", None)
    if not callable(original):
        raise _fail(f"{_CLIENTAPP_RUNNER_MODULE}.install_from_fab is gone")
    _require_function_using(module, "run_clientapp", ["install_from_fab"])
    if not getattr(original, "fedge_wrapped", False):
        wrapped = wrap(original)
        wrapped.fedge_wrapped = True  # type: ignore[attr-defined]
        setattr(module, "install_from_fab", wrapped)  # noqa: B010  (a module global)


# -- 5: the retry backoff of object pulls --------------------------------------------------

_INFLATABLE_MODULE = "flwr.supercore.inflatable.inflatable_utils"
_PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")
# Flower's defaults of both functions (flwr.supercore.constant): 1 s, doubling up to 10 s,
# at most 500 tries per object.
_PULL_DEFAULTS = {"initial_backoff": 1, "backoff_cap": 10, "max_tries_per_object": 500}
# Who pulls what, per process (module, function that calls it, the pull function it calls).
PULL_CALLERS = {
    "supernode": (_SUPERNODE_MODULE, "_pull_and_store_message", "pull_objects"),
    "clientapp": (_CLIENTAPP_RUNNER_MODULE, "pull_task_input", "pull_and_inflate_object_from_tree"),
    "serverapp": ("flwr.superlink.grid.http_grid", "HttpGrid.pull_messages", "pull_objects"),
}
# The first retry; later ones double up to the cap.
_FIRST_RETRY_S = 0.05


def _kw_only_defaults(func: Any) -> dict[str, Any]:
    return dict(getattr(func, "__kwdefaults__", None) or {})


def shorten_object_pull_backoff(cap: float, caller: str) -> None:
    """Retry a not-yet-available object after 0.05 s, doubling up to ``cap`` (Flower: 1 s..10 s).

    A message travels as a head announcing its objects, then the objects. The party
    that pulls (``caller``: the SuperNode from the SuperLink, a ClientApp from its
    SuperNode, the ServerApp from the SuperLink) often asks before the last object is
    in, and Flower then waits a whole second before asking again, then two: measured,
    these waits were most of a tiny round's "clientapp start" and "reply" stages. The
    cap applies in this process only, to both of Flower's pull functions. The limit
    on a pull becomes its time (Flower's ``max_time``, 2 h) instead of 500 tries,
    which at a short cap would give up on a large model behind a slow link.

    Raises
    ------
    RunError
        The pull functions lost these settings, or ``caller``'s code no longer pulls
        through them.
    """
    check_version()
    if not 0.01 <= cap <= 10:
        raise ValueError(f"object pull backoff cap {cap} s is outside 0.01..10")
    module_name, function, pull_name = PULL_CALLERS[caller]
    utils = _module(_INFLATABLE_MODULE)
    caller_module = _module(module_name)
    owner: Any = caller_module
    *path, name = function.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    _require_function_using_obj(owner, module_name, name, [pull_name])
    if getattr(caller_module, pull_name, None) is not getattr(utils, pull_name, None):
        raise _fail(f"{module_name}.{pull_name} is not {_INFLATABLE_MODULE}.{pull_name}")
    for pull in _PULL_FUNCTIONS:
        func = getattr(utils, pull, None)
        defaults = _kw_only_defaults(func)
        flowers = all(defaults.get(key) == value for key, value in _PULL_DEFAULTS.items())
        if not callable(func) or not (flowers or hasattr(func, "fedge_backoff_cap")):
            raise _fail(f"{_INFLATABLE_MODULE}.{pull} no longer has Flower's retry settings")
    for pull in _PULL_FUNCTIONS:
        func = getattr(utils, pull)
        defaults = _kw_only_defaults(func)
        defaults.update(
            initial_backoff=min(_FIRST_RETRY_S, cap), backoff_cap=cap, max_tries_per_object=None
        )
        func.__kwdefaults__ = defaults
        func.fedge_backoff_cap = cap


def _require_function_using_obj(owner: Any, where: str, name: str, names: Iterable[str]) -> None:
    """``owner.name`` (a module's function or a class's method) looks up each of ``names``."""
    func = getattr(owner, name, None)
    if not callable(func) or not hasattr(func, "__code__"):
        raise _fail(f"{where}.{name} is gone")
    missing = set(names) - _code_names(func.__code__)
    if missing:
        raise _fail(f"{where}.{name} no longer uses {', '.join(sorted(missing))}")
    # Keyword names of its calls are tuples of strings among the code's constants: a caller
    # that passes its own retry settings would leave fedge's defaults unused.
    keywords = {word for c in _code_consts(func.__code__) if isinstance(c, tuple) for word in c}
    passed = keywords & {"initial_backoff", "backoff_cap"}
    if passed:
        raise _fail(f"{where}.{name} passes its own {', '.join(sorted(passed))}")
