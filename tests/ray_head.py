"""A real `ray start --head` with token auth in its own temp dir, for tests that use Ray the way a cluster user does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Settings inherited from the caller that would point the head or its clients somewhere else.
_FOREIGN_RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    """The `ray` script next to this interpreter, so the head's workers run this venv's Python."""
    return str(Path(sys.executable).parent / "ray")


@dataclass
class RayHead:
    temp_dir: Path
    token: str
    dashboard_port: int
    process: subprocess.Popen
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, and nothing foreign

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def log(self) -> str:
        path = self.temp_dir / "head.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop this head only. `ray stop` would kill every Ray of this user on the machine, by process name."""
        if self.process.poll() is None:
            # `ray start --block` drains its node on SIGTERM and stops the processes it started.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Stragglers: the head's own process group, then workers, each in a group of its own, found by this head's
        # unique temp dir in their environment (RAY_AUTH_TOKEN_PATH) or command line.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_processes_mentioning(str(self.temp_dir).encode())
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(num_cpus: int = 4, timeout: float = 120.0) -> RayHead:
    """Start a head with RAY_AUTH_MODE=token and a fresh token outside ~/.ray; return once the job API answers."""
    # Short path: Ray's unix socket paths under it must stay below ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_RAY_ENV}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    try:
        # `ray get-auth-token --generate` always writes ~/.ray/auth_token, so HOME points into the temp dir here.
        subprocess.run([ray_cli(), "get-auth-token", "--generate"], env={**env, "HOME": str(temp_dir)},
                       check=True, capture_output=True, timeout=60)
        token_path = temp_dir / ".ray" / "auth_token"
        token = token_path.read_text().strip()
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
        # A test head has nothing to hand over on SIGTERM; Ray's default would wait up to 30 s for leases to drain.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        dashboard_port = free_port()
        cmd = [ray_cli(), "start", "--head", "--block", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir / 't'}",
               "--disable-usage-stats"]
        with open(temp_dir / "head.log", "wb") as log:
            # Own session: the head's processes form one group that teardown can signal without touching others.
            process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    head = RayHead(temp_dir=temp_dir, token=token, dashboard_port=dashboard_port, process=process, env=env)
    try:
        _wait_for_job_api(head, timeout)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_for_job_api(head: RayHead, timeout: float) -> None:
    """Until the head accepts a job: its job API answers before its dashboard agent has registered, and a
    submission in between fails with 500 "No available agent" (seen on a loaded machine)."""
    deadline = time.monotonic() + timeout
    probe = urllib.request.Request(f"{head.dashboard_url}/api/jobs/", data=json.dumps({"entrypoint": "true"}).encode(),
                                   headers={**head.auth_header, "Content-Type": "application/json"}, method="POST")
    last = ""
    while True:
        if head.process.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {head.process.returncode}:\n{head.log()}")
        try:
            with urllib.request.urlopen(probe, timeout=10) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"{e.code}: {e.read()[:200]!r}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray job API at {head.dashboard_url} did not accept a job in {timeout:g} s "
                               f"(last answer {last}):\n{head.log()}")
        time.sleep(1)


def _kill_processes_mentioning(needle: bytes) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes() or needle in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to read
            pass
