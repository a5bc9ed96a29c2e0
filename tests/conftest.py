"""Shared fixtures: one local Ray for the whole suite (a start costs ~10 s), GPU skipping, small configs.

Markers come from fixtures: a fixture declares with `@needs(...)` what a test that uses it (directly or through
another fixture) needs: "ray" (a real local Ray), "train" (a Ray Train run), "own_cluster" (a Ray cluster of its
own), "slow". `pytest_collection_modifyitems` marks every test so, and `-m "not train and not own_cluster and not
slow"` is the fast tier. Two checks keep the markers honest: a test that starts Ray in this process without being
marked `ray`, or runs Ray Train without being marked `train`, fails; and the suite fails at its end when a
process it started (found by an environment variable every child inherits) outlives it.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from cluster_nodes import stat_fields
from markers import needs

_BEFORE = pytest.StashKey[tuple]()
# (wall-clock time, node id) of each test as it starts: a process that outlives the suite is reported with the test
# that was running when it started.
_STARTS: list[tuple[float, str]] = []
# Every process the suite starts inherits this: the session-end check finds the survivors by it, wherever
# they were re-parented to.
SESSION_MARK = "DCE_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, uuid.uuid4().hex)
def _fixture_needs(item: pytest.Item) -> set[str]:
    found: set[str] = set()
    for defs in item._fixtureinfo.name2fixturedefs.values():
        for d in defs:
            found.update(getattr(d.func, "_dce_needs", ()))
    return found

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers every 2 s, so every tiny training run waited up to 2 s after its last
# epoch (and a killed worker was noticed that much later); the local Ray started below inherits this setting.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Each Ray Train run also starts a PreemptionWatcher actor (a process of its own) that polls for node drains, which
# no test makes: without it a tiny run took 16.4 s and 27.0 CPU-seconds here against 17.6 s and 28.8 (5 runs each).
# A removed node is still a worker failure, restarted from the latest checkpoint (test_nodeloss.py).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        for kind in sorted(_fixture_needs(item)):
            item.add_marker(kind)
        if "own_cluster" in item.keywords or "train" in item.keywords:
            item.add_marker("ray")
    # Modules with a cluster of their own go last: each one ends the shared local Ray, and every module after it
    # that needs Ray would pay for a new start (~10 s). The sort is stable, so the order is otherwise kept.
    # A module may ask to run after the other own-cluster modules (RUN_LAST = True): test_gpu_cluster.py's fake
    # autoscaling cluster, run before test_jobs.py's token-auth head, left test_multinode.py's next cluster unable to
    # start (its GCS answered with token auth); after them it meets nothing of theirs.
    items.sort(key=lambda item: (item.get_closest_marker("own_cluster") is not None,
                                 getattr(item.module, "RUN_LAST", False)))
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny inputs: OpenMP threads only add spin-waits, which stall on a busy 2-core machine."""
    import faiss
    import torch

    before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before[0])
    torch.set_num_threads(before[1])


@pytest.fixture(scope="module")
@needs("ray")
def ray_local():
    """A local Ray shared by every module that asks for it; modules that need their own cluster
    (ray.cluster_utils, `ray start`) shut it down and the next module starts it again."""
    import ray

    from engine.runtime import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=4)
    yield ray


