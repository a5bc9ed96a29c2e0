"""New rows into a finished run's clusters: its model, its input normalisation and its centroids.

`load_run(RUN_DIR).assign(X)` does it in this process; `assign_source` streams a Parquet or .npy input through
a Ray Data actor pool into `id, cluster, distance` shards (`dce assign`). Both run the same `Assigner`: the
embed stage's encoder (`Embedder`, which applies the normalisation stored in the checkpoint) and the assign
stage's nearest-centroid step (`assign_batch`), or for a run clustered by `cluster.method: posterior` the model's
own q(c|x) (`label_by_posterior`, as the cluster stage labelled), so the training rows get exactly the run's own
labels. RUN_DIR is
a local path or an object-store URI; it is read in this process, and the actors get the loaded model through
Ray's object store.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from engine import storage
from engine.data.schema import CLUSTER, DISTANCE, ID, X, Z, check_finite, vector_array, vectors_to_numpy
from engine.errors import CheckpointError, ConfigError, DataError, IncompleteResultError
from engine.methods import CENTROID_METHODS


class Assigner:
    """Embed a batch of input rows (`id`, `x`) with the run's model, then label each with its nearest centroid.

    A Ray Data callable class (each actor builds the model once from `state`, a loaded checkpoint or a Ray object
    reference to one, see `Embedder`) and the in-process path of `Run.assign`; `checkpoint` names it in errors.
    `posterior`: label by the model's q(c|x) instead (a `cluster.method: posterior` run; `centroids` are then the
    model's component means, the distances' reference).
    """

    def __init__(self, state: Any, centroids: np.ndarray, *, checkpoint: str, backend: str = "auto",
                 spherical: bool = False, use_gpu: bool = False, one_thread: bool = True, where: str = "input",
                 posterior: bool = False):
        from engine.embed import Embedder

        self.embedder = Embedder(state, use_gpu=use_gpu, one_thread=one_thread)
        self.in_dim = int(self.embedder.shift.shape[0])
        self.checkpoint = checkpoint
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.backend, self.spherical, self.where, self.posterior = backend, spherical, where, posterior

    def __call__(self, batch: pa.Table) -> pa.Table:
        from engine.cluster.assignments import assign_batch

        # Writable: Arrow's zero-copy buffers are read-only, which torch.from_numpy warns about.
        x = np.require(vectors_to_numpy(batch.column(X), name=X, where=self.where), requirements="W")
        if x.shape[1] != self.in_dim:
            raise DataError(f"{self.where}: column '{X}' has {x.shape[1]} features but the run's model "
                            f"({self.checkpoint}) takes {self.in_dim}")
        z = self.embedder.encode(x)
        if self.posterior:
            from engine.posterior import label_by_posterior

            labels, distances = label_by_posterior(self.embedder.model, z)
            return pa.table({ID: batch.column(ID), CLUSTER: pa.array(labels), DISTANCE: pa.array(distances)})
        return assign_batch(pa.table({ID: batch.column(ID), Z: vector_array(z)}), self.centroids,
                            backend=self.backend, spherical=self.spherical)


class Run:
    """A finished run, loaded to assign new rows: config, model checkpoint (where it is and its loaded `state`)
    and centroids (see `load_run`); `posterior`: the run labelled rows by its model's q(c|x), and so does `assign`."""

    def __init__(self, run_dir: str | Path, config: Any, checkpoint: str, state: dict[str, Any],
                 centroids: np.ndarray, posterior: bool = False):
        self.run_dir = run_dir
        self.posterior = posterior
        self.config = config
        self.checkpoint = checkpoint
        self.state = state
        self.centroids = centroids
        self.in_dim = int(state["model"]["in_dim"])
        self._assigner: Assigner | None = None

    def assign(self, rows: Any, batch_size: int | None = None) -> np.ndarray:
        """Cluster labels (n,) int32 of `rows`, a (n, features) matrix or (n, h, w) images of raw input as the
        run's data source gave it (the run's normalisation is applied here): the nearest centroid in the
        latent space (the most probable component of the model's q(c|x) for a `cluster.method: posterior` run), as
        the run's own assign stage gives it."""
        x = np.asarray(rows, dtype=np.float32)
        if x.ndim > 2:
            x = x.reshape(len(x), -1)
        if x.ndim != 2:
            raise DataError(f"the rows to assign should be a (rows, features) matrix, got shape {x.shape}")
        if x.shape[1] != self.in_dim:
            raise DataError(f"the rows to assign have {x.shape[1]} features but the run's model ({self.checkpoint}) "
                            f"takes {self.in_dim}")
        check_finite(x, name="rows", where="rows to assign")
        if self._assigner is None:
            c = self.config.cluster
            self._assigner = Assigner(self.state, self.centroids, checkpoint=self.checkpoint, backend=c.backend,
                                      spherical=c.spherical, one_thread=False, where="rows to assign",
                                      posterior=self.posterior)
        step = batch_size or self.config.embed.plan(0)[0]  # in this process, on its CPU
        labels = np.empty(len(x), dtype=np.int32)
        for start in range(0, len(x), step):
            part = x[start:start + step]
            batch = pa.table({ID: pa.array(np.arange(start, start + len(part), dtype=np.int64)),
                              X: vector_array(part)})
            labels[start:start + len(part)] = self._assigner(batch).column(CLUSTER).to_numpy()
        return labels


