"""Where a run's stages write: the run directory itself, or a local staging folder published to its object-store URI.

Stage workers (Ray Train's rank 0, Ray Data write tasks) write on the node they run on, so on a multi-node cluster
that folder must be on storage every node mounts (`ray.shared_storage: true` says so); a plain local path is refused
there. An object-store run directory (s3://, gs://, hdfs://, any pyarrow URI) is written in `ray.staging_dir` and
each completed stage folder is uploaded with its manifest last: on a store that cannot rename, a folder without its
manifest is incomplete and never read as a result.

On a multi-node cluster the staging folder must itself be shared until the stages write to the store directly.
engine.storage and the shard folders (engine/data/shards.py: write_dataset from Ray Data's tasks, staged_folder,
the readers) already take URIs, and Ray Train keeps its state (train/, for resuming) in the store itself
(`RunDir.train_storage`). What is left: the final model/ copy in engine/train/trainer.py and refine.py through
staged_folder on the URI (no Path.resolve()); embed.py loading the checkpoint from a URI; pipeline.py joining
run-dir paths with storage.join and writing config.yaml, run.json, centroids.npy, cluster.json and metrics.json
with storage.write_text / write_bytes; cluster/_sharded.py opening URI shards. Then `open_run_dir` yields the URI
itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine import storage
from engine.errors import ConfigError

MANIFEST = storage.MANIFEST


def check_shared(run_dir: str | os.PathLike[str], ray_cfg: Any, nodes: int) -> None:
    """Refuse, on a multi-node cluster, a local run directory or staging folder that is not declared shared."""
    if nodes <= 1:
        return
    if storage.is_local(run_dir):
        if not ray_cfg.shared_storage:
            raise ConfigError(
                f"run directory {run_dir} (--out, RUN_DIR): a local path, but the Ray cluster has {nodes} nodes and "
                "their workers write the run's outputs where they run; use a shared path (NFS mounted on every node, "
                "with ray.shared_storage=true) or an object store URI (s3://bucket/runs/name, gs://..., hdfs://...)")
    elif not (ray_cfg.shared_storage and ray_cfg.staging_dir):
        staging = ray_cfg.staging_dir or tempfile.gettempdir()
        raise ConfigError(
            f"run directory {run_dir} (--out, RUN_DIR): an object-store run is staged in ray.staging_dir={staging}, "
            f"but the Ray cluster has {nodes} nodes and their workers write where they run; set ray.staging_dir to a "
            "shared path (NFS mounted on every node) and ray.shared_storage=true")


class RunDir:
    """A run directory as the stages see it: `local` is where they write; `publish()` uploads what they completed."""

    def __init__(self, location: str | Path, local: Path):
        self.location = location
        self.local = local
        self.remote = not storage.is_local(location)
        # Ray Train's state (train/) goes to the store itself, not through `local`: see train_encoder.
        self.train_storage = str(location) if self.remote else None
        self._published: dict[str, Any] = {}

    def fetch(self) -> None:
        """Copy a remote run's top-level files and complete folders (those with a manifest) into `local`."""
        names = storage.files(self.location)
        folders = {n.split("/")[0] for n in names if n.endswith("/" + MANIFEST) and n.count("/") == 1}
        for name in [n for n in names if "/" not in n] + sorted(folders):
            storage.copy(storage.join(self.location, name), self.local / name)
        self._published = self._state()

    def publish(self) -> None:
        """Upload the top-level files and complete folders changed since the last publish (nothing for local runs)."""
        if not self.remote:
            return
        state = self._state()
        # Folders first: a run.json or metrics.json that mentions a stage is never ahead of the stage's data.
        for name in sorted(state, key=lambda n: not (self.local / n).is_dir()):
            if state[name] != self._published.get(name):
                storage.copy(self.local / name, storage.join(self.location, name))
                self._published[name] = state[name]

    def _state(self) -> dict[str, Any]:
        """What identifies each publishable entry's content: a folder's manifest text, a file's size and mtime."""
        state: dict[str, Any] = {}
        for entry in self.local.iterdir():
            if entry.name.startswith("."):  # temp siblings of files and folders being written
                continue
            if entry.is_file():
                st = entry.stat()
                state[entry.name] = (st.st_size, st.st_mtime_ns)
            elif (entry / MANIFEST).is_file():
                # Folders without a manifest (Ray Train's own state, unfinished stages) stay local.
                state[entry.name] = (entry / MANIFEST).read_text()
        return state


@contextlib.contextmanager
def open_run_dir(run_dir: str | Path, ray_cfg: Any, *, nodes: int, fetch: bool = False) -> Iterator[RunDir]:
    """The run directory for this process's stages, checked for a multi-node cluster of `nodes` alive nodes
    (1 where only this process writes).

    A local path is used as it is. A URI gets a staging folder (filled with the run's completed outputs when
    `fetch`, for a stage that reads earlier ones); what the stages complete is published when the block ends
    without error (and whenever the caller calls `publish()`), and the staging folder is removed.
    """
    check_shared(run_dir, ray_cfg, nodes)
    if storage.is_local(run_dir):
        local = Path(storage.resolve(run_dir)[1]) if storage.is_uri(run_dir) else Path(run_dir)
        yield RunDir(run_dir, local)
        return
    parent = Path(ray_cfg.staging_dir or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    local = parent / f"dce-staging-{uuid.uuid4().hex[:12]}"
    local.mkdir()
    run = RunDir(run_dir, local)
    try:
        if fetch:
            run.fetch()
        yield run
        run.publish()
    finally:
        shutil.rmtree(local, ignore_errors=True)
