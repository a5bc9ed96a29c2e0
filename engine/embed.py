"""Stream input shards through the encoder into embedding shards (`id`, `z`, `label`) with a Ray Data actor pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from engine.data.schema import ID, LABEL, X, Z, vector_array, vectors_to_numpy
from engine.data.shards import write_dataset
from engine.train.checkpoint import check_input_dim, load_checkpoint

STAGE = "embed"


class Embedder:
    """A Ray Data callable class: each actor loads the checkpoint once and encodes batches."""

    def __init__(self, checkpoint: str, use_gpu: bool = False, one_thread: bool = True):
        import torch

        from engine.train.checkpoint import model_from_checkpoint

        state = load_checkpoint(checkpoint)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and one_thread:
            # One Ray CPU slot per actor: more intra-op threads would fight the other actors for cores.
            # In a user's own process (one_thread=False) the process's setting is left alone.
            torch.set_num_threads(1)
        self.model = model_from_checkpoint(state).eval().to(self.device)
        self.shift = state["input"]["shift"].to(self.device)
        self.scale = state["input"]["scale"].to(self.device)

    def encode(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            return self.model.encode((t - self.shift) * self.scale).float().cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        z = self.encode(vectors_to_numpy(batch.column(X)))
        cols: dict[str, Any] = {ID: batch.column(ID), Z: vector_array(z)}
        if LABEL in batch.column_names:
            cols[LABEL] = batch.column(LABEL)
        return pa.table(cols)


def _embedding_dim(state: dict[str, Any], dim: int) -> int:
    """Features of the model's embedding, found by encoding one row: not every model's is its latent_dim."""
    import torch

    from engine.train.checkpoint import model_from_checkpoint

    with torch.inference_mode():
        return int(model_from_checkpoint(state).eval().encode(torch.zeros(1, dim)).shape[1])


def embed_dataset(ds, checkpoint: str | Path, out_dir: str | Path, *, dim: int, expected_rows: int,
                  config_hash: str, batch_size: int = 4096, concurrency: int = 2,
                  use_gpu: bool = False) -> dict[str, Any]:
    """Embed every row of `ds` (input schema) into `out_dir`, atomically; returns the manifest.

    Nothing is collected in the driver: input blocks stream through the actor pool into Parquet.
    """
    checkpoint = str(Path(checkpoint).resolve())
    state = load_checkpoint(checkpoint)
    check_input_dim(state, dim, where=checkpoint)
    latent = _embedding_dim(state, dim)
    from ray.data import ActorPoolStrategy

    out = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "use_gpu": use_gpu},
        batch_size=batch_size,
        batch_format="pyarrow",
        # min_size=1: a small input with one block must not wait for the whole pool to start; initial_size: the
        # whole pool is asked for at once (over the cluster's nodes), not grown only under a sustained backlog.
        compute=ActorPoolStrategy(min_size=1, max_size=concurrency, initial_size=concurrency),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )
    return write_dataset(out, out_dir, stage=STAGE, config_hash=config_hash, expected_rows=expected_rows,
                         latent_dim=latent, checkpoint=checkpoint)

