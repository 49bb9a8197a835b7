"""The one error tree of the worker.

Every failure is one of two kinds, and the kind decides what the durable kernel does with it:

- ``TerminalError`` and its subclasses: retrying cannot help (bad input, a row that can never
  appear, a rule that refuses the call). Steps fail at once, flows fail at once, and nothing
  is half-written because every flow parses its parameters before its first side effect.
- ``RetryableError`` and every other exception (network, 5xx, lock timeouts, a restarted
  database): retried with backoff by the step that raised it, then failed with a clear
  message.

Messages name the thing and the value (``deployment 'd_123' not found``) and never a secret.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConflictError",
    "CtrlError",
    "InvalidParameterError",
    "NotFoundError",
    "RefusedError",
    "RetryableError",
    "TerminalError",
    "deployment_not_found",
    "is_terminal",
]


class CtrlError(Exception):
    """Base of every error this worker raises on purpose."""


class TerminalError(CtrlError):
    """Retrying cannot help: fail the step and the call at once."""


class InvalidParameterError(TerminalError):
    """A call's parameter is missing, of the wrong type or out of range.

    Args:
        parameter: the name of the parameter, as the caller spelled it.
        problem: what is wrong with it (never the value of a secret).
    """

    def __init__(self, parameter: str, problem: str) -> None:
        self.parameter = parameter
        self.problem = problem
        super().__init__(f"invalid parameter '{parameter}': {problem}")

    def __reduce__(self) -> tuple[type[InvalidParameterError], tuple[str, str]]:
        return (type(self), (self.parameter, self.problem))


class NotFoundError(TerminalError):
    """A row the call needs does not exist and will not appear by waiting."""


class RefusedError(TerminalError):
    """A rule refuses the call (for example: changing the live deployment)."""


class ConflictError(TerminalError):
    """The call contradicts the current state (for example: a route of another project)."""


class ConfigError(TerminalError):
    """The worker's configuration is invalid; the message names every variable at fault."""


class RetryableError(CtrlError):
    """A transient failure that is worth retrying (also: any exception not in this tree)."""


def deployment_not_found(full_name: str) -> NotFoundError:
    """The error for a service call whose ``<flow>/ctrl`` deployment is not registered."""
    return NotFoundError(
        f"deployment '{full_name}' not found: is a worker (`ctrl-worker run`) or "
        "`prefect deploy` of this version registered with this Prefect API?"
    )


def is_terminal(exc: BaseException) -> bool:
    """Tell whether an exception must not be retried."""
    return isinstance(exc, TerminalError)
