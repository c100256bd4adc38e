"""Errors the stages turn into one clear line and a non-zero exit."""


class TapeworkError(Exception):
    """A problem the user can fix; the message says what and how."""


class DataError(TapeworkError, ValueError):
    """Input data is missing, corrupt or not what the pipeline expects."""


class DownloadError(TapeworkError):
    """A file could not be fetched or failed verification."""


class EnvironmentSettingError(TapeworkError):
    """An environment variable the pipeline reads (TAPEWORK_*, TF_CONFIG) is malformed or contradicts params.yaml."""


class NonFiniteLossError(TapeworkError, ArithmeticError):
    """Training produced a NaN/Inf loss; nothing from the run is written as a result."""

    exit_code = 3  # distinct from bad input (2): the params were valid, the run diverged