def _tiny_dce_run(settings: list[str], out, *flags: str) -> None:
    """`dce run` with tests/tiny.py's `settings` into `out`, on the shared local Ray (started here unless a module's
    `ray_local` has started it); fails the test with the command's output."""
    from tiny import as_args
    from typer.testing import CliRunner

    from engine.cli import app
    from engine.runtime import init_ray

    init_ray(num_cpus=4)
    result = CliRunner().invoke(app, ["run", *as_args(settings), *flags, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="session")
@needs("ray", "train")
def tracked_tiny_run(tmp_path_factory):
    """The tiny `dce run` of tests/tiny.py, tracked to MLflow (a file store) and TensorBoard at once: test_tracking.py
    reads it as it is, test_train.py its train stage, test_pipeline.py a copy it changes (stages run again). Returns
    (run directory, MLflow URI)."""
    from tiny import TINY_RUN

    base = tmp_path_factory.mktemp("tracked")
    uri = (base / "mlruns").as_uri()
    tracking = ["tracking.backend=[mlflow, tensorboard]", f"tracking.uri={uri}", "tracking.experiment=dce-test"]
    with pytest.MonkeyPatch.context() as mp:
        # MLflow 3 refuses a file store unless told that it is wanted; a server or a database needs more than a test.
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        _tiny_dce_run([*TINY_RUN, *tracking], base / "tiny")
    return base / "tiny", uri


@pytest.fixture(scope="session")
@needs("ray", "train")
def digits_run(tmp_path_factory):
    """The tiny digits `dce run` of tests/tiny.py, made without its report (--no-report): test_report.py builds it
    with `dce report`, test_augment.py reads the augmented training's history. Returns the run directory."""
    from tiny import TINY_DIGITS

    out = tmp_path_factory.mktemp("runs") / "digits"
    _tiny_dce_run(TINY_DIGITS, out, "--no-report")
    assert not (out / "report").exists()
    return out


@pytest.fixture
@needs("ray", "train")
def ray_train(ray_local):
    """The shared local Ray, for a test that runs Ray Train itself (a `dce run`, `train_encoder`, ...)."""
    yield ray_local


@pytest.fixture
@needs("ray")
def ray_processes():
    """For a test whose commands start a Ray of their own in a child process (`dce` run as a command)."""
    yield


def _train_runs() -> int:
    """Ray Train runs this process's Ray has seen (their controller actors, dead ones included), from the GCS's
    actor table (the state API needs the dashboard, which the embedded local Ray does not start)."""
    import sys

    if "ray" not in sys.modules:
        return 0
    import ray

    if not ray.is_initialized():
        return 0
    from ray._private.state import actors

    return sum("TrainController" in a.get("ActorClassName", "") for a in actors().values())


def _ray_up() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    # Counted before any fixture of the test is set up, module- and session-scoped ones included.
    item.stash[_BEFORE] = (_ray_up(), _train_runs())
    _STARTS.append((time.time(), item.nodeid))
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """A test not marked `ray` must not have started Ray here (its fixtures included); one not marked `train` must
    not have run Ray Train. Checked before the fixtures are torn down, reported after (as a teardown error), so that
    the teardown itself runs as always."""
    problem = None
    before = item.stash.get(_BEFORE, None)
    if before is not None and "own_cluster" not in item.keywords:
        if "ray" not in item.keywords and _ray_up() and not before[0]:
            problem = (f"{item.nodeid} started Ray but is not marked `ray`: let it or its fixture request ray_local "
                       "(or ray_train for a Ray Train run)")
        elif "train" not in item.keywords and _train_runs() > before[1]:
            problem = (f"{item.nodeid} ran Ray Train but is not marked `train`: let it or its fixture request "
                       "ray_train, or declare @needs('ray', 'train') on the fixture")
    result = yield
    if problem:
        pytest.fail(problem, pytrace=False)
    return result


def _started_during(pid: int) -> str:
    """The test that was running (its setup included) when process `pid` started, from /proc's start time."""
    try:
        ticks = int(stat_fields(pid)[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, StopIteration):
        return "?"
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    before = [nodeid for t, nodeid in _STARTS if t <= started]
    return before[-1] if before else "before the first test"


def _our_processes() -> list[tuple[int, str]]:
    """(pid, command line) of the live processes that carry this session's mark, the suite's own aside."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    mine = {os.getpid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            if mark not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if stat_fields(entry.name)[0] == "Z":
                continue  # a zombie has ended; its parent has not reaped it yet
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if "multiprocessing.resource_tracker" in cmd:
            continue  # the tracker of a multiprocessing pool: it ends with the suite's process, by design
        found.append((int(entry.name), cmd[:160]))
    return found


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    if not Path("/proc/self/environ").exists():
        return
    deadline = time.monotonic() + 30  # Ray's processes take a few seconds to stop after a shutdown
    left = _our_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _our_processes()
    if left:
        import signal

        lines = "\n".join(f"  {pid}: {cmd} (started during {_started_during(pid)})" for pid, cmd in left)
        session.config.get_terminal_writer().line(
            f"\nFAILED: {len(left)} process(es) started by the suite outlived it (now killed):\n{lines}", red=True)
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        session.exitstatus = 1
