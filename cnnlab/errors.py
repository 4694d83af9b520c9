"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class ConfigError(ValueError):
    """A bad value in the user's config or command line, detected before anything compiles."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok`: the shape of every value check."""
    if not ok:
        raise ConfigError(message)
