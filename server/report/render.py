"""``fedge report``: one self-contained HTML file about a run (plots, sites, privacy, bundle).

The page needs no network to open: CSS is inline and plots are SVG data URIs.
Every value that came from elsewhere (site names, model card text, metrics) goes
through Jinja's autoescaping; nothing is marked safe except the plots' data URIs,
which this module builds itself.
"""

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedge.server.report.data import MAX_JSON_BYTES, RunData, load_run, number
from fedge.server.report.plots import Plot, run_plots
from fedge.shared.atomic import atomic_write_text
from fedge.shared.errors import ConfigError

MODEL_CARD = "model_card.json"
# Model-card sections shown on their own (the validation table) or not worth a row.
_CARD_SKIP = ("validation",)
MAX_CARD_ROWS = 400


@dataclass(frozen=True)
class BundleInfo:
    """What the report shows of the run's exported bundle."""

    path: Path
    card_rows: list[tuple[str, str]]
    validation: list[dict[str, Any]]


def template_env() -> Any:
    """The Jinja environment of the report templates (autoescaping on for everything)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fedge.server.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = format_number
    env.filters["bytes"] = format_bytes
    return env


def format_number(value: Any, digits: int = 4) -> str:
    """A metric for a table cell: finite numbers rounded, anything else as text or '-'."""
    if value is None:
        return "-"
    n = number(value)
    if n is None:
        return str(value)
    if n == int(n) and abs(n) < 1e15:
        return str(int(n))
    return f"{n:.{digits}g}"


def format_bytes(value: Any) -> str:
    """Bytes in KiB/MiB/GiB for humans."""
    n = number(value)
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A nested JSON value as (dotted key, text) rows, in key order."""
    if isinstance(value, dict):
        out: list[tuple[str, str]] = []
        for key in sorted(value, key=str):
            out += flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return [(prefix, ", ".join(format_number(v) for v in value))]
    if isinstance(value, list):
        out = []
        for i, item in enumerate(value):
            out += flatten(item, f"{prefix}[{i}]")
        return out
    return [(prefix, format_number(value))]


def find_bundle(run_dir: Path) -> Path | None:
    """The bundle exported from this run, where fedge puts it by default, if there is one."""
    for candidate in (run_dir / "bundle", run_dir.parent / "bundle"):
        if (candidate / MODEL_CARD).is_file():
            return candidate
    return None


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_JSON_BYTES} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e


def load_bundle(bundle: Path) -> BundleInfo:
    """The model card and validation table of an exported bundle directory.

    Raises
    ------
    ConfigError
        If the directory has no readable ``model_card.json``.
    """
    card_path = bundle / MODEL_CARD
    if not card_path.is_file():
        raise ConfigError(f"{bundle} is not a bundle directory (no {MODEL_CARD})")
    card = _read_json(card_path)
    if not isinstance(card, dict):
        raise ConfigError(f"{card_path} is not a JSON object")
    validation: Any = card.get("validation")
    beside = bundle.parent / f"{bundle.name}.validation.json"
    if beside.is_file():  # written even when artifacts failed; the card lists only the bundle
        rows = _read_json(beside)
        validation = rows.get("rows") if isinstance(rows, dict) else validation
    validation = (
        [r for r in validation if isinstance(r, dict)] if isinstance(validation, list) else []
    )
    rows = flatten({k: v for k, v in card.items() if k not in _CARD_SKIP})[:MAX_CARD_ROWS]
    return BundleInfo(bundle, rows, validation)


def run_context(run: RunData, plots: list[Plot]) -> dict[str, Any]:
    """What the run templates need (shared by the report and the console's run page)."""
    return {
        "run": run,
        "plots": plots,
        "privacy_rows": flatten(run.privacy),
        "summary_rows": flatten(
            {k: v for k, v in run.summary.items() if k not in ("privacy", "sites")}
        ),
    }


def render_report(run_dir: Path | str, bundle: Path | None = None) -> str:
    """The report of ``run_dir`` as one HTML document.

    Parameters
    ----------
    run_dir
        The run directory.
    bundle
        The bundle exported from the run; default: ``RUN_DIR/bundle`` or a ``bundle``
        beside the run directory (the demo's layout), if one exists.
    """
    run = load_run(run_dir)
    bundle = bundle if bundle is not None else find_bundle(run.run_dir)
    info = load_bundle(bundle) if bundle is not None else None
    return (
        template_env()
        .get_template("report.html.j2")
        .render(
            **run_context(run, run_plots(run)),
            bundle=info,
            generated=datetime.now(UTC).isoformat(timespec="seconds"),
        )
    )


def write_report(run_dir: Path | str, out: Path | None = None, bundle: Path | None = None) -> Path:
    """Write the report (default ``RUN_DIR/report.html``) atomically; returns its path."""
    out = out if out is not None else Path(run_dir) / "report.html"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as report.html")
    html = render_report(run_dir, bundle)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, html)
    except OSError as e:
        raise ConfigError(f"cannot write the report to {out}: {e.strerror or e}") from e
    return out.resolve()
