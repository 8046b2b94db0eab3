"""``fedge demo``: the whole story on one machine, from pretraining to a serving device.

1. Pretrain the model centrally on a few public ``digits`` images, a weak start that
   leaves the federation room to learn.
2. Start a SuperLink (TLS, SuperNode authentication) and N SuperNodes on
   loopback, each enrolled with its own key and holding a strongly label-skewed
   Dirichlet partition of the data (each site sees mostly a few of the ten digits).
3. Fine-tune federatedly with SecAgg+ and record-level DP (``--no-privacy``:
   the plain path), printing accuracy and epsilon after every round; then train
   each site alone and all data pooled for the same budget, and print the
   federated accuracy beside them (``fedge.demo.baselines``).
4. Export and quantize; calibrate static int8 and validate every artifact at the
   sites (``fedge export --federated``: the sites' data decides what is signed; the
   coordinator's public split only prints what central data would have said); sign a
   bundle, benchmark it, deploy it to an edge agent over the air and send it predictions.

Every process the demo starts is stopped on success, on error and on Ctrl-C.
"""

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedge.shared.atomic import atomic_write_json
from fedge.shared.config import PrivacyConfig, RunConfig
from fedge.shared.errors import ConfigError, ExportError
from fedge.shared.processes import ProcessGroup

PRETRAIN_EPOCHS = 10
# The demo is built so that the question "did federating pay?" has a visible answer: the
# public pretraining leaves room (200 of the 269 public images: 79.1 % test accuracy, where
# all 269 reach 91.6 % and the pooled sites 93.3 %), and each site holds mostly three to five
# of the ten digits (Dirichlet alpha 0.1), so no site alone can learn them all. Measured by
# four runs of `fedge demo` (3 sites, 3 rounds, DP-SGD): federated 87.7-88.9 %, best site
# alone 68.2 % (docs/getting-started.md).
PRETRAIN_EXAMPLES = 200
SITE_ALPHA = 0.1
DEMO_MODEL = "cnn"


@dataclass(frozen=True)
class DemoOptions:
    """What ``fedge demo`` was asked to do."""

    out: Path
    clients: int = 3
    rounds: int = 3
    privacy: bool = True


def check_options(options: DemoOptions) -> None:
    """Refuse what the demo cannot run.

    SecAgg+ needs at least 3 sites: Flower's workflow refuses fewer shares, and with 2
    sites each would learn the other's update from the sum.

    Raises
    ------
    ConfigError
        Fewer than 2 sites, fewer than 1 round, or privacy on with fewer than 3 sites.
    """
    if options.clients < 2:
        raise ConfigError("the demo needs at least 2 clients")
    if options.rounds < 1:
        raise ConfigError("the demo needs at least 1 round")
    if options.privacy and options.clients < 3:
        raise ConfigError(
            f"the demo's SecAgg+ needs at least 3 sites, not {options.clients}",
            hint="use --clients 3 or more, or --no-privacy",
        )


def demo_config(options: DemoOptions, init_weights: Path) -> RunConfig:
    """The run config of the demo: pretrained CNN, full fine-tuning, FedAvg."""
    privacy = PrivacyConfig()
    if options.privacy:
        privacy = PrivacyConfig(
            dp="record",
            noise_multiplier=1.0,
            clipping_norm=1.0,
            delta=1e-5,
            secagg=True,
            secagg_num_shares=min(3, options.clients),
            secagg_threshold=min(2, options.clients),
        )
    return RunConfig(
        task="digits",
        model=DEMO_MODEL,
        init_weights=str(init_weights),
        mode="full",
        strategy="fedavg",
        num_rounds=options.rounds,
        local_epochs=1,
        lr=0.02,
        batch_size=32,
        min_clients=options.clients,
        # The server evaluates on held-out data every round; sites evaluating too would
        # add a message per site per round for a number nobody needs in the demo.
        federated_eval=False,
        run_dir=str(options.out / "run"),
        privacy=privacy,
    )


