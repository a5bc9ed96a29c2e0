"""Mount namespaces for tests that need a file system of their own (a tmpfs, a read-only bind mount)."""

from __future__ import annotations

import functools
import subprocess


@functools.cache
def unshare_works() -> bool:
    """Whether `unshare -Urm` may make a user and mount namespace here (some containers refuse it)."""
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
