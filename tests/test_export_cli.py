"""``fedge keys create|show``, ``fedge export`` and ``fedge validate`` through typer's CliRunner."""

import stat
from pathlib import Path

import pytest
import typer
from export_support import make_run
from typer.testing import CliRunner

from fedge.cli.export import export, keys_app, validate
from fedge.edge.export.pipeline import ArtifactsFailed
from fedge.shared import bundle, signing
from fedge.shared.errors import SecurityError

runner = CliRunner()


def make_app() -> typer.Typer:
    """The two entries as the root ``fedge`` app registers them."""
    app = typer.Typer()
    app.command()(export)
    app.command()(validate)
    app.add_typer(keys_app, name="keys")
    return app


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_keys_create_then_show_prints_the_public_key(home: Path) -> None:
    app = make_app()
    created = runner.invoke(app, ["keys", "create"])
    assert created.exit_code == 0, created.output
    private, public = home / "keys" / "signing.key", home / "keys" / "signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    fingerprint = signing.public_key_fingerprint(signing.load_public_key(public))
    assert fingerprint in created.output and "PRIVATE KEY" not in created.output
    shown = runner.invoke(app, ["keys", "show"])
    assert shown.exit_code == 0, shown.output
    assert fingerprint in shown.output and str(public) in shown.output
    assert public.read_text().strip() in shown.output


def test_keys_create_refuses_to_replace_unless_forced(home: Path) -> None:
    app = make_app()
    assert runner.invoke(app, ["keys", "create"]).exit_code == 0
    before = (home / "keys" / "signing.pub").read_bytes()
    again = runner.invoke(app, ["keys", "create"])
    assert isinstance(again.exception, SecurityError) and "already exists" in str(again.exception)
    assert (home / "keys" / "signing.pub").read_bytes() == before
    forced = runner.invoke(app, ["keys", "create", "--force"])
    assert forced.exit_code == 0 and (home / "keys" / "signing.pub").read_bytes() != before


def test_keys_show_without_a_key_says_how_to_create_one(home: Path, tmp_path: Path) -> None:
    result = runner.invoke(make_app(), ["keys", "show", "--key", str(tmp_path / "x.key")])
    assert isinstance(result.exception, SecurityError)
    assert "fedge keys create" in (result.exception.hint or "")


def test_export_without_a_key_says_to_run_keys_create(home: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", epochs=0, task="breast-cancer", model="mlp")
    result = runner.invoke(make_app(), ["export", str(run)])
    assert isinstance(result.exception, SecurityError)
    assert "fedge keys create" in (result.exception.hint or "")
    assert not (run / "bundle").exists()


@pytest.mark.slow
def test_export_writes_a_bundle_and_prints_the_table(home: Path, tmp_path: Path) -> None:
    app = make_app()
    assert runner.invoke(app, ["keys", "create"]).exit_code == 0
    run = make_run(tmp_path / "run", epochs=5, task="breast-cancer", model="mlp")
    args = ["export", str(run), "--formats", "onnx", "--quantize", "none,dynamic"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "model-int8-dynamic.onnx" in result.output and "pass" in result.output
    manifest = bundle.verify_bundle(run / "bundle", home / "keys" / "signing.pub")
    assert [a.quantization for a in manifest.artifacts] == ["none", "dynamic"]
    # A second export to the same place is refused, then allowed with --force.
    assert "already exists" in str(runner.invoke(app, args).exception)
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    failed = runner.invoke(app, [*args, "--force", "--max-accuracy-drop", "-1"])
    assert isinstance(failed.exception, ArtifactsFailed)
    assert "model-fp32.onnx" in str(failed.exception) and "FAIL" in failed.output
    bundle.verify_bundle(run / "bundle", home / "keys" / "signing.pub")  # the old one stays


@pytest.mark.slow
def test_export_no_validate_then_validate(home: Path, tmp_path: Path) -> None:
    app = make_app()
    assert runner.invoke(app, ["keys", "create"]).exit_code == 0
    run = make_run(tmp_path / "run", epochs=5, task="breast-cancer", model="mlp")
    args = ["export", str(run), "--formats", "onnx", "--quantize", "none", "--no-validate"]
    exported = runner.invoke(app, args, terminal_width=200)
    assert exported.exit_code == 0, exported.output
    assert "not validated" in exported.output and "pass" not in exported.output
    assert str(run / "export.log") in exported.output and (run / "export.log").is_file()
    public = home / "keys" / "signing.pub"
    assert not bundle.verify_bundle(run / "bundle", public).artifacts[0].passed
    validated = runner.invoke(app, ["validate", str(run / "bundle")], terminal_width=200)
    assert validated.exit_code == 0, validated.output
    assert "✓ pass" in validated.output and "%" in validated.output
    assert bundle.verify_bundle(run / "bundle", public).artifacts[0].passed
    strict = runner.invoke(app, ["validate", str(run / "bundle"), "--max-accuracy-drop", "-1"])
    assert isinstance(strict.exception, ArtifactsFailed) and "✗ FAIL" in strict.output
    assert "left as it was" in str(strict.exception)
    assert bundle.verify_bundle(run / "bundle", public).artifacts[0].passed
