"""Named exceptions for bad input; the CLI turns them into one-line messages and exit code 2."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

# OSErrors that say the file system refused a write: the user's to fix (space, permissions), not a bug.
FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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


class OutputError(EngineError, OSError):
    """An output path cannot be used: it holds files that are not this run's, it is inside an input, or the file
    system refuses it (a file, no permission, read-only, full); the message names the path and the cause."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a command: `exit_code` is 130 or 143, `run_dir` the run to resume (or None)."""

    def __init__(self, exit_code: int = 130, run_dir: str | None = None):
        super().__init__(exit_code, run_dir)
        self.exit_code = exit_code
        self.run_dir = run_dir

    def message(self) -> str:
        if self.run_dir is None:
            return "interrupted"
        return f"interrupted: resume with `dce run --resume {self.run_dir}`"


class RayStartError(EngineError, RuntimeError):
    """Ray could not be started or joined; the message names the address (or the local start) and what to try."""


def find_engine_error(exc: BaseException) -> EngineError | None:
    """The EngineError behind `exc`, looking through Ray's task/actor wrappers and exception chains; else an
    OutputError for a write the file system refused (`FILE_SYSTEM_ERRNOS`), naming the file.

    Ray re-raises a remote exception as `RayTaskError` (with `.cause`), and Ray Data wraps user code
    errors again; the user should see our message, not three tracebacks.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    refused: OSError | None = None
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
        if refused is None and isinstance(e, OSError) and e.errno in FILE_SYSTEM_ERRNOS:
            refused = e
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
        # Ray Train keeps the error of each failed worker, by rank, beside the one it raises.
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
    if refused is not None:
        # A write the file system refused (full, read-only, no permission) found after the start: one line too.
        where = refused.filename or "an output file"
        return OutputError(f"{where}: cannot write there: {refused.strerror or refused}")
    return None


def user_message(err: BaseException) -> str:
    """The one-line message of an error: our messages are single lines, and Ray Data appends its retry
    advice on further lines when it re-raises a user-code error."""
    return str(err).split("\n", 1)[0].strip()


@contextlib.contextmanager
def remote_errors_as_raised() -> Iterator[None]:
    """Within the block (around `ray.get` of tasks or actors), an engine error raised remotely is raised as itself
    rather than inside Ray's wrapper, so callers can catch ConfigError, DataError, ... as in a local call."""
    try:
        yield
    except Exception as e:
        err = find_engine_error(e)
        if err is None or err is e:
            raise
        raise err from None
