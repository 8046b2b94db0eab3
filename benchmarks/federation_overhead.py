"""How much slower is a federated round than the same training in one process, and where does
the time go?

Runs, in one go and side by side:

- ``local``: the two sites' local epoch done one after the other in this process;
- ``flower-default``: 2 SuperNodes on loopback as Flower runs them: a fresh
  ``flwr-clientapp`` process (new interpreter, torch imported) per message and
  the SuperNode's hard-coded 3 s idle poll;
- ``fedge-warm-3s-poll``: fedge's forking SuperExec (``fedge.client.warm_executor``,
  data cached per process) with Flower's 3 s idle poll;
- ``fedge-warm-all-cores``: as ``fedge-warm`` below, but every site's torch uses all
  cores (torch's default), as before ``LocalFederation`` split them between the sites;
- ``fedge-warm``: the warm executor with the SuperNode's idle poll capped at 0.2 s
  (``fedge.shared.ml.flower_compat.shorten_supernode_polls``) and the cores split between
  the sites, what the demo and tests run.

Every setting runs on ``LocalFederation`` with fedge's SuperNode process and ServerApp, so
all of them have fedge's short object-pull retries (``shorten_object_pull_backoff``) and
the ServerApp's 0.2 s reply poll; ``flower-default`` differs from plain Flower there.

Prints each round's median wall time and its ratio to ``local``, then for each
fedge setting a per-stage breakdown of a round (push, push + SuperNode pickup,
ClientApp start, data loading, training, reply, aggregation), put together from the
ServerApp's ``exchange`` events (run log), the sites' SuperNode logs and the
run's metrics. Ratios, not absolute times: these machines are shared.

    python benchmarks/federation_overhead.py [--rounds 3]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedge.demo.loopback import LocalFederation, threads_per_site
from fedge.shared.atomic import read_jsonl
from fedge.shared.config import RunConfig
from fedge.shared.processes import ProcessGroup
from fedge.shared.records import EVENT_PREFIX

SITES = ["digits#0/2", "digits#1/2"]
# "push" and "push+pickup" overlap: a SuperNode may receive its message before the ServerApp has
# pushed every site's, so pickup is counted from the start of the push.
STAGES = ["push", "push+pickup", "clientapp start", "data", "training", "reply", "aggregation"]
_LINE = re.compile(r"^(\d+\.\d+) .*fedge: (.*)$")
_SECONDS = re.compile(r" in (\d+\.\d+)s$")


@dataclass(frozen=True)
class Setting:
    name: str
    warm: bool
    idle_poll: float
    threads: int = 0  # torch threads per site; 0: the cores split between the sites


SETTINGS = [
    Setting("flower-default", warm=False, idle_poll=3.0),
    Setting("fedge-warm-3s-poll", warm=True, idle_poll=3.0),
    # Every site with torch's default of one thread per core, as before fedge split them.
    Setting("fedge-warm-all-cores", warm=True, idle_poll=0.2, threads=threads_per_site(1)),
    Setting("fedge-warm", warm=True, idle_poll=0.2),
]


def local_round_seconds(cfg: RunConfig, repeats: int) -> float:
    """The sites' local training, done in this process one after the other."""
    from fedge.client.site import Site

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i, spec in enumerate(SITES):
            site = Site(cfg, {"data": spec, "site": f"s{i}"})
            site.fit(site.get_parameters(), {})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_federation(cfg: RunConfig, work: Path, setting: Setting) -> Path:
    """Run ``cfg`` on a fresh loopback federation; return its work directory."""
    with ProcessGroup() as group:
        federation = LocalFederation(
            work,
            SITES,
            group,
            secure=False,
            warm=setting.warm,
            idle_poll=setting.idle_poll,
            threads=setting.threads,
        ).start()
        federation.submit(cfg.replace(run_dir=str(work / "run")))
    return work


def round_seconds(work: Path) -> list[float]:
    """Each round's wall time on the server (sampling to aggregate)."""
    return [float(r["seconds"]) for r in read_jsonl(work / "run" / "metrics.jsonl")]