def load_run(run_dir: str | Path) -> Run:
    """Open a finished run to assign new rows; refuses what cannot give the run's own labels.

    A `cluster.method: posterior` run (VaDE) assigns by its model's q(c|x), as its cluster stage did.
    Errors name the file or setting: a folder that is no run (no config.yaml), a method whose labels are not
    "nearest centroid" nor the model's posterior (cluster.method gmm, agglomerative, hdbscan, dbscan, or
    cluster.manifold umap: the run keeps their labels, not a fitted model), a missing or unfinished model/
    (refined/ for dec, idec), assignments/ or centroids.npy, results written by another engine version, centroids
    of another latent size.
    `run_dir` is a local path or an object-store URI.
    """
    from engine.rundir import load_run_config, model_folder
    from engine.train.checkpoint import FILENAME, load_checkpoint

    cfg = load_run_config(run_dir)
    posterior = False
    if not cfg.model.refines:
        # What the clustering was: cluster.json, written by the cluster stage (`dce cluster RUN --set ...` may have
        # re-clustered with other settings than config.yaml's); the config for runs from before it was recorded.
        method, manifold = clustered_with(run_dir, cfg)
        posterior = method == "posterior"
        if method not in CENTROID_METHODS and not posterior:
            raise ConfigError(
                f"{run_dir}: cluster.method={method} labels rows without centroids to assign new rows to, and the "
                f"run keeps no fitted {method}, only its labels; assigning new rows needs cluster.method "
                f"{', '.join(CENTROID_METHODS)} or posterior (or model.name dec / idec)")
        if manifold != "none":
            raise ConfigError(f"{run_dir}: cluster.manifold={manifold}: the run clustered a {manifold} reduction "
                              f"it does not keep, so new rows cannot be placed in it; assigning new rows needs "
                              f"cluster.manifold none")
    name, stage = model_folder(cfg)
    model_dir = storage.join(run_dir, name)
    check_manifest(model_dir, stage)
    check_manifest(storage.join(run_dir, "assignments"), "assign")
    checkpoint = storage.join(model_dir, FILENAME)
    state = load_checkpoint(checkpoint)
    path = storage.join(run_dir, "centroids.npy")
    if not storage.is_file(path):
        raise IncompleteResultError(f"{path}: not found; cluster the run first (dce cluster {run_dir})")
    try:
        centroids = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npy file ({e})") from None
    latent = state["model"].get("latent_dim")
    if centroids.ndim != 2 or (latent is not None and centroids.shape[1] != int(latent)):
        raise CheckpointError(f"{path}: centroids of shape {centroids.shape} do not fit the model's latent "
                              f"dimension {latent} ({checkpoint})")
    return Run(run_dir, cfg, checkpoint, state, centroids, posterior=posterior)


def clustered_with(run_dir: str | Path, cfg: Any) -> tuple[str, str]:
    """(cluster.method, cluster.manifold) of the run's last clustering, from its cluster.json (from the config for
    a run whose cluster.json predates the manifold's record)."""
    import json

    path = storage.join(run_dir, "cluster.json")
    summary = json.loads(storage.read_text(path)) if storage.is_file(path) else {}
    return summary.get("method", cfg.cluster.method), summary.get("manifold", cfg.cluster.manifold)


