"""How a command ends on Ctrl-C, SIGTERM or bad input: exit code 130 / 143 and a line saying how to resume
(checkpoints kept), or exit code 2 and one `error:` line.

The entry points (`dce`, the jobs) install the handlers; a signal raises `Interrupted` in the main thread wherever it
waits (a Ray get, a Ray Data iteration, Ray Train's fit). Ray Train would put its own SIGINT handler in place during
`fit` (one that aborts the run and then fails it), so the trainers leave the signal to ours (`keep_sigint`).

A handler runs wherever the main thread is, a weakref callback or a `__del__` included (the garbage collector runs
them at any allocation), and Python swallows what those raise ("Exception ignored in ..."): a SIGTERM taken inside
one, during `import ray.train`, was lost and the run trained on to its end. Such a swallowed interruption comes back
through `sys.unraisablehook`, which delivers the signal again, to be raised where the main thread goes on.
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading
from typing import Any

from engine.errors import Interrupted, find_engine_error, user_message

_received: int | None = None
_installed = False
_unraisable_before: Any = None


def _handler(signum: int, frame: Any) -> None:
    global _received
    _received = signum
    raise Interrupted(128 + signum)


def install() -> None:
    """SIGINT and SIGTERM raise Interrupted (exit code 128 + the signal) in the main thread."""
    global _installed, _unraisable_before
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)
        _installed = True
        if sys.unraisablehook is not _unraisable:
            _unraisable_before = sys.unraisablehook
            sys.unraisablehook = _unraisable


def _unraisable(unraisable: Any) -> None:
    """An Interrupted that Python could not raise (a handler that ran in a finalizer): the same signal again, for
    the main thread to raise once the finalizer and this hook have returned (from another thread, a moment later:
    delivered from here, the handler would raise inside this hook, where it is lost too); anything else to the hook
    that was there before."""
    if isinstance(unraisable.exc_value, Interrupted):
        signum = unraisable.exc_value.exit_code - 128
        threading.Timer(0.05, _thread.interrupt_main, args=(signum,)).start()
    else:
        (_unraisable_before or sys.__unraisablehook__)(unraisable)


def reinstall() -> None:
    """Put the handlers back where an entry point installed them: `ray.init` replaces SIGTERM's with one that exits
    with a traceback (and its core worker a C handler that prints a stack dump)."""
    if _installed:
        install()


def received() -> int | None:
    """The signal that interrupted this process, if one did."""
    return _received


def as_interruption(exc: BaseException, run_dir: object = None) -> Interrupted | None:
    """The interruption `exc` stands for (a KeyboardInterrupt, or any error raised once a signal was received:
    Ray may wrap it), naming `run_dir` to resume; None for any other error."""
    if not isinstance(exc, KeyboardInterrupt) and _received is None:
        return None
    code = exc.exit_code if isinstance(exc, Interrupted) else 128 + (_received or signal.SIGINT)
    given = exc.run_dir if isinstance(exc, Interrupted) else None
    return Interrupted(code, given or (None if run_dir is None else str(run_dir)))


def command_outcome(exc: BaseException, run_dir: object = None) -> tuple[int, str] | None:
    """The exit code and the one line on stderr for an exception that ends a command (`dce`, a job): 130 / 143 for
    an interruption, 2 and `error: <message>` for an engine error, however Ray wrapped it; None for anything else,
    a bug, which the caller re-raises with its traceback."""
    stopped = as_interruption(exc, run_dir)
    if stopped is not None:
        return stopped.exit_code, stopped.message()
    err = find_engine_error(exc) if isinstance(exc, Exception) else None
    if err is None:
        return None
    return 2, f"error: {user_message(err)}"


def keep_sigint(trainer_cls: type) -> type:
    """A Ray Train trainer class whose `fit` does not replace the SIGINT handler (Ray's aborts the run and fails it
    with a traceback; ours ends the command as an interruption, and Ray's shutdown stops the workers). Anything
    that is not a class (a stand-in factory) is returned as it is."""
    if not isinstance(trainer_cls, type):
        return trainer_cls

    class Trainer(trainer_cls):  # type: ignore[misc, valid-type]
        def _register_sigint_handler(self, controller: Any) -> None:
            pass

    Trainer.__name__ = trainer_cls.__name__
    return Trainer
