"""Federated vs centralised vs each site alone, on Flower's simulation engine, in one run.

For every Dirichlet alpha, strategy and fine-tuning mode, from one backbone pretrained here
on digits' public split, this runs fedge's own ServerApp (``run_federation``) and ClientApp
(``SiteClient``) on Flower's simulation engine (``flwr.simulation.run_simulation``, Ray, no
network) with ``--sites`` simulated sites holding fedge's Dirichlet partitions of the train
pool, then trains the baselines of ``fedge.demo.baselines`` with the same recipe and epoch
budget (rounds x local epochs): one model on the pooled data (centralised) and one per site
on its data alone (local-only). All are scored on the held-out test split.

Prints, per setting, the accuracies, federated / centralised and federated / mean
local-only, the bytes one site sends per round, seconds per round and the peak memory of
the whole process tree (this process, Ray and its workers).

``--seeds 0 1 2`` repeats every setting once per seed and then prints the mean and the
range (min-max) over seeds. A seed fixes the backbone's pretraining (its initial weights
and batch order), the Dirichlet split of the sites (partition seed 42 + seed), each site's
local train/eval split and batch order (the run's ``seed``), the server's initial model
(LoRA adapters) and the sampling of sites; seed 0 is the benchmark's single run of before.

    python benchmarks/federated_vs_central.py                      # 10 sites, the full grid
    python benchmarks/federated_vs_central.py --alphas 0.5 --strategies fedavgm --modes head \\
        --batch-size 8 --server-momentum 0.95 --seeds 0 1 2
    python benchmarks/federated_vs_central.py --alphas 0.5 --strategies fedavg --modes lora
    python benchmarks/federated_vs_central.py --sites 1000 --sampled 10 --rounds 2  # scale
    python benchmarks/federated_vs_central.py --alphas 0.5 --model mobilenet_v3_small \\
        --pretrain-epochs 40 --strategies fedavg --rounds 5

A torchvision backbone needs the longer pretraining: its BatchNorm momentum is 0.01, so 3
epochs on the 269 public examples leave its running statistics, and its accuracy, at chance.

With ``--sites`` above 100 the 1,169 training examples of digits cannot give every site
its own partition: site ``i`` then holds partition ``i % 100`` of 100 (the scale run
measures the engine, memory and time per round, not accuracy), and no baselines are trained.
"""

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fedge.demo.baselines import Baselines, centralized_vs_local
from fedge.shared import records
from fedge.shared.atomic import read_jsonl
from fedge.shared.config import BATCHNORM_STATS, RunConfig
from fedge.shared.ml.partition import PARTITION_SEED

MAX_PARTITIONS = 100  # digits' train pool has 1,169 examples: ~12 per partition at most


@dataclass(frozen=True)
class SimResult:
    """What one simulated federation gave."""

    accuracy: float
    seconds_per_round: float
    bytes_up_per_site: float
    peak_rss: int
    failures: int


class PeakMemory:
    """Peak resident memory of this process and all its descendants, sampled every 0.2 s.

    Ray's workers share its object store: their RSS counts those pages more than once, so
    the figure is an upper bound.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # a worker that just ended
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def pretrain_backbone(model: str, epochs: int, out: Path, seed: int = 0) -> float:
    """Train ``model`` centrally on digits' public split (the 'pretrained backbone')."""
    import torch

    from fedge.shared.ml.checkpoint import save_checkpoint
    from fedge.shared.ml.data import load_data, task_for_run
    from fedge.shared.ml.device import select_device
    from fedge.shared.ml.models import build_run_model
    from fedge.shared.ml.training import evaluate, make_loader, train
    from fedge.shared.preprocess import prepare

    torch.manual_seed(seed)
    cfg = RunConfig(task="digits", model=model)
    task = task_for_run(cfg)
    net = build_run_model(cfg, task)
    public, test = load_data("digits:public", task), load_data("digits:test", task)
    device = select_device()
    loader = make_loader(
        prepare(public.x, task.preprocessing), public.y, 32, shuffle=True, seed=seed
    )
    train(net, loader, epochs, lr=0.05, device=device)
    test_loader = make_loader(prepare(test.x, task.preprocessing), test.y, 256, shuffle=False)
    save_checkpoint(out, net.state_dict(), 0, model, task, cfg.to_flower())
    return evaluate(net, test_loader, device).accuracy


