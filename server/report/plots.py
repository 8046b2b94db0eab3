"""The run's plots as static SVG (matplotlib), embedded as data URIs by the report and console.

Each plot is drawn on its own ``matplotlib.figure.Figure`` (no pyplot, no global
state), so the console can draw them from several request threads. Text is
written as glyph paths and the SVG goes into an ``<img>``: a site name cannot
become markup, and an ``<img>`` never runs script.
"""

import base64
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedge.server.report.data import RunData, series, site_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Text as glyph paths (no font needed to view; no text node a name could live in), and a
# fixed hash salt so the same run gives the same SVG. Typed Any: matplotlib types rc keys
# as a Literal of every rcParam, which a plain dict literal does not infer.
_RC: Any = {"svg.fonttype": "path", "svg.hashsalt": "fedge", "font.size": 9.0}
# At most this many sites get their own bars in the per-site plot: a legend of hundreds helps
# nobody (the per-site table has them all).
MAX_SITE_LINES = 12
_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]


@dataclass(frozen=True)
class Plot:
    """One rendered plot: a short id, a title, and the SVG document."""

    key: str
    title: str
    svg: bytes

    @property
    def data_uri(self) -> str:
        """The SVG as a ``data:`` URI for an ``<img src>`` (self-contained, inert)."""
        return "data:image/svg+xml;base64," + base64.b64encode(self.svg).decode("ascii")


def _figure(title: str, ylabel: str) -> "tuple[Figure, Axes]":
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.2, 3.0), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _svg(fig: "Figure") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def _bytes_axis(ax: "Axes") -> None:
    from matplotlib.ticker import EngFormatter

    ax.yaxis.set_major_formatter(EngFormatter(unit="B"))


def _site_bars(
    key: str, title: str, by_site: dict[str, tuple[list[int], list[int]]]
) -> Plot | None:
    """Grouped bars: one group per round, one bar per site (equal sites stay visible)."""
    if not by_site:
        return None
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig, ax = _figure(title, "bytes (down + up)")
        width = 0.8 / len(by_site)
        for i, (name, (xs, ys)) in enumerate(by_site.items()):
            offset = (i - (len(by_site) - 1) / 2) * width
            ax.bar([x + offset for x in xs], ys, width, label=name)
        _bytes_axis(ax)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return Plot(key, title, _svg(fig))


def _lines(
    key: str, title: str, ylabel: str, curves: list[tuple[str, list[int], list[float]]]
) -> Plot | None:
    """A line plot of the curves that have points; None if none has any."""
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig, ax = _figure(title, ylabel)
        for i, (label, xs, ys) in enumerate(curves):
            # Equal series (bytes down and up usually are) would hide each other: vary the
            # line style and marker as well as the colour.
            style = _STYLES[i % len(_STYLES)]
            ax.plot(xs, ys, style[0], marker=style[1], label=label, alpha=0.85)
        if ylabel == "bytes":
            _bytes_axis(ax)
        if len(curves) > 1:
            ax.legend()
        return Plot(key, title, _svg(fig))


def run_plots(run: RunData) -> list[Plot]:
    """Accuracy, loss, epsilon, bytes per round and bytes per site: those with data.

    Parameters
    ----------
    run
        The run, finished or still running.

    Returns
    -------
    list[Plot]
        In a fixed order; a plot without any data point (no DP: no epsilon) is left out.
    """
    rows = run.rows
    plots = [
        _lines(
            "accuracy",
            "Accuracy per round",
            "accuracy",
            [
                ("server (held-out)", *series(rows, "server_eval", "accuracy")),
                ("federated (sites)", *series(rows, "federated_eval", "accuracy")),
            ],
        ),
        _lines(
            "loss",
            "Loss per round",
            "loss",
            [
                ("server (held-out)", *series(rows, "server_eval", "loss")),
                ("federated (sites)", *series(rows, "federated_eval", "loss")),
            ],
        ),
        _lines(
            "epsilon", "Privacy spent (ε) per round", "ε", [("ε", *series(rows, "", "epsilon"))]
        ),
        _lines(
            "bytes",
            "Bytes moved per round",
            "bytes",
            [
                ("down (to sites)", *series(rows, "", "bytes_down")),
                ("up (from sites)", *series(rows, "", "bytes_up")),
            ],
        ),
    ]
    shown = dict(list(site_bytes(rows).items())[:MAX_SITE_LINES])
    plots.append(_site_bars("site-bytes", "Bytes per site per round", shown))
    return [p for p in plots if p is not None]
