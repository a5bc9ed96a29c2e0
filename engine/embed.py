"""Stream input shards through the encoder into embedding shards (`id`, `z`, `label`) with a Ray Data actor pool."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from engine.data.folders import commit_partial, completed_ids, partial_folder, write_shard
from engine.data.schema import ID, LABEL, X, Z, vector_array, vectors_to_numpy
from engine.train.checkpoint import FILENAME, check_input_dim, load_checkpoint

STAGE = "embed"
RECORD = pa.schema([("file", pa.string()), ("rows", pa.int64())])


class Embedder:
    """A Ray Data callable class: each actor builds the model once from `state`, a loaded checkpoint or a Ray
    object reference to one, and encodes batches; with `out_dir` (a partial folder) it writes each batch there
    as a shard and returns the shard's record instead.

    The driver loads the checkpoint and ships it through Ray's object store: an actor on another node never
    opens the driver's files, which that node may not have (an object-store run's staging folder).
    """

    def __init__(self, state: Any, use_gpu: bool = False, one_thread: bool = True, out_dir: str | None = None):
        import ray
        import torch

        from engine.runtime import compute_device
        from engine.train.checkpoint import model_from_checkpoint

        if isinstance(state, ray.ObjectRef):
            state = ray.get(state)
        self.device = compute_device("cuda" if use_gpu else "cpu")
        if self.device.type == "cpu" and one_thread:
            # One Ray CPU slot per actor: more intra-op threads would fight the other actors for cores.
            # In a user's own process (one_thread=False) the process's setting is left alone.
            torch.set_num_threads(1)
        self.model = model_from_checkpoint(state).eval().to(self.device)
        self.shift = state["input"]["shift"].to(self.device)
        self.scale = state["input"]["scale"].to(self.device)
        self.out_dir = out_dir

    def encode(self, x: np.ndarray) -> np.ndarray:
        import torch

        from engine.train.loop import to_device

        with torch.inference_mode():
            t = to_device(np.ascontiguousarray(x, dtype=np.float32), self.device)
            return self.model.encode((t - self.shift) * self.scale).float().cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.out_dir is not None and batch.num_rows == 0:
            return RECORD.empty_table()
        z = self.encode(vectors_to_numpy(batch.column(X)))
        cols: dict[str, Any] = {ID: batch.column(ID), Z: vector_array(z)}
        if LABEL in batch.column_names:
            cols[LABEL] = batch.column(LABEL)
        table = pa.table(cols)
        if self.out_dir is None:
            return table
        return pa.Table.from_pylist([write_shard(table, self.out_dir, prefix=STAGE)], schema=RECORD)


def _without_ids(batch: pa.Table, done: np.ndarray) -> pa.Table:
    """The rows of `batch` whose id is not in `done` (sorted): a binary search per row, not a hash set of every
    done id built again for each batch."""
    ids = batch.column(ID).to_numpy()
    found = done[np.minimum(np.searchsorted(done, ids), len(done) - 1)] == ids
    return batch.filter(pa.array(~found))


def _embedding_dim(state: dict[str, Any], dim: int) -> int:
    """Features of the model's embedding, found by encoding one row: not every model's is its latent_dim."""
    import torch

    from engine.train.checkpoint import model_from_checkpoint

    with torch.inference_mode():
        return int(model_from_checkpoint(state).eval().encode(torch.zeros(1, dim)).shape[1])


def embed_dataset(ds, checkpoint: str | Path, out_dir: str | Path, *, dim: int, expected_rows: int,
                  config_hash: str, batch_size: int = 4096, concurrency: int = 2, use_gpu: bool = False,
                  max_restarts: int = 3) -> dict[str, Any]:
    """Embed every row of `ds` (input schema) into `out_dir`, atomically; returns the manifest.

    Nothing is collected in the driver: input blocks stream through the actor pool, and each batch is
    written as a shard of the partial folder `.NAME.partial` with its completion record. A dead actor is
    replaced (up to `max_restarts` times) and its blocks redone, overwriting their own shards. After a
    crash, a rerun with the same checkpoint and config embeds only the rows no completed shard holds. The
    folder becomes `out_dir`, with its manifest, once every row is written. An object-store `out_dir` is
    written by Ray Data's tasks in place (`write_dataset`), without the partial folder.
    """
    from engine import storage
    from engine.data.folders import write_dataset

    checkpoint, state, latent = _checked(checkpoint, dim)
    pool = dict(state=state, batch_size=batch_size, concurrency=concurrency, use_gpu=use_gpu,
                max_restarts=max_restarts)
    if not storage.is_local(out_dir):
        return write_dataset(_embedded(ds, **pool), out_dir, stage=STAGE, config_hash=config_hash,
                             expected_rows=expected_rows, latent_dim=latent, checkpoint=checkpoint, resumed_rows=0)
    model_file = Path(checkpoint) / FILENAME if Path(checkpoint).is_dir() else Path(checkpoint)
    key = {"stage": STAGE, "config_hash": config_hash, "rows": expected_rows,
           "checkpoint_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest()}
    part = partial_folder(out_dir, key)
    done = completed_ids(part)
    if done.size:
        ds = ds.map_batches(_without_ids, fn_kwargs={"done": np.sort(done)}, batch_format="pyarrow")
    for _ in _embedded(ds, **pool, out_dir=str(part)).iter_batches(batch_size=None):
        pass  # the shards are on disk; the records only drive the stream
    return commit_partial(part, out_dir, stage=STAGE, config_hash=config_hash, expected_rows=expected_rows,
                          latent_dim=latent, checkpoint=checkpoint, resumed_rows=int(done.size))


def embed_rows(ds, checkpoint: str | Path, *, dim: int, batch_size: int = 4096, concurrency: int = 2,
               use_gpu: bool = False) -> pa.Table | None:
    """Every row of `ds` (input schema) embedded (`id`, `z`, `label`) and collected in this process, nothing
    written (None for no rows): for a caller that needs them all in memory and keeps no copy."""
    _, state, _ = _checked(checkpoint, dim)
    out = _embedded(ds, state=state, batch_size=batch_size, concurrency=concurrency, use_gpu=use_gpu)
    tables = list(out.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(tables) if tables else None


def _checked(checkpoint: str | Path, dim: int) -> tuple[str, dict[str, Any], int]:
    """(absolute path, loaded state, embedding size) of a checkpoint that takes `dim` input features."""
    checkpoint = str(Path(checkpoint).resolve())
    state = load_checkpoint(checkpoint)
    check_input_dim(state, dim, where=checkpoint)
    return checkpoint, state, _embedding_dim(state, dim)


def _embedded(ds, *, state: dict[str, Any], batch_size: int, concurrency: int, use_gpu: bool,
              max_restarts: int = 3, out_dir: str | None = None):
    """`ds` through a pool of Embedder actors (shard records instead of rows with `out_dir`); the checkpoint goes
    to them through Ray's object store."""
    import ray
    from ray.data import ActorPoolStrategy

    from engine.cluster.assignments import retries_as_remote_args

    with retries_as_remote_args():
        return ds.map_batches(
            Embedder,
            fn_constructor_kwargs={"state": ray.put(state), "use_gpu": use_gpu, "out_dir": out_dir},
            batch_size=batch_size,
            batch_format="pyarrow",
            # min_size=1: a small input with one block must not wait for the whole pool to start; initial_size: the
            # whole pool is asked for at once (over the cluster's nodes), not grown only under a sustained backlog.
            compute=ActorPoolStrategy(min_size=1, max_size=concurrency, initial_size=concurrency),
            num_cpus=1,
            num_gpus=1 if use_gpu else 0,
            **actor_retries(max_restarts),
        )


def actor_retries(max_restarts: int) -> dict[str, int]:
    """The fault tolerance of a Ray Data actor pool whose actors hold a model: each actor is replaced at most
    `max_restarts` times (Ray Data's default, unbounded, would retry a model that kills every actor forever), and a
    task waits for its actor's replacement however long that takes. A bounded task retry is not enough: when a node
    drops off abruptly, every call to its actors fails as "unavailable" within milliseconds, until the GCS declares
    the node dead seconds later, and a handful of retries is spent before the actor can move to a live node."""
    return {"max_restarts": max_restarts, "max_task_retries": -1}
