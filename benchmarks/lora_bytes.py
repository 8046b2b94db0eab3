"""Bytes a site sends per round in ``lora`` mode vs ``full`` mode, side by side.

Counts the exchanged entries (``exchanged_keys``) of each model as the site would
send them (fp32), for the rank given. Nothing is trained; the ratio is exact.

    python -m fedge.benchmarks.lora_bytes --models resnet18 mobilenet_v3_small --ranks 4 8
"""

import argparse

from fedge.shared.config import RunConfig
from fedge.shared.ml.data import task_for_run
from fedge.shared.ml.models import build_run_model, exchanged_keys


def exchanged_bytes(cfg: RunConfig) -> int:
    model = build_run_model(cfg, task_for_run(cfg), load_weights=False)
    state = model.state_dict()
    return sum(state[k].numel() * state[k].element_size() for k in exchanged_keys(model, cfg.mode))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--task", default="digits")
    args = parser.parse_args()
    print(f"{'model':<22}{'mode':<10}{'bytes/round':>14}{'vs full':>10}")
    for name in args.models:
        full = exchanged_bytes(RunConfig(task=args.task, model=name, mode="full"))
        print(f"{name:<22}{'full':<10}{full:>14,}{1:>10.2%}")
        for rank in args.ranks:
            cfg = RunConfig(task=args.task, model=name, mode="lora", lora_rank=rank,
                            lora_alpha=2 * rank)  # fmt: skip
            lora = exchanged_bytes(cfg)
            print(f"{name:<22}{f'lora r={rank}':<10}{lora:>14,}{lora / full:>10.2%}")


if __name__ == "__main__":
    main()
