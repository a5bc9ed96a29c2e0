"""Named exceptions for bad input; the CLI turns them into one-line messages and exit code 2."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises for bad input, an unusable run directory or a Ray it cannot start."""


class ConfigError(EngineError, ValueError):
    """A setting is unknown, of the wrong type or out of range; the message names the key."""


class DataError(EngineError, ValueError):
    """Input data is missing or malformed; the message names the file, column or row."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint is missing, unreadable or does not fit the data."""


class IncompleteResultError(EngineError, FileNotFoundError):
    """A stage folder has no `_manifest.json`: it was never finished and is not a result."""


class RayStartError(EngineError, RuntimeError):
    """Ray could not be started or joined; the message names the address (or the local start) and what to try."""


def find_engine_error(exc: BaseException) -> EngineError | None:
    """The EngineError behind `exc`, looking through Ray's task/actor wrappers and exception chains.

    Ray re-raises a remote exception as `RayTaskError` (with `.cause`), and Ray Data wraps user code
    errors again; the user should see our message, not three tracebacks.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, EngineError):
            # A RayTaskError built `as_instanceof_cause` is also an EngineError; prefer its cause.
            cause = getattr(e, "cause", None)
            found = cause if isinstance(cause, EngineError) else e
            # Ray Data rewrites a user-code error's args inside the task, appending its retry advice;
            # our messages are single lines, so give back the message alone.
            if found.args and isinstance(found.args[0], str) and "\n" in found.args[0]:
                found.args = (user_message(found), *found.args[1:])
            return found
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
        # Ray Train keeps the error of each failed worker, by rank, beside the one it raises.
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
    return None


def user_message(err: BaseException) -> str:
    """The one-line message of an error: our messages are single lines, and Ray Data appends its retry
    advice on further lines when it re-raises a user-code error."""
    return str(err).split("\n", 1)[0].strip()
