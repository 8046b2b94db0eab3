"""Render a run's progress for people: a progress bar and one table row per round.

Used by ``fedge run`` and ``fedge demo``; fed with the ServerApp's events.
"""

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedge.server.events import Event


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def _kib(value: Any) -> str:
    return f"{int(value) / 1024:.0f} KiB"


class RunProgress:
    """Context manager turning events into a live bar and a row per finished round."""

    def __init__(self, console: Console, total_rounds: int, show_epsilon: bool) -> None:
        self.console = console
        self.show_epsilon = show_epsilon
        self.rows: list[dict[str, Any]] = []
        self.progress = Progress(
            TextColumn("[bold]federated rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("rounds", total=total_rounds)

    def __enter__(self) -> "RunProgress":
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == Event.INITIAL:
            self.console.print(f"initial global model: accuracy {_pct(event.get('accuracy'))}")
        elif kind == Event.RESUME:
            self.progress.update(self.task, completed=int(event.get("round", 0)))
            self.console.print(f"resuming after round {event.get('round')}")
        elif kind == Event.ROUND:
            self.rows.append(event)
            self.progress.update(self.task, completed=int(event["round"]))
            self.console.print(self._row_text(event))
        elif kind == Event.SITE_FAILED:
            self.console.print(
                f"[yellow]round {event.get('round')}: a site failed: {event.get('reason')}"
            )
        elif kind == Event.NOT_AGGREGATED:
            why = event.get("reason") or "Flower's DP wrapper drops a round in which a site failed"
            self.console.print(
                f"[yellow]round {event.get('round')}: the global model was not updated ({why})"
            )
        elif kind == Event.BUDGET_STOP:
            self.console.print(
                f"[yellow]privacy budget: stopping before round {event.get('round')} "
                f"(epsilon would reach {float(event.get('epsilon_next', 0)):.2f}, "
                f"budget {event.get('budget')})"
            )

    def _row_text(self, row: dict[str, Any]) -> str:
        server = row.get("server_eval") or {}
        text = (
            f"round {row['round']}/{row.get('total', '?')}: "
            f"accuracy {_pct(server.get('accuracy'))}  "
            f"sites {len(row.get('clients', []))}  failed {len(row.get('failures', []))}  "
            f"down {_kib(row.get('bytes_down', 0))}  up {_kib(row.get('bytes_up', 0))}  "
            f"{float(row.get('seconds', 0)):.1f}s"
        )
        if self.show_epsilon and row.get("epsilon") is not None:
            text += f"  epsilon {float(row['epsilon']):.2f}"
        return text


def rounds_table(rows: list[dict[str, Any]], show_epsilon: bool) -> Table:
    """The per-round table printed at the end of a run."""
    table = Table(title="federated fine-tuning")
    for column in (
        "round",
        "server acc",
        "site acc",
        "sites",
        "failed",
        "bytes down",
        "bytes up",
        "time",
    ):
        table.add_column(column, justify="right")
    if show_epsilon:
        table.add_column("epsilon", justify="right")
    for row in rows:
        server = row.get("server_eval") or {}
        federated = row.get("federated_eval") or {}
        cells = [
            str(row["round"]),
            _pct(server.get("accuracy")),
            _pct(federated.get("accuracy")),
            str(len(row.get("clients", []))),
            str(len(row.get("failures", []))),
            _kib(row.get("bytes_down", 0)),
            _kib(row.get("bytes_up", 0)),
            f"{float(row.get('seconds', 0)):.1f}s",
        ]
        if show_epsilon:
            eps = row.get("epsilon")
            cells.append("-" if eps is None else f"{float(eps):.2f}")
        table.add_row(*cells)
    return table
