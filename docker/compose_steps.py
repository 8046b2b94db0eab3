"""Read docker/compose.yaml for docker/smoke.sh, so that the smoke test runs compose's own steps.

Usage: python3 docker/compose_steps.py FIELD SERVICE
  command     the service's command, shell-quoted (one line)
  script      the shell script of a `/bin/sh -euc` service (provision)
  environment KEY=VALUE lines
  volumes     NAME:PATH[:ro] lines (named volumes only)
  image       the image name
"""

import shlex
import sys
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parent / "compose.yaml"


def service(name: str) -> dict:
    """One service of compose.yaml; exits with a message when it is not there."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    if name not in services:
        sys.exit(f"compose.yaml has no service {name!r} (it has {', '.join(services)})")
    return services[name]


def main(field: str, name: str) -> None:
    spec = service(name)
    if field == "command":
        print(shlex.join(spec["command"]))
    elif field == "script":
        if spec.get("entrypoint", [])[:1] != ["/bin/sh"]:
            sys.exit(f"service {name!r} is not a shell script")
        print(spec["command"][0], end="")
    elif field == "environment":
        for key, value in spec.get("environment", {}).items():
            print(f"{key}={value}")
    elif field == "volumes":
        for volume in spec.get("volumes", []):
            print(volume)
    elif field == "image":
        print(spec["image"])
    else:
        sys.exit(f"unknown field {field!r}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
