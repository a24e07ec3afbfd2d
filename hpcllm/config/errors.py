"""The one error type of a job that cannot run as configured (its own module: every config module raises it)."""


class ConfigError(ValueError):
    """A composed job that cannot run as configured; the message names the override to change."""