def pretrain(out_path: Path, console: Console, examples: int | None = PRETRAIN_EXAMPLES) -> float:
    """Train the demo model centrally on digits' public split; returns its test accuracy.

    Parameters
    ----------
    out_path
        Where the checkpoint is written.
    console
        Shows the progress bar.
    examples
        Train on the first ``examples`` images of the public split (the demo's weak
        start); None: on all of it.
    """
    import torch
    from rich.progress import Progress

    from fedge.shared.ml.checkpoint import save_checkpoint
    from fedge.shared.ml.data import load_data, task_for_run
    from fedge.shared.ml.device import select_device
    from fedge.shared.ml.models import build_run_model
    from fedge.shared.ml.training import evaluate, make_loader, train
    from fedge.shared.preprocess import prepare

    torch.manual_seed(0)  # the same starting model on every run of the demo
    cfg = RunConfig(model=DEMO_MODEL)
    task = task_for_run(cfg)
    model = build_run_model(cfg, task)
    public = load_data("digits:public", task)
    x, y = public.x[:examples], public.y[:examples]
    test = load_data("digits:test", task)
    device = select_device()
    loader = make_loader(prepare(x, task.preprocessing), y, 32, shuffle=True)
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"pretraining on {len(y)} public images", total=PRETRAIN_EPOCHS)
        for _ in range(PRETRAIN_EPOCHS):
            train(model, loader, 1, lr=0.05, device=device)
            progress.advance(bar)
    test_loader = make_loader(prepare(test.x, task.preprocessing), test.y, 256, shuffle=False)
    accuracy = evaluate(model, test_loader, device).accuracy
    save_checkpoint(out_path, model.state_dict(), 0, DEMO_MODEL, task, cfg.to_flower())
    return accuracy


def demo_site_specs(clients: int) -> list[str]:
    """The data each demo site holds: a label-skewed Dirichlet partition of digits' train pool."""
    return [f"digits#{i}/{clients}?alpha={SITE_ALPHA:g}" for i in range(clients)]


def _baselines(
    cfg: RunConfig, options: DemoOptions, summary: dict[str, Any], console: Console
) -> dict[str, Any]:
    """Step 3b: each site alone and the pooled data, for the same budget (no Flower)."""
    from fedge.demo.baselines import centralized_vs_local, render_baselines

    console.rule("[bold]3b. was it worth it? each site alone, and all data pooled")
    names = [f"site-{i + 1}" for i in range(options.clients)]  # LocalFederation's names
    sites = dict(zip(names, demo_site_specs(options.clients), strict=True))
    result = centralized_vs_local(cfg, sites, threads=1)  # a tiny CNN: one thread is faster
    federated = summary.get("final_accuracy")
    lines = render_baselines(
        result, federated, summary["pretrained_accuracy"], private=options.privacy
    )
    console.print("\n".join(lines), highlight=False)
    return {
        "local_only_accuracy": result.local_only,
        "centralized_accuracy": result.centralized,
        "baseline_epochs": result.epochs,
    }


