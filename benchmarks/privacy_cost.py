"""What privacy costs on the demo task: final accuracy and wall time, side by side.

One run of this script trains, from the same pretrained CNN and the same data:

- on the deployment engine (TLS, 3 enrolled SuperNodes on loopback):
  ``none``, ``secagg`` (SecAgg+ alone), ``record eps~8`` and ``record eps~3``
  (SecAgg+ with DP-SGD on each site, noise calibrated to the target epsilon);
- on Flower's simulation engine: ``site eps~8``, site-level DP (clip on each
  site, noise on the server) over ``--sim-clients`` simulated sites, a fraction
  of them sampled per round: site-level DP only means something with many sites.

Prints final accuracy, reported epsilon, and wall time as a ratio to ``none``.

    python benchmarks/privacy_cost.py [--rounds 3] [--sim-clients 50]
"""

import argparse
import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fedge.demo.loopback import LocalFederation
from fedge.demo.pipeline import pretrain
from fedge.server.privacy import site_level_epsilon
from fedge.shared.config import PrivacyConfig, RunConfig
from fedge.shared.processes import ProcessGroup

SITES = ["digits#0/3", "digits#1/3", "digits#2/3"]
SECAGG = {"secagg": True, "secagg_num_shares": 3, "secagg_threshold": 2}
DELTA = 1e-5


def record_noise_for(target: float, cfg: RunConfig) -> float:
    """Smallest DP-SGD noise that keeps every site at or under ``target`` epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    from fedge.client.site import load_site_data

    noise = 0.0
    for spec in SITES:
        n = len(load_site_data(cfg, spec, "label").y_train)
        batches = math.ceil(n / cfg.batch_size)
        noise = max(
            noise,
            get_noise_multiplier(
                target_epsilon=target,
                target_delta=DELTA,
                sample_rate=1 / batches,
                steps=batches * cfg.local_epochs * cfg.num_rounds,
                accountant="rdp",
            ),
        )
    return float(noise)


def site_noise_for(target: float, sampling_rate: float, rounds: int) -> float:
    """Bisect the server-side noise multiplier for ``target`` epsilon (RDP accountant)."""
    low, high = 0.05, 50.0
    for _ in range(40):
        mid = (low + high) / 2
        if site_level_epsilon(mid, sampling_rate, rounds, DELTA) > target:
            low = mid
        else:
            high = mid
    return high


def run_deployed(
    base: RunConfig, work: Path, settings: dict[str, PrivacyConfig]
) -> list[dict[str, Any]]:
    results = []
    with ProcessGroup() as group:
        federation = LocalFederation(work, SITES, group, secure=True).start()
        for name, privacy in settings.items():
            cfg = base.replace(run_dir=str(work / name.replace(" ", "-")))
            cfg = RunConfig.from_mapping({**_fields(cfg), "privacy": privacy.__dict__})
            started = time.perf_counter()
            summary = federation.submit(cfg)
            results.append(_row(name, summary, time.perf_counter() - started))
    return results


def _fields(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.__dict__.items() if k != "privacy"}


def _row(name: str, summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    # A run whose sites all failed still ends with the pretrained model's accuracy: that
    # figure would say nothing about the privacy setting, so stop instead of printing it.
    if summary.get("failures") or not summary.get("clients"):
        raise SystemExit(
            f"{name}: {summary.get('failures')} site failures, {summary.get('clients')} sites "
            "trained; see the log above"
        )
    return {
        "setting": name,
        "accuracy": summary.get("final_accuracy"),
        "epsilon": summary.get("privacy", {}).get("dp", {}).get("epsilon"),
        "seconds": seconds,
    }


def run_simulated(base: RunConfig, work: Path, clients: int, sampled: int) -> dict[str, Any]:
    """Site-level DP on Flower's simulation engine with ``clients`` virtual sites."""
    from flwr.client import ClientApp
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    from fedge.client import app as client_module
    from fedge.server.app import run_federation

    rate = sampled / clients
    privacy = PrivacyConfig(
        dp="site",
        noise_multiplier=site_noise_for(8.0, rate, base.num_rounds),
        clipping_norm=1.0,
        delta=DELTA,
    )
    cfg = RunConfig.from_mapping(
        {
            **_fields(base),
            "privacy": privacy.__dict__,
            "min_clients": sampled,
            "fraction_train": rate,
            "run_dir": str(work / "site-sim"),
        }
    )
    flat = cfg.to_flower()

    def client_fn(context: Any) -> Any:
        # The simulation engine has no run config of its own (and Flower forbids editing
        # the Context's): hand the site this run's config beside the node's own.
        view = SimpleNamespace(
            run_config=flat, node_config=dict(context.node_config), run_id=context.run_id
        )
        return client_module.SiteClient(view).to_client()

    server = ServerApp()

    @server.main()
    def _main(grid: Any, context: Any) -> None:
        context.run_config = dict(flat)
        summaries.append(run_federation(grid, context))

    summaries: list[dict[str, Any]] = []
    started = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=ClientApp(client_fn=client_fn, mods=[client_module._clipping_when_asked]),
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    return _row(f"site eps~8 ({clients} sim. sites)", summaries[-1], time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sim-clients", type=int, default=50)
    parser.add_argument("--sim-sampled", type=int, default=10)
    parser.add_argument(
        "--only-simulated", action="store_true", help="Run the site-level DP simulation alone."
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedge-privacy-") as tmp:
        work = Path(tmp)
        from rich.console import Console

        # The whole public split (91.6 %), the start the recorded figures were measured from.
        pretrain(work / "pretrained.safetensors", Console(quiet=True), examples=None)
        base = RunConfig(
            num_rounds=args.rounds,
            min_clients=3,
            federated_eval=False,
            init_weights=str(work / "pretrained.safetensors"),
        )
        settings = {
            "none": PrivacyConfig(),
            "secagg": PrivacyConfig(**SECAGG),
            "record eps~8": PrivacyConfig(
                dp="record", noise_multiplier=record_noise_for(8.0, base), delta=DELTA, **SECAGG
            ),
            "record eps~3": PrivacyConfig(
                dp="record", noise_multiplier=record_noise_for(3.0, base), delta=DELTA, **SECAGG
            ),
        }
        rows = [] if args.only_simulated else run_deployed(base, work / "deployed", settings)
        rows.append(run_simulated(base, work, args.sim_clients, args.sim_sampled))
    plain = rows[0]["seconds"]  # with --only-simulated the ratio is to itself
    print(f"{'setting':<32}{'accuracy':>10}{'epsilon':>10}{'time vs none':>14}")
    for row in rows:
        eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        ratio = row["seconds"] / plain
        print(f"{row['setting']:<32}{100 * row['accuracy']:>9.1f}%{eps:>10}{ratio:>14.2f}")
    print("the simulated run's time includes starting Ray: another engine, not comparable")


if __name__ == "__main__":
    main()
