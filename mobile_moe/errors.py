"""Errors a user can cause; the CLI turns each into one line and exit status 2."""


class MobileMoeError(Exception):
    """Base class for problems caused by input (checkpoint, flags, prompt), not by bugs."""


class CheckpointError(MobileMoeError):
    """The checkpoint directory is missing, incomplete, truncated or inconsistent."""


class UnsupportedArchitecture(MobileMoeError):
    """The checkpoint's architecture is not one the engine implements."""


class CacheTooSmall(MobileMoeError):
    """The expert cache or memory budget cannot hold what one layer needs."""


class PromptTooLong(MobileMoeError):
    """The prompt does not fit in the model's context."""


class InvalidParameter(MobileMoeError):
    """A sampling, policy or engine parameter is out of range."""
