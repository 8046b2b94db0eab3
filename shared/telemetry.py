"""Turn off every dependency's telemetry before it is imported.

fedge is a privacy product: nothing phones home unless a user turns it on
explicitly, by setting the variable themselves before starting fedge.
"""

import os

# Variable -> value that disables the dependency's telemetry or usage reporting.
_TELEMETRY_OFF = {
    "FLWR_TELEMETRY_ENABLED": "0",  # Flower (on by default)
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # Flower's CLIs call home for updates at start-up
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub, pulled in by flwr-datasets
    "HF_DATASETS_OFFLINE": "1",  # nothing is downloaded at run time
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",  # the cross-tool convention (gradio, wandb, ...)
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray, under Flower's simulation engine
    "TF_CPP_MIN_LOG_LEVEL": "2",  # quiet, not telemetry: TF/LiteRT start-up noise
    "ORT_DISABLE_TELEMETRY": "1",  # read by fedge's ORT wrapper, see edge/device
}


def disable_dependency_telemetry() -> None:
    """Set the telemetry switches, keeping any value the user chose explicitly."""
    for name, value in _TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)


def telemetry_environment() -> dict[str, str]:
    """The environment for a child process (SuperLink, SuperNode, ClientApp)."""
    env = dict(os.environ)
    for name, value in _TELEMETRY_OFF.items():
        env.setdefault(name, value)
    return env
