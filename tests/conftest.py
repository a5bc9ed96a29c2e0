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


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
