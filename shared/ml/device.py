"""Pick the compute device: CUDA with mixed precision when present, else the CPU."""

import contextlib
import os
from collections.abc import Iterator

import torch


def select_device() -> torch.device:
    """CUDA if available, else CPU; ``FEDGE_DEVICE=cpu`` forces the CPU."""
    wanted = os.environ.get("FEDGE_DEVICE", "").strip()
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bfloat16 autocast on CUDA (no loss scaling needed), nothing on the CPU."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