def check_manifest(folder: str | Path, stage: str) -> dict[str, Any]:
    """The manifest of a complete result folder written by this engine version, else an error naming it."""
    from engine.data import read_manifest
    from engine.data.folders import MANIFEST
    from engine.version import __version__

    manifest = read_manifest(folder, stage=stage)
    version = manifest.get("engine_version")
    if version != __version__:
        raise CheckpointError(f"{storage.join(folder, MANIFEST)}: written by engine version {version}, this is "
                              f"{__version__}; rerun the run's stages with this version")
    return manifest


def input_source(path: str | Path, *, column: str = X, id_column: str | None = ID) -> Any:
    """The data source config of new rows: a .npy matrix (or images), else Parquet (a file, folder or glob)."""
    from engine.config import NpySource, ParquetSource

    if str(path).endswith(".npy"):
        return NpySource(path=str(path))
    return ParquetSource(path=str(path), column=column, id_column=id_column)


def open_new_rows(run: Run, data: Any) -> Any:
    """Open the source of new rows (file and column checks) and check its width against the run's model, before
    any compute; returns the opened `Source`."""
    from engine.data import open_source, read_shard

    source = open_source(data)
    # Parquet list columns: the first row group tells. A wrong width found later, inside a Ray Data actor,
    # would reach the user wrapped in Ray's exceptions instead of as one line.
    dim = source.dim if source.dim is not None else read_shard(data, source.specs[0]).column(X).type.list_size
    if dim != run.in_dim:
        raise DataError(f"{data.path}: the rows have {dim} features but the run's model ({run.checkpoint}) takes "
                        f"{run.in_dim}")
    return source


def check_assign_output(run_dir: str | Path, data: Any, out_dir: str | Path, *, overwrite: bool = False) -> None:
    """`out_dir` may take the assignments of the new rows `data` (a source config, `input_source`) to the run in
    `run_dir` (engine.rundir's output-path policy): new, empty, or with `overwrite` a result of the engine; never
    the run directory or the input, nor inside them. Needs neither the run's model nor the rows, so `dce assign`
    refuses an output before it loads them (torch's import alone takes ~1 s)."""
    from engine.rundir import check_folder_output

    check_folder_output(out_dir, overwrite=overwrite, inputs=[run_dir, data.path])


def assign_source(run: Run, source: Any, out_dir: str | Path, *, batch_size: int | None = None,
                  concurrency: int | None = None, use_gpu: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Embed and assign every row of an opened source (`open_new_rows`) into `out_dir` (`id`, `cluster`,
    `distance`; a local path or an object-store URI), streaming through a Ray Data actor pool, atomically with a
    manifest; returns the manifest. `out_dir` is checked first (`check_assign_output`)."""
    import ray
    from ray.data import ActorPoolStrategy

    from engine.cluster.assignments import retries_as_remote_args
    from engine.data import read_dataset, write_dataset
    from engine.embed import actor_retries

    check_assign_output(run.run_dir, source.config, out_dir, overwrite=overwrite)
    c, where = run.config.cluster, str(source.config.path)
    from engine.runtime import gpus_possible

    plan = run.config.embed.plan(gpus_possible() if use_gpu else 0)
    with retries_as_remote_args():
        out = read_dataset(source).map_batches(
            Assigner,
            fn_constructor_kwargs={"state": ray.put(run.state), "centroids": run.centroids,
                                   "checkpoint": run.checkpoint, "backend": c.backend, "spherical": c.spherical,
                                   "use_gpu": use_gpu, "where": where, "posterior": run.posterior},
            batch_size=batch_size or plan[0],
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=concurrency or plan[1]),
            num_cpus=1,
            num_gpus=1 if use_gpu else 0,
            **actor_retries(run.config.embed.max_restarts),
        )
    return write_dataset(out, out_dir, stage="assign", config_hash=run.config.hash(), expected_rows=source.n_rows,
                         k=int(len(run.centroids)), run_dir=str(run.run_dir), input=where)
