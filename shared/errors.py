"""fedge's error classes: each maps to an exit code and a one-line hint.

Library code raises these; only the CLI layer (``fedge.cli``) turns them into a
message on stderr and a non-zero exit. A user mistake never shows a traceback.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the ``fedge`` command."""

    OK = 0
    CONFIG = 2
    DATA = 3
    MODEL = 4
    CONNECTION = 5
    SECURITY = 6
    EXPORT = 7
    BUNDLE = 8
    RUN = 9
    REGISTRY = 10
    INTERRUPTED = 130


EXIT_CODE_HINT: dict[ExitCode, str] = {
    ExitCode.OK: "",
    ExitCode.CONFIG: "check the command's options and the run config (see `fedge COMMAND --help`)",
    ExitCode.DATA: "check the data path and format (README, 'Data')",
    ExitCode.MODEL: "check the model name and the weights file (README, 'Models and weights')",
    ExitCode.CONNECTION: "check that the server is running and that HOST:PORT is right",
    ExitCode.SECURITY: "check certificates, keys and enrollment (README, 'Enroll a site')",
    ExitCode.EXPORT: "see the validation table; lower the bar only if you accept the drop",
    ExitCode.BUNDLE: "re-download or re-export the bundle; never serve a bundle that fails checks",
    ExitCode.RUN: "see the run log in the run directory",
    ExitCode.REGISTRY: "see `fedge registry list`",
    ExitCode.INTERRUPTED: "interrupted; every process fedge started was stopped",
}


class FedgeError(Exception):
    """Base of every error a user can cause or fix; carries an exit code."""

    exit_code: ExitCode = ExitCode.RUN

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint if hint is not None else EXIT_CODE_HINT[self.exit_code]


class ConfigError(FedgeError):
    """A bad option, config file or unknown name."""

    exit_code = ExitCode.CONFIG


class DataError(FedgeError):
    """Data that is missing, malformed or does not match the task."""

    exit_code = ExitCode.DATA


class ModelError(FedgeError):
    """An unknown model or a weights file that cannot be loaded into it."""

    exit_code = ExitCode.MODEL


class ConnectionFailed(FedgeError):
    """A server or service that cannot be reached."""

    exit_code = ExitCode.CONNECTION


class SecurityError(FedgeError):
    """Certificates, keys, enrollment or signatures that do not check out."""

    exit_code = ExitCode.SECURITY


class ExportError(FedgeError):
    """An artifact that could not be exported or failed validation."""

    exit_code = ExitCode.EXPORT


class BundleError(FedgeError):
    """A model bundle that is missing, corrupt, tampered with or misused."""

    exit_code = ExitCode.BUNDLE


class RunError(FedgeError):
    """A federated run that failed or cannot continue."""

    exit_code = ExitCode.RUN


class RegistryError(FedgeError):
    """A registry operation that cannot be done."""

    exit_code = ExitCode.REGISTRY
