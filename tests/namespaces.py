"""Mount namespaces for tests that need a file system of their own (a tmpfs, a read-only bind mount)."""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def unshare_works() -> bool:
    """Whether `unshare -Urm` may make a user and mount namespace here (some containers refuse it)."""
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def driver_alone(address: str, staging: Path, *commands: list[str], env: dict[str, str] | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m` commands one after another as a Ray driver (of the cluster at `address`) in a mount
    namespace of its own, where `staging` is a fresh tmpfs: the driver writes and reads its files there, while
    every Ray worker (started by the raylets, outside the namespace) sees only the empty folder below it, as a node
    without the driver's disk would. A worker that wrote to such a path would leave its file in that folder, which
    is checked to be empty after. A command is a module and its arguments, or ["-c", code, arguments...]. `env`: more
    environment for the commands.

    Without mount namespaces (unshare -Urm refused, as in some containers) the commands run as a plain driver
    (`unshare_works()` tells the caller), so nothing then keeps a worker from reading the staging folder."""
    jobs = "".join(" && " + shlex.join([sys.executable, *(cmd if cmd[0] == "-c" else ["-m", *cmd])])
                   for cmd in commands)
    if unshare_works():
        mount = 'mount -t tmpfs tmpfs "$0" && touch "$0/driver-only"'
        argv = ["unshare", "-Urm", "sh", "-c", mount + jobs, str(staging)]
    else:
        argv = ["sh", "-c", "true" + jobs]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": address, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert list(staging.iterdir()) == []  # nothing of the driver's leaked out, nothing of a worker's got in
    return proc
