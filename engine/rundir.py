"""Where a run's stages write: the run directory itself, or a local staging folder published to its object-store URI.

Stage workers (Ray Train's workers, Ray Data tasks and actors, shard actors) read and write on the node they run
on, so a local run directory on a multi-node cluster must be on storage every node mounts (`ray.shared_storage:
true` says so); a plain local path is refused there. An object-store run directory (s3://, gs://, hdfs://, any
pyarrow URI) needs no shared file system, because what a stage's parts share goes through the store or through
Ray's object store, never through a path of the driver:
- what Ray's workers write or read themselves lives in the store: `embeddings/` and `assignments/` (WORKER_FOLDERS,
  written by Ray Data's tasks and actors, read by assignment tasks and shard actors by their URIs) and Ray Train's
  own state, `train/` and `refine/` (`RunDir.train_storage`);
- the model reaches the workers as objects: the embedding and assignment actors get the checkpoint the driver
  loaded through `ray.put`, and refinement's workers its weights;
- everything else is written and read by the driver alone (config.yaml, run.json, centroids.npy, cluster.json,
  metrics.json, model/, refined/, report/, sweep_k/): it is written in a staging folder of the driver's
  (`ray.staging_dir`, default the temp dir) and each completed folder uploaded as soon as its stage ends, its
  manifest last: on a store that cannot rename, a folder without its manifest is incomplete and never read as a
  result. A stage command on a URI downloads these completed entries first; the worker folders are read where
  they are.
`RunDir.folder` says where each stage folder is.
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
# Stage folders that Ray's workers write or read by path themselves; an object-store run keeps them in the store.
WORKER_FOLDERS = ("embeddings", "assignments")


def check_shared(run_dir: str | os.PathLike[str], ray_cfg: Any, nodes: int) -> None:
    """Refuse, on a multi-node cluster, a local run directory that is not declared shared (an object-store one
    needs no shared file system: see the module docstring)."""
    if nodes > 1 and storage.is_local(run_dir) and not ray_cfg.shared_storage:
        raise ConfigError(
            f"run directory {run_dir} (--out, RUN_DIR): a local path, but the Ray cluster has {nodes} nodes and "
            "their workers write the run's outputs where they run; use a shared path (NFS mounted on every node, "
            "with ray.shared_storage=true) or an object store URI (s3://bucket/runs/name, gs://..., hdfs://...)")


class RunDir:
    """A run directory as the stages see it: `local` is where the driver writes, `folder(name)` where a stage
    folder is; `publish()` uploads what the driver completed."""

    def __init__(self, location: str | Path, local: Path):
        self.location = location
        self.local = local
        self.remote = not storage.is_local(location)
        # Ray Train's state (train/, refine/) goes to the store itself, not through `local`: see train_encoder.
        self.train_storage = str(location) if self.remote else None
        self._published: dict[str, Any] = {}

    def folder(self, name: str) -> Path | str:
        """Where the stage folder `name` is: in the store for WORKER_FOLDERS of an object-store run, else in `local`."""
        return storage.join(self.location, name) if self.remote and name in WORKER_FOLDERS else self.local / name

    def fetch(self) -> None:
        """Copy a remote run's top-level files and complete folders (those with a manifest) into `local`, except
        the WORKER_FOLDERS, which are read in the store."""
        names = storage.files(self.location)
        folders = {n.split("/")[0] for n in names if n.endswith("/" + MANIFEST) and n.count("/") == 1}
        folders -= set(WORKER_FOLDERS)
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


def as_run_dir(run_dir: RunDir | str | os.PathLike[str]) -> RunDir:
    """A RunDir as it is; a local path as the run directory its stages write in place."""
    if isinstance(run_dir, RunDir):
        return run_dir
    if not storage.is_local(run_dir):
        raise ConfigError(f"{run_dir}: an object-store run directory is staged; open it with "
                          "engine.rundir.open_run_dir and give its RunDir to the stage")
    return RunDir(run_dir, Path(storage.resolve(run_dir)[1]) if storage.is_uri(run_dir) else Path(run_dir))


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
        yield as_run_dir(run_dir)
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