def site_spec(partition: int, sites: int, alpha: float, seed: int = 0) -> str:
    """The data simulated site ``partition`` holds (shared partitions past 100 sites)."""
    parts = min(sites, MAX_PARTITIONS)
    return f"digits#{partition % parts}/{parts}?alpha={alpha:g}&seed={PARTITION_SEED + seed}"


def simulate(runs: list[tuple[RunConfig, float]], sites: int, work: Path) -> list[SimResult]:
    """Each (config, alpha) as one federation of ``sites`` simulated sites, in order.

    All federations run inside one ``run_simulation``: fedge's ``run_federation`` is called
    once per config by the ServerApp, so Ray and its workers (each importing torch) start
    once instead of once per setting. The ClientApp learns the current config from a file
    the ServerApp writes before each federation starts (the simulation engine gives a
    ClientApp no run config of its own, and Flower forbids editing the Context's).
    """
    from flwr.client import ClientApp
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    from fedge.client import app as client_module
    from fedge.server.app import run_federation
    from fedge.shared.atomic import atomic_write_json

    current = work / "current-run.json"

    def client_fn(context: Any) -> Any:
        now = json.loads(current.read_text(encoding="utf-8"))
        node = dict(context.node_config)
        partition = int(node["partition-id"])
        node[records.NODE_DATA] = site_spec(
            partition, sites, float(now["alpha"]), int(now["config"]["seed"])
        )
        node[records.NODE_SITE] = f"site-{partition + 1}"
        view = SimpleNamespace(run_config=now["config"], node_config=node, run_id=context.run_id)
        return client_module.SiteClient(view).to_client()

    server = ServerApp()
    results: list[SimResult] = []
    memory = PeakMemory()

    @server.main()
    def _main(grid: Any, context: Any) -> None:
        import numpy as np
        import torch

        for cfg, alpha in runs:
            flat = cfg.to_flower()
            atomic_write_json(current, {"config": flat, "alpha": alpha})
            context.run_config = dict(flat)
            memory.peak = 0
            # The server's initial model (LoRA adapters) and Flower's sampling of sites
            # (``random.sample``) follow the seed.
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            summary = run_federation(grid, context)
            results.append(_sim_result(cfg, summary, memory.peak))
            print(
                f"  seed {cfg.seed} {cfg.strategy}/{cfg.mode} bn {cfg.batchnorm_stats} "
                f"alpha {alpha:g}: {summary['final_accuracy']:.3f}",
                flush=True,
            )

    with memory:
        run_simulation(
            server_app=server,
            client_app=ClientApp(client_fn=client_fn),
            num_supernodes=sites,
            backend_config={"client_resources": {"num_cpus": 1}},
        )
    if len(results) != len(runs):
        raise RuntimeError(f"the simulation finished {len(results)} of {len(runs)} federations")
    return results


def _sim_result(cfg: RunConfig, summary: dict[str, Any], peak: int) -> SimResult:
    """Accuracy, median seconds per round and bytes per site update, from the run's files."""
    rows = read_jsonl(Path(cfg.run_dir) / "metrics.jsonl")
    updates = sum(len(r.get("clients", [])) for r in rows) or 1
    return SimResult(
        accuracy=float(summary["final_accuracy"]),
        seconds_per_round=statistics.median(float(r["seconds"]) for r in rows),
        bytes_up_per_site=sum(int(r.get("bytes_up", 0)) for r in rows) / updates,
        peak_rss=peak,
        failures=int(summary.get("failures", 0)),
    )


