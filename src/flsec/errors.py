"""User-facing errors. The CLI prints them as one line and exits with code 2."""


class FlsecError(Exception):
    """A problem with the user's input (config, files, checkpoint) rather than a bug."""


class ConfigError(FlsecError):
    """An invalid configuration key or value."""


class CheckpointError(FlsecError):
    """A checkpoint that is missing, incomplete, corrupted or tampered with."""


class DataError(FlsecError):
    """A dataset that cannot be found, verified or parsed."""
