"""Shared fixtures: one local Ray for the whole suite (a start costs ~10 s), GPU skipping, small configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers every 2 s, so every tiny training run waited up to 2 s after its last
# epoch (and a killed worker was noticed that much later); the local Ray started below inherits this setting.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    # Modules with a cluster of their own go last: each one ends the shared local Ray, and every module after it
    # that needs Ray would pay for a new start (~10 s). The sort is stable, so the order is otherwise kept.
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is not None)
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
def digits_run(tmp_path_factory):
    """The tiny digits `dce run` of tests/tiny.py, made without its report (--no-report): test_report.py builds it
    with `dce report`, test_augment.py reads the augmented training's history. Returns the run directory."""
    from tiny import TINY_DIGITS

    out = tmp_path_factory.mktemp("runs") / "digits"
    _tiny_dce_run(TINY_DIGITS, out, "--no-report")
    assert not (out / "report").exists()
    return out


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