def run_config(
    args: argparse.Namespace,
    weights: Path,
    strategy: str,
    mode: str,
    seed: int = 0,
    batchnorm_stats: str = "auto",
) -> RunConfig:
    sampled = min(args.sampled or args.sites, args.sites)
    return RunConfig(
        task="digits",
        model=args.model,
        init_weights=str(weights),
        mode=mode,
        strategy=strategy,
        num_rounds=args.rounds,
        local_epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        momentum=args.momentum,
        proximal_mu=args.proximal_mu,
        server_lr=args.server_lr,
        server_momentum=args.server_momentum,
        server_momentum_lr=args.server_momentum_lr,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha or 2 * args.lora_rank,
        batchnorm_stats=batchnorm_stats,
        seed=seed,
        min_clients=sampled,
        fraction_train=sampled / args.sites,
        federated_eval=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--sampled", type=int, default=0, help="Sites per round (0: all).")
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5])
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox", "fedadam"])
    parser.add_argument("--modes", nargs="+", default=["full", "head", "lora"])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    # 0.05 made the pooled LoRA baseline diverge (12 % after 2 epochs); 0.02 trains every mode.
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=32, help="Sites and baselines alike.")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx's mu.")
    parser.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's eta.")
    parser.add_argument("--server-momentum", type=float, default=0.9, help="FedAvgM's.")
    parser.add_argument(
        "--server-momentum-lr", type=float, default=1.0, help="FedAvgM's server lr."
    )
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--lora-alpha", type=int, default=0, help="0: twice the rank.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="One run per seed.")
    parser.add_argument(
        "--batchnorm-stats",
        nargs="+",
        default=["auto"],
        choices=BATCHNORM_STATS,
        help="fedge's batchnorm-stats (default auto), sites and baselines alike.",
    )
    parser.add_argument(
        "--no-local",
        action="store_true",
        help="Skip the local-only baselines (one model per site): centralised only.",
    )
    parser.add_argument("--json", type=Path, help="Also write the rows to this file.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads here (baselines, server evaluation); Ray's workers use one each.",
    )
    args = parser.parse_args()
    import torch

    # A tiny model on a shared machine: two OpenMP threads spinning against other processes
    # made the baselines 8x slower than one (fedge.demo.baselines).
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    scale = args.sites > MAX_PARTITIONS
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedge-fvc-") as tmp:
        work = Path(tmp)
        settings: list[tuple[int, float, str, str, str]] = []
        runs: list[tuple[RunConfig, float]] = []
        baselines: dict[tuple[int, float, str, str], Baselines] = {}
        pretrained: dict[int, float] = {}
        for seed in args.seeds:
            weights = work / f"pretrained-{seed}.safetensors"
            pretrained[seed] = pretrain_backbone(args.model, args.pretrain_epochs, weights, seed)
            print(
                f"seed {seed}: pretrained {args.model} on the public split: "
                f"{100 * pretrained[seed]:.1f}% test accuracy",
                flush=True,
            )
            for alpha in args.alphas:
                sites = {
                    f"site-{i + 1}": site_spec(i, args.sites, alpha, seed)
                    for i in range(args.sites)
                }
                for mode in args.modes:
                    for bn in args.batchnorm_stats:
                        if not scale:  # the same for every strategy: one recipe, one budget
                            base = run_config(args, weights, "fedavg", mode, seed, bn)
                            baselines[seed, alpha, mode, bn] = centralized_vs_local(
                                base, sites, local=not args.no_local
                            )
                        for strategy in args.strategies:
                            name = f"s{seed}-a{alpha:g}-{strategy}-{mode}-{bn}"
                            cfg = run_config(args, weights, strategy, mode, seed, bn)
                            settings.append((seed, alpha, strategy, mode, bn))
                            runs.append((cfg.replace(run_dir=str(work / name)), alpha))
        started = time.perf_counter()
        sims = simulate(runs, args.sites, work)
        print(f"{len(runs)} federations in {time.perf_counter() - started:.0f}s")
        for (seed, alpha, strategy, mode, bn), sim in zip(settings, sims, strict=True):
            row = _row(alpha, strategy, mode, sim, baselines.get((seed, alpha, mode, bn)))
            rows.append({"seed": seed, "batchnorm_stats": bn, **row})
    _print_table(rows, args)
    summary = _over_seeds(rows)
    if len(args.seeds) > 1:
        _print_summary(summary, args.seeds)
    if args.json:
        out = {"pretrained": pretrained, "rows": rows, "over_seeds": summary}
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")


def _row(
    alpha: float,
    strategy: str,
    mode: str,
    sim: SimResult,
    baselines: Baselines | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "alpha": alpha,
        "strategy": strategy,
        "mode": mode,
        "federated": sim.accuracy,
        "bytes_up_per_site_round": sim.bytes_up_per_site,
        "seconds_per_round": sim.seconds_per_round,
        "peak_rss_gb": sim.peak_rss / 2**30,
        "failures": sim.failures,
    }
    if baselines is not None:
        row.update(
            centralized=baselines.centralized,
            fed_vs_central=sim.accuracy / baselines.centralized,
        )
        if baselines.local_only:
            row.update(
                mean_local=baselines.mean_local,
                best_local=baselines.best_local,
                fed_vs_mean_local=sim.accuracy / baselines.mean_local,
            )
    return row


