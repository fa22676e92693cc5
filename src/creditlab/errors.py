"""Exceptions with messages meant for users: what went wrong, where, and what to do."""


class CreditlabError(Exception):
    """Base class; the command line prints these without a traceback and exits with
    ``exit_code`` (2: bad input)."""

    exit_code: int = 2


class ConfigError(CreditlabError, ValueError):
    """A configuration key, value or spec is invalid."""


class DataError(CreditlabError):
    """A dataset file is missing, corrupted or of the wrong form."""


class DivergenceError(CreditlabError):
    """NaN or inf appeared in a loss, state, update or weight during training."""

    exit_code = 3

    def __init__(self, message: str, step: int | None = None, where: str | None = None):
        super().__init__(message)
        self.step = step
        self.where = where