def _site_timeline(log: Path) -> tuple[str, list[dict[str, float]]]:
    """A site's node id and, per train message, when each stage ended (Unix times)."""
    node = ""
    messages: list[dict[str, float]] = []
    for line in log.read_text(errors="replace").splitlines():
        if "SuperNode ID:" in line:
            node = line.rsplit(":", 1)[1].strip()
        found = _LINE.match(line)
        if not found:
            continue
        at, text = float(found.group(1)), found.group(2)
        if text.startswith("supernode message in: train"):
            messages.append({"received": at})
        elif messages and (took := _SECONDS.search(text)):
            seconds = float(took.group(1))
            if re.search(r": data (loaded|cached) in ", text):
                messages[-1].update(data_started=at - seconds, data=seconds)
            elif ": trained round " in text:
                messages[-1].update(trained=at, training=seconds)
    return node, messages


def breakdown(work: Path) -> dict[str, float]:
    """Mean seconds per stage over rounds 2.. (round 1 also loads data and warms caches)."""
    exchanges = []
    for line in (work / "run" / "run.log").read_text(errors="replace").splitlines():
        if EVENT_PREFIX in line:
            event = json.loads(line[line.index(EVENT_PREFIX) + len(EVENT_PREFIX) :])
            if event.get("event") == "exchange" and event.get("type") == "train":
                exchanges.append(event)
    sites = [_site_timeline(log) for log in sorted((work / "logs").glob("supernode-*.log"))]
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for k, exchange in enumerate(exchanges):
        if k == 0 and len(exchanges) > 1:
            continue
        samples["push"].append(exchange["pushed"] - exchange["started"])
        replies = {str(n): float(t) for n, t in exchange["replies"].items()}
        if k + 1 < len(exchanges) and replies:
            samples["aggregation"].append(exchanges[k + 1]["started"] - max(replies.values()))
        for node, messages in sites:
            if k >= len(messages) or "trained" not in messages[k]:
                continue
            m = messages[k]
            samples["push+pickup"].append(m["received"] - exchange["started"])
            samples["clientapp start"].append(m["data_started"] - m["received"])
            samples["data"].append(m["data"])
            samples["training"].append(m["training"])
            if node in replies:
                samples["reply"].append(replies[node] - m["trained"])
    return {s: statistics.mean(v) for s, v in samples.items() if v}


def import_seconds() -> float:
    """What a fresh ClientApp process pays before it can train: interpreter + imports."""
    code = "import fedge.client.app, fedge.client.site"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="Keep the federations' logs in this folder.")
    args = parser.parse_args()
    cfg = RunConfig(num_rounds=args.rounds, min_clients=2, federated_eval=False, server_eval=False)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        root = args.keep or Path(tmp)
        local = local_round_seconds(cfg, repeats=3)
        rounds: dict[str, float] = {}
        stages: dict[str, dict[str, float]] = {}
        for setting in SETTINGS:
            work = run_federation(cfg, root / setting.name, setting)
            times = round_seconds(work)
            rounds[setting.name] = statistics.median(times[1:] or times)
            if setting.warm:
                stages[setting.name] = breakdown(work)
        local = min(local, local_round_seconds(cfg, repeats=3))  # shared machine: less disturbed
    fresh = import_seconds()
    load_after = os.getloadavg()
    print(
        f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after {', '.join(f'{x:.2f}' for x in load_after)}; cores {threads_per_site(1)}"
    )
    print(f"{'setting':<22}{'round (s)':>10}{'vs local':>10}")
    print(f"{'local':<22}{local:>10.2f}{1.0:>10.2f}")
    for name, seconds in rounds.items():
        print(f"{name:<22}{seconds:>10.2f}{seconds / local:>10.2f}")
    print(
        f"fresh ClientApp start-up (interpreter + torch + fedge): {fresh:.2f}s "
        f"= {fresh / local:.2f}x the local round"
    )
    speed_up = rounds["flower-default"] / rounds["fedge-warm"]
    print(f"fedge-warm speed-up over Flower's default: {speed_up:.2f}x")
    print("\nper-stage breakdown of a round, mean seconds over rounds 2.. and sites:")
    names = list(stages)
    print(f"{'stage':<18}" + "".join(f"{n:>22}" for n in names))
    for stage in STAGES:
        cells = [stages[n].get(stage) for n in names]
        print(
            f"{stage:<18}"
            + "".join(f"{c:>22.2f}" if c is not None else f"{'-':>22}" for c in cells)
        )


if __name__ == "__main__":
    main()