SPREAD_KEYS = ("federated", "centralized", "fed_vs_central", "mean_local", "fed_vs_mean_local")


def _over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting: mean, min and max over seeds of each accuracy and ratio."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["alpha"], r["strategy"], r["mode"], r["batchnorm_stats"])
        groups.setdefault(key, []).append(r)
    out = []
    for (alpha, strategy, mode, bn), members in groups.items():
        entry: dict[str, Any] = {
            "alpha": alpha,
            "strategy": strategy,
            "mode": mode,
            "batchnorm_stats": bn,
            "seeds": [r["seed"] for r in members],
        }
        for key in SPREAD_KEYS:
            values = [float(r[key]) for r in members if key in r]
            if values:
                entry[key] = {
                    "mean": statistics.fmean(values),
                    "min": min(values),
                    "max": max(values),
                }
        out.append(entry)
    return out


def _print_summary(summary: list[dict[str, Any]], seeds: list[int]) -> None:
    print(f"\nover seeds {' '.join(str(s) for s in seeds)}: mean [min-max]")
    print(
        f"{'alpha':>5} {'strategy':<8} {'mode':<5} {'bn':<6} {'fed %':>18} {'central %':>18} "
        f"{'fed/central':>21}"
    )

    def spread(stat: dict[str, float] | None, scale: float, digits: int) -> str:
        if stat is None:
            return "-"
        return (
            f"{scale * stat['mean']:.{digits}f} [{scale * stat['min']:.{digits}f}-"
            f"{scale * stat['max']:.{digits}f}]"
        )

    for e in summary:
        print(
            f"{e['alpha']:>5g} {e['strategy']:<8} {e['mode']:<5} {e['batchnorm_stats']:<6} "
            f"{spread(e.get('federated'), 100, 1):>18} {spread(e.get('centralized'), 100, 1):>18} "
            f"{spread(e.get('fed_vs_central'), 1, 3):>21}"
        )


def _print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    sampled = min(args.sampled or args.sites, args.sites)
    print(
        f"\n{args.sites} sites ({sampled} per round), {args.rounds} rounds x "
        f"{args.local_epochs} local epoch(s), model {args.model}, lora rank {args.lora_rank}, "
        f"lr {args.lr:g}, batch {args.batch_size}, momentum {args.momentum:g}, "
        f"lora alpha {args.lora_alpha or 2 * args.lora_rank}, "
        f"fedprox mu {args.proximal_mu:g}, fedadam eta {args.server_lr:g}, "
        f"fedavgm momentum {args.server_momentum:g} lr {args.server_momentum_lr:g}"
    )
    head = (
        f"{'seed':>4} {'bn':<6} "
        f"{'alpha':>5} {'strategy':<8} {'mode':<5} {'fed':>6} {'central':>7} {'local':>6} "
        f"{'fed/central':>11} {'fed/local':>9} {'KiB up/round':>12} {'s/round':>7} {'peak GB':>7}"
    )
    print(head)
    for r in rows:
        central = f"{100 * r['centralized']:6.1f}%" if "centralized" in r else f"{'-':>7}"
        local = f"{100 * r['mean_local']:5.1f}%" if "mean_local" in r else f"{'-':>6}"
        vs_central = f"{r['fed_vs_central']:11.3f}" if "fed_vs_central" in r else f"{'-':>11}"
        vs_local = f"{r['fed_vs_mean_local']:9.2f}" if "fed_vs_mean_local" in r else f"{'-':>9}"
        print(
            f"{r['seed']:>4} {r['batchnorm_stats']:<6} "
            f"{r['alpha']:>5g} {r['strategy']:<8} {r['mode']:<5} {100 * r['federated']:5.1f}% "
            f"{central} {local} {vs_central} {vs_local} "
            f"{r['bytes_up_per_site_round'] / 1024:12.1f} {r['seconds_per_round']:7.1f} "
            f"{r['peak_rss_gb']:7.2f}"
        )


if __name__ == "__main__":
    main()
