"""``fedge report``: one self-contained, escaped HTML file with the run's plots and tables."""

import base64
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fedge.server.report.data import load_run
from fedge.server.report.plots import run_plots
from fedge.server.report.render import render_report, write_report
from fedge.shared.errors import ConfigError
from tests.report_support import write_bundle, write_run

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _images(html: str) -> dict[str, bytes]:
    """The report's <img> plots by id, decoded from their data URIs."""
    found = re.findall(
        r'<img id="plot-([a-z-]+)" alt="[^"]*" src="data:image/svg\+xml;base64,'
        r'([A-Za-z0-9+/=]+)">',
        html,
    )
    return {key: base64.b64decode(data) for key, data in found}


def test_report_has_every_plot_and_table(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", ["site-a", "site-b"], rounds=3)
    write_bundle(tmp_path / "bundle", "cnn")
    out = write_report(run, tmp_path / "r.html")
    html = out.read_text()
    images = _images(html)
    assert set(images) == {"accuracy", "loss", "epsilon", "bytes", "site-bytes"}
    for svg in images.values():
        assert ET.fromstring(svg).tag.endswith("svg")  # a whole, parseable SVG document
    # The per-site table: each site's bytes over 3 rounds (1000+2000+3000 down).
    assert re.search(
        r"<td>site-a</td><td class=\"n\">3</td><td class=\"n\">300</td>\s*"
        r"<td class=\"n\">5.9 KiB</td>",
        html,
    )
    assert 'id="privacy"' in html and "dp.epsilon" in html
    # The validation table comes from bundle.validation.json (it lists the failed artifact).
    assert "model-int8.tflite" in html and 'id="model-card"' in html
    assert "finished" in html and "round 3 of 3" in html


def test_report_needs_no_network(tmp_path: Path) -> None:
    html = write_report(write_run(tmp_path / "run", ["s"]), tmp_path / "r.html").read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<link" not in html and "<script" not in html


def test_report_escapes_site_names_and_card_text(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [EVIL, "ok"], rounds=2)
    write_bundle(tmp_path / "bundle", EVIL)
    html = render_report(run)
    assert "<script" not in html and "<img src=x" not in html
    assert "&lt;script&gt;" in html


def test_report_without_dp_or_bundle_leaves_them_out(tmp_path: Path) -> None:
    html = render_report(write_run(tmp_path / "run", ["s"], dp=False))
    assert "epsilon" not in _images(html)
    assert "No bundle found" in html


def test_running_run_shows_progress(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "run", ["s"], rounds=1, finished=False, configured=5))
    assert run.state == "running" and run.rounds_done == 1 and run.rounds_configured == 5
    assert [p.key for p in run_plots(run)][:2] == ["accuracy", "loss"]


def test_hostile_metrics_do_not_break_the_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("[1, 2]")  # not an object
    (run / "metrics.jsonl").write_text(
        '{"round": 1, "clients": "nope", "server_eval": {"accuracy": "NaN"}, "epsilon": 1e999}\n'
        '{"round": -3}\n{"round": 2, "clients": [{"site": 5, "bytes-down": -7}]}\n{"trunc'
    )
    data = load_run(run)
    assert [r["round"] for r in data.rows] == [1, 2]
    assert data.sites[0].site == "5" and data.sites[0].bytes_down == 0
    assert "<html" in render_report(run)


def test_not_a_run_dir_and_bad_out_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        load_run(tmp_path)
    run = write_run(tmp_path / "run", ["s"])
    with pytest.raises(ConfigError, match="is a directory"):
        write_report(run, tmp_path)
    with pytest.raises(ConfigError, match="not a bundle directory"):
        write_report(run, tmp_path / "r.html", bundle=tmp_path)


def test_cli_writes_the_report_and_fails_in_one_line(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", ["s"])
    ok = subprocess.run(
        [sys.executable, "-m", "fedge", "report", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"report: {(run / 'report.html').resolve().as_uri()}"
    bad = subprocess.run(
        [sys.executable, "-m", "fedge", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error:") and "not a run directory" in bad.stderr


def test_fedge_run_prints_the_report_and_lists_the_run_in_the_console(tmp_path: Path) -> None:
    import io
    import json

    from rich.console import Console

    from fedge.cli.run import _print_report, _remember
    from fedge.server.console.runs import indexed_runs
    from fedge.shared.paths import server_data_dir

    out = io.StringIO()
    run = write_run(tmp_path / "run", ["s"])
    _print_report(Console(file=out, width=400), run)
    assert f"report: {(run / 'report.html').resolve().as_uri()}" in out.getvalue()
    _print_report(Console(file=out, width=400), tmp_path / "elsewhere")
    assert "run `fedge report" in out.getvalue()
    _remember(run)  # no server started on this machine: nothing recorded
    assert indexed_runs(server_data_dir()) == []
    server_data_dir().mkdir(parents=True)
    (server_data_dir() / "server.json").write_text(json.dumps({"address": "127.0.0.1:1"}))
    _remember(run)
    assert [r.run_dir for r in indexed_runs(server_data_dir())] == [run.resolve()]
