"""A run directory written in code, shaped like the ServerApp's (for report and console tests)."""

import json
from pathlib import Path
from typing import Any

from fedge.shared.atomic import append_jsonl, atomic_write_json


def client(site: str, round_: int, eps: float | None) -> dict[str, Any]:
    """One site's fit reply as the ServerApp records it."""
    row: dict[str, Any] = {
        "site": site,
        "loss": 0.5 / round_,
        "accuracy": 0.8 + 0.01 * round_,
        "bytes-down": 1000 * round_,
        "bytes-up": 900 * round_,
        "num_examples": 100,
    }
    if eps is not None:
        row["epsilon"] = eps
    return row


def write_run(
    run_dir: Path,
    sites: list[str],
    rounds: int = 3,
    dp: bool = True,
    finished: bool = True,
    configured: int | None = None,
) -> Path:
    """A run directory with ``rounds`` rounds of metrics; summary.json when ``finished``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        run_dir / "run_config.json",
        {
            "task": "digits",
            "model": "cnn",
            "mode": "full",
            "strategy": "fedavg",
            "num-rounds": configured or rounds,
        },
    )
    for r in range(1, rounds + 1):
        eps = 1.0 * r if dp else None
        clients = [client(s, r, eps) for s in sites]
        append_jsonl(
            run_dir / "metrics.jsonl",
            {
                "round": r,
                "clients": clients,
                "failures": [],
                "server_eval": {"accuracy": 0.7 + 0.05 * r, "loss": 1.0 / r},
                "federated_eval": {"accuracy": 0.6 + 0.05 * r, "loss": 1.2 / r},
                "epsilon": eps,
                "bytes_down": sum(c["bytes-down"] for c in clients),
                "bytes_up": sum(c["bytes-up"] for c in clients),
                "sampled": len(sites),
                "available": len(sites),
                "aggregated": True,
                "seconds": 1.5,
            },
        )
    if finished:
        privacy = {"tls": True, "dp": {"level": "record" if dp else "none", "epsilon": 3.0}}
        atomic_write_json(
            run_dir / "summary.json",
            {
                "rounds": rounds,
                "rounds_configured": configured or rounds,
                "sites": sites,
                "final_accuracy": 0.85,
                "privacy": privacy,
            },
        )
    else:
        atomic_write_json(run_dir / "summary.partial.json", {"last_round": rounds})
    return run_dir


def write_bundle(bundle: Path, card_text: str) -> Path:
    """A bundle directory with a model card and the validation file beside it."""
    bundle.mkdir(parents=True, exist_ok=True)
    card = {
        "format": "fedge-model-card/1",
        "model": {"name": card_text},
        "validation": [{"artifact": "model-fp32.onnx", "status": "pass", "accuracy": 0.9}],
    }
    (bundle / "model_card.json").write_text(json.dumps(card))
    rows = [
        {"artifact": "model-fp32.onnx", "status": "pass", "accuracy": 0.9},
        {"artifact": "model-int8.tflite", "status": "fail", "accuracy": 0.5, "reason": card_text},
    ]
    (bundle.parent / f"{bundle.name}.validation.json").write_text(json.dumps({"rows": rows}))
    return bundle
