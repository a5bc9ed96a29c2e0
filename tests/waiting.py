"""Waiting in fault tests: poll a condition until it holds, with a bound that names what was awaited."""

from __future__ import annotations

import time


def wait_for(condition, timeout: float, what: str, poll: float = 0.02):
    """The first truthy value of `condition()`, polled every `poll` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