def _fresh_workspace(out: Path) -> None:
    """Clear a previous demo in ``out``; refuse to touch a folder that is not one."""
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.json").exists():
            raise ConfigError(f"{out} exists and is not a fedge demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "demo.json", {"fedge": "demo workspace; safe to delete"})


def run_demo(options: DemoOptions, console: Console) -> dict[str, Any]:
    """Run the demo end to end; returns (and writes) ``OUT/summary.json``."""
    started = time.monotonic()
    check_options(options)  # before minutes of pretraining, not after
    out = options.out.resolve()
    options = DemoOptions(out, options.clients, options.rounds, options.privacy)
    _fresh_workspace(out)
    console.rule(f"[bold]1. pretrain centrally on {PRETRAIN_EXAMPLES} public images")
    pretrained = out / "pretrained.safetensors"
    pretrained_accuracy = pretrain(pretrained, console)
    console.print(f"pretrained accuracy on held-out test data: {100 * pretrained_accuracy:.1f}%")
    cfg = demo_config(options, pretrained)
    summary: dict[str, Any] = {
        "pretrained_accuracy": pretrained_accuracy,
        "pretrain_examples": PRETRAIN_EXAMPLES,
        "site_alpha": SITE_ALPHA,
    }
    with ProcessGroup() as group:
        run_summary, federation = _federate(cfg, options, group, console)
        summary.update(
            final_accuracy=run_summary.get("final_accuracy"),
            rounds=run_summary.get("rounds"),
            clients=run_summary.get("clients"),
            privacy=run_summary.get("privacy"),
            run_dir=cfg.run_dir,
        )
        summary.update(_baselines(cfg, options, summary, console))
        summary.update(_edge(out, Path(cfg.run_dir), federation, console))
    summary["seconds"] = round(time.monotonic() - started, 1)
    from fedge.server.report.render import write_report

    summary["report"] = str(write_report(cfg.run_dir, out / "report.html"))
    atomic_write_json(out / "summary.json", summary)
    console.rule("[bold]done")
    console.print(
        f"pretrained {100 * pretrained_accuracy:.1f}% -> federated "
        f"{100 * float(summary['final_accuracy'] or 0):.1f}% (best site alone "
        f"{100 * max(summary['local_only_accuracy'].values()):.1f}%, centralised "
        f"{100 * summary['centralized_accuracy']:.1f}%) in {summary['seconds']}s; "
        f"summary: {out / 'summary.json'}"
    )
    console.print(f"report: {Path(summary['report']).as_uri()}")
    return summary


def _federate(
    cfg: RunConfig, options: DemoOptions, group: ProcessGroup, console: Console
) -> tuple[dict[str, Any], Any]:
    """Steps 2-3: a secured federation on loopback, and the run; returns the federation."""
    from fedge.demo.loopback import LocalFederation
    from fedge.server.progress import RunProgress, rounds_table

    mode = "TLS + enrolled sites" if options.privacy else "plaintext (--no-privacy)"
    console.rule(f"[bold]2. start a SuperLink and {options.clients} SuperNodes ({mode})")
    specs = demo_site_specs(options.clients)
    federation = LocalFederation(options.out, specs, group, secure=options.privacy).start()
    for name, spec in zip(federation.site_names, specs, strict=True):
        console.print(f"  {name}: data {spec} (a label-skewed Dirichlet partition)")
    p = cfg.privacy
    detail = (
        f"SecAgg+ ({p.secagg_num_shares} shares, threshold {p.secagg_threshold}), "
        f"DP-SGD (noise {p.noise_multiplier}, clip {p.clipping_norm}, delta {p.delta:g})"
        if options.privacy
        else "no privacy"
    )
    console.rule(f"[bold]3. federated fine-tuning: {cfg.num_rounds} rounds, {detail}")
    show_eps = cfg.privacy.dp != "none"
    with RunProgress(console, cfg.num_rounds, show_eps) as progress:
        run_summary = federation.submit(cfg, on_event=progress.on_event)
    console.print(rounds_table(progress.rows, show_eps))
    return run_summary, federation


def _edge(out: Path, run_dir: Path, federation: Any, console: Console) -> dict[str, Any]:
    """Step 4: export, calibrate and validate at the sites, sign, bench and deploy."""
    from fedge.demo.compare import central_comparison, render_comparison
    from fedge.demo.deployment import deploy_demo
    from fedge.edge.device.bench import bench_bundle, render_bench_table
    from fedge.edge.export.federated import FederatedTarget
    from fedge.edge.export.pipeline import ArtifactsFailed, export_bundle
    from fedge.edge.export.quiet import log_path_for, quiet_output
    from fedge.server.submit import submit_run
    from fedge.shared.signing import generate_signing_key

    tls = federation.tls
    ca = None if tls is None else tls.ca_cert
    target = FederatedTarget(federation.address, ca, federation.token, submit_run)
    console.rule(
        "[bold]4. export; calibrate static int8 and validate every artifact at the sites; sign"
    )
    key = out / "keys" / "signing.key"
    public_key = generate_signing_key(key)
    log_path = log_path_for(out / "bundle")
    failure = None
    # The converters' own chatter goes to the log; the progress bar to the terminal.
    with quiet_output(log_path, "fedge demo: export") as terminal:
        bar = Console(file=terminal, width=console.width)
        try:
            # Static TFLite would add two more calibration jobs: the demo keeps it short.
            report = export_bundle(
                run_dir,
                out / "bundle",
                signing_key=key,
                console=bar,
                federated=target,
                static_tflite=False,
            )
        except ArtifactsFailed as e:
            # The bundle holds the artifacts that passed; show which fell short and go on.
            failure, report = e, e.report
    if failure is not None:
        console.print(f"[yellow]{failure}")
    console.print(report.table())
    console.print(f"log of the converters: {log_path}")
    if report.bundle_dir is None:
        raise ExportError("no artifact passed validation: nothing to benchmark or deploy")
    with quiet_output(log_path, "fedge demo: central comparison"):
        comparison = central_comparison(report.bundle_dir, run_dir)
    console.print(render_comparison(comparison, report.note))
    console.rule("[bold]5. benchmark every artifact with the torch-free runtime")
    rows = bench_bundle(report.bundle_dir, public_key, iterations=50)
    console.print(render_bench_table(rows))
    console.rule("[bold]6. deploy over the air to an edge device and serve predictions")
    # The registry API serves with the SuperLink's certificate (plain HTTP with --no-privacy).
    deployment = deploy_demo(report.bundle_dir, out / "deploy", public_key, tls, console)
    return {
        "bundle": str(report.bundle_dir),
        "validation": report.rows,
        "federated_validation": report.note,
        "central_comparison": comparison,
        "skipped_artifacts": report.skipped,
        "deployment": deployment,
    }
