"""How much slower is a federated round than the same training in one process?

Runs, in one go and side by side:

- ``local``: the two sites' local epoch done one after the other in this process;
- ``flower-default``: 2 SuperNodes on loopback with Flower's default isolation, a
  fresh ``flwr-clientapp`` process (new interpreter, torch imported) per message;
- ``fedge-warm``: the same with fedge's forking SuperExec (``--isolation process``
  + ``fedge.client.warm_executor``), which imports torch once per site.

Prints each round's median wall time and its ratio to ``local``, plus where a
fresh ClientApp's time goes (interpreter + imports). Ratios, not absolute times:
these machines are shared.

    python benchmarks/federation_overhead.py [--rounds 3]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedge.demo.loopback import LocalFederation
from fedge.shared.atomic import read_jsonl
from fedge.shared.config import RunConfig
from fedge.shared.processes import ProcessGroup

SITES = ["digits#0/2", "digits#1/2"]


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


def federated_round_seconds(cfg: RunConfig, work: Path, warm: bool) -> float:
    """Median wall time of a round (server side: sampling to aggregate), rounds 2.. only."""
    with ProcessGroup() as group:
        federation = LocalFederation(work, SITES, group, secure=False, warm=warm).start()
        federation.submit(cfg.replace(run_dir=str(work / "run")))
    rows = read_jsonl(work / "run" / "metrics.jsonl")
    return statistics.median(float(r["seconds"]) for r in rows[1:] or rows)


def import_seconds() -> float:
    """What a fresh ClientApp process pays before it can train: interpreter + imports."""
    code = "import fedge.client.app, fedge.client.site"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = RunConfig(num_rounds=args.rounds, min_clients=2, federated_eval=False, server_eval=False)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        root = Path(tmp)
        local = local_round_seconds(cfg, repeats=3)
        default = federated_round_seconds(cfg, root / "default", warm=False)
        warm = federated_round_seconds(cfg, root / "warm", warm=True)
        local_again = local_round_seconds(cfg, repeats=3)
    local = min(local, local_again)  # the machine is shared: take the less disturbed one
    fresh = import_seconds()
    print(f"{'setting':<16}{'round (s)':>10}{'vs local':>10}")
    print(f"{'local':<16}{local:>10.2f}{1.0:>10.2f}")
    print(f"{'flower-default':<16}{default:>10.2f}{default / local:>10.2f}")
    print(f"{'fedge-warm':<16}{warm:>10.2f}{warm / local:>10.2f}")
    print(
        f"fresh ClientApp start-up (interpreter + torch + fedge): {fresh:.2f}s "
        f"= {fresh / local:.2f}x the local round"
    )
    print(f"warm executor speed-up over Flower's default: {default / warm:.2f}x")


if __name__ == "__main__":
    main()
