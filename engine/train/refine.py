"""DEC / IDEC refinement of a pretrained autoencoder: initial centres from a partition of its codes (k-means, or N2D's
UMAP + GMM), then Ray Train DDP steps against a target distribution that is recomputed from every row every
`update_interval` steps."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import REFINED_MODELS
from engine.data.folders import staged_folder, write_manifest
from engine.errors import ConfigError, DataError
from engine.models.dec import cluster_frequencies, kl_divergence, target_distribution
from engine.train.checkpoint import FILENAME, load_checkpoint

STAGE = "refine"
CENTERS = "centers.npy"
INITIAL_CENTERS = "initial_centers.npy"

ReduceSum = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the workers in place and returns it (all_reduce); the identity in one process."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


# ---- plain torch: the target update and the loop ---------------------------------------------------


@dataclass
class Target:
    p: torch.Tensor  # P's rows for this worker's rows
    labels: torch.Tensor  # argmax_j q_ij of this worker's rows
    record: dict[str, float]  # over every worker's rows: see update_target


@torch.no_grad()
def update_target(model: torch.nn.Module, x: torch.Tensor, *, previous: Target | None = None,
                  reduce_sum: ReduceSum = _local, chunk_rows: int = 8192) -> Target:
    """P for this worker's rows `x`, from Q over every row of every worker (f_j is all-reduced).

    The record, over all workers: `rows`; `kl_start`, KL(P || Q) per row with the new P; and given the
    previous target, `kl_end`, KL(P_previous || Q) (what the steps since that update lowered), and
    `label_change`, the fraction of rows whose argmax changed.
    """
    core = model.module if hasattr(model, "module") else model
    training = core.training
    core.eval()
    log_q = torch.cat([core.log_soft_assign(chunk) for chunk in x.split(chunk_rows)])
    core.train(training)
    q = log_q.exp()
    p = target_distribution(q, reduce_sum(cluster_frequencies(q)))
    labels = q.argmax(1)
    stats = [float(len(x)), float(kl_divergence(p, log_q, reduction="sum"))]
    if previous is not None:
        stats += [float(kl_divergence(previous.p, log_q, reduction="sum")),
                  float((labels != previous.labels).sum())]
    totals = reduce_sum(torch.tensor(stats, dtype=torch.float64, device=x.device)).tolist()
    rows = totals[0]
    record = {"rows": rows, "kl_start": totals[1] / rows}
    if previous is not None:
        record.update(kl_end=totals[2] / rows, label_change=totals[3] / rows)
    return Target(p=p, labels=labels, record=record)


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of `batch_size` (<= n) row indices, shuffled anew every pass over the rows; a pass's
    last rows are topped up with the next pass's first."""
    order, pos = torch.randperm(n, generator=generator), 0
    while True:
        if pos + batch_size <= n:
            yield order[pos:pos + batch_size]
            pos += batch_size
            continue
        rest = order[pos:]
        order, pos = torch.randperm(n, generator=generator), batch_size - len(rest)
        yield torch.cat([rest, order[:pos]])


def refine_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, *,
                update_interval: int, max_iter: int, tol: float, batch_size: int, seed: int = 0,
                reduce_sum: ReduceSum = _local,
                on_update: Callable[[dict[str, float]], None] | None = None) -> tuple[list[dict[str, float]], str]:
    """Steps on batches of this worker's rows `x` against P, recomputed from every row every `update_interval`
    steps and once more at the end.

    Stops at a target update where fewer than `tol` of the labels changed since the previous one ("tol"),
    or after `max_iter` steps ("max_iter"). Returns one record per target update (update_target's record,
    plus `iteration`, `update`, `seconds` and the loss terms averaged over the steps since the previous
    update) and why it stopped. Every worker takes the same decisions: they read all-reduced numbers.
    """
    core = model.module if hasattr(model, "module") else model
    batches = batch_indices(len(x), batch_size, torch.Generator().manual_seed(seed))
    history: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    target = None
    step, t0 = 0, time.perf_counter()
    model.train()
    while True:
        if step % update_interval == 0 or step == max_iter:
            target = update_target(model, x, previous=target, reduce_sum=reduce_sum)
            record = {"update": float(len(history) + 1), "iteration": float(step), **target.record,
                      **_means(sums, reduce_sum, x.device), "seconds": time.perf_counter() - t0}
            history.append(record)
            if on_update is not None:
                on_update(record)
            if record.get("label_change", math.inf) < tol:
                return history, "tol"
            if step >= max_iter:
                return history, "max_iter"
            sums, t0 = {}, time.perf_counter()
        idx = next(batches).to(x.device)
        optimizer.zero_grad(set_to_none=True)
        # The forward goes through the DDP wrapper (it arms the gradient all-reduce); the loss is the model's.
        loss, terms = core.loss(x[idx], forward=model, target=target.p[idx])
        loss.backward()
        optimizer.step()
        step += 1
        n = float(len(idx))
        for key, value in {"loss": float(loss.detach()), **terms}.items():
            sums[key] = sums.get(key, 0.0) + value * n
        sums["steps_rows"] = sums.get("steps_rows", 0.0) + n


def _means(sums: dict[str, float], reduce_sum: ReduceSum, device: torch.device) -> dict[str, float]:
    """Row-weighted means of the loss terms over every worker's steps since the last update."""
    if not sums:
        return {}
    keys = sorted(sums)
    totals = dict(zip(keys, reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                    device=device)).tolist(), strict=True))
    rows = totals.pop("steps_rows")
    return {k: v / rows for k, v in totals.items()}


# ---- Ray Train -------------------------------------------------------------------------------------


def _refine_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    from engine.data.schema import X, vectors_to_numpy
    from engine.models import build_model
    from engine.runtime import compute_device
    from engine.train.checkpoint import save_checkpoint
    from engine.train.loop import to_device
    from engine.train.trainer import placement

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    device = compute_device(ray.train.torch.get_device().type)

    model = build_model(**config["model"])
    model.autoencoder.load_state_dict(ray.get(config["pretrained"]))
    with torch.no_grad():
        model.centers.copy_(torch.as_tensor(np.asarray(config["centers"], dtype=np.float32)))
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config["lr"])

    shift = torch.as_tensor(np.asarray(config["shift"], dtype=np.float32), device=device)
    scale = torch.as_tensor(np.asarray(config["scale"], dtype=np.float32), device=device)
    # This worker's rows, read once and kept in a fixed order: P needs every one of them at each update.
    shard = ray.train.get_dataset_shard(f"shard_{rank}")
    parts = [vectors_to_numpy(b[X]) for b in shard.iter_batches(batch_size=65_536, batch_format="pyarrow")]
    x = (to_device(np.concatenate(parts), device) - shift) * scale

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            torch.distributed.all_reduce(t)
        return t

    queue = config.get("progress")

    def on_update(record: dict[str, float]) -> None:
        if rank == 0 and queue is not None:
            queue.put_nowait(dict(record))

    history, stopped = refine_loop(model, optimizer, x, update_interval=config["update_interval"],
                                   max_iter=config["max_iter"], tol=config["tol"], batch_size=config["batch_size"],
                                   seed=config["seed"] * 100_003 + rank, reduce_sum=reduce_sum, on_update=on_update)
    iterations = int(history[-1]["iteration"])
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            # The checkpoint's `epoch` counts refinement steps; its history holds one record per target update.
            save_checkpoint(Path(d) / FILENAME, model=model, shift=config["shift"], scale=config["scale"],
                            epoch=iterations, history=history, image_shape=config["image_shape"],
                            config_hash=config["config_hash"])
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"iterations": iterations, "updates": len(history), "stopped": stopped, **placement(device)},
                         checkpoint=checkpoint)


def refine_model(ds, *, pretrained: str | Path, centers: np.ndarray, name: str, refine: Any, num_workers: int,
                 seed: int, run_dir: str | Path, config_hash: str, use_gpu: bool = False, cpus_per_worker: float = 1.0,
                 placement_strategy: str = "PACK", initial: dict[str, Any] | None = None,
                 train_storage: str | None = None,
                 on_update: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Refine the train-stage model in `pretrained` with DEC or IDEC (`name`) from the initial `centers`.

    `ds` holds the input rows (column `x`); `refine` is a RefineConfig. Each of the `num_workers` workers
    holds an exact share of the rows (every row once). Writes `run_dir/refined/` atomically: checkpoint.pt
    (a dec / idec model: encode(x) is the refined encoder), centers.npy, initial_centers.npy and a manifest;
    Ray Train's own state goes to `run_dir/refine/`, or under `train_storage` (an object-store URI, the run's
    own) when given. Returns the summary with every update's record.
    """
    import ray
    import ray.train

    from engine.data.schema import X
    from engine.models import build_model
    from engine.train.trainer import build_trainer, progress_queue, ran_on

    if name not in REFINED_MODELS:
        raise ConfigError(f"model.name={name!r} cannot be refined; choose one of {list(REFINED_MODELS)}")
    state = load_checkpoint(pretrained)
    # The base is rebuilt from the pretrained checkpoint's own arguments, never from the config.
    base_args = dict(state["model"])
    base = base_args.pop("name")
    centers = np.ascontiguousarray(centers, dtype=np.float32)
    model_args = {"name": name, **base_args, "base": base, "n_clusters": int(len(centers)), "alpha": refine.alpha,
                  **({"gamma": refine.gamma} if name == "idec" else {})}
    model = build_model(**model_args)  # bad settings fail here, before any worker starts
    if centers.ndim != 2 or centers.shape != tuple(model.centers.shape):
        raise ConfigError(f"initial centres of shape {centers.shape} do not fit the model's "
                          f"{tuple(model.centers.shape)} (k x latent dimension)")
    ds = ds.select_columns([X])
    n = ds.count()
    if len(centers) > n:
        raise ConfigError(f"cluster.k={len(centers)} should be <= the number of rows ({n})")
    if num_workers > n:
        raise ConfigError(f"train.num_workers={num_workers} should be <= the number of rows ({n})")
    # Exact shares instead of Ray Train's equal split, which may drop rows: the target needs every row.
    shards = ds.split_at_indices([n * i // num_workers for i in range(1, num_workers)]) if num_workers > 1 else [ds]
    local_batch = max(1, min(refine.batch_size // num_workers, n // num_workers))
    run_dir = Path(run_dir).resolve()
    with progress_queue(on_update) as queue:
        trainer = build_trainer(
            _refine_loop_per_worker,
            {
                "model": model_args, "pretrained": ray.put(state["state_dict"]), "centers": centers.tolist(),
                "seed": seed, "lr": refine.lr, "batch_size": local_batch, "update_interval": refine.update_interval,
                "max_iter": refine.max_iter, "tol": refine.tol, "shift": state["input"]["shift"].tolist(),
                "scale": state["input"]["scale"].tolist(), "image_shape": state["input"]["image_shape"],
                "config_hash": config_hash, "progress": queue,
            },
            name=STAGE, state_root=train_storage or str(run_dir), num_workers=num_workers,
            cpus_per_worker=cpus_per_worker, use_gpu=use_gpu, placement_strategy=placement_strategy, num_to_keep=1,
            datasets={f"shard_{i}": shard for i, shard in enumerate(shards)},
            # Each worker reads its own whole share; nothing is split (or dropped) by Ray Train.
            dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("refinement finished without a checkpoint")
    refined_dir = run_dir / "refined"
    with result.checkpoint.as_directory() as d, staged_folder(refined_dir) as tmp:
        shutil.copy2(Path(d) / FILENAME, tmp / FILENAME)
        refined = load_checkpoint(tmp / FILENAME)
        np.save(tmp / CENTERS, refined["state_dict"]["centers"].numpy())
        np.save(tmp / INITIAL_CENTERS, centers)
        history = refined["history"]
        summary = {"model": name, "iterations": refined["epoch"], "updates": len(history),
                   "stopped": result.metrics["stopped"], "label_change": history[-1].get("label_change"),
                   "num_workers": num_workers, "use_gpu": use_gpu, "initial": initial or {},
                   **ran_on(result.metrics, use_gpu)}
        write_manifest(tmp, stage=STAGE, config_hash=config_hash, rows=int(history[-1]["rows"]),
                       files=[FILENAME, CENTERS, INITIAL_CENTERS], **summary)
    return {**summary, "rows": int(history[-1]["rows"]), "history": history}


def initial_centers(ds, pretrained: str | Path, *, dim: int, n_rows: int, cluster: Any, seed: int,
                    batch_size: int = 4096, concurrency: int = 2, use_gpu: bool = False, remote: bool = False,
                    callback: Callable[[dict[str, Any]], None] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The initial centres: the partition `cluster` (a ClusterConfig) makes of the pretrained encoder's embeddings
    of every row of `ds`, each centre its cluster's mean code.

    k-means without a manifold step, as DEC and IDEC do, gives its centroids. Any other method with k clusters
    (gmm, agglomerative), after a manifold step or not, is fitted in this process by `fit_labels` as the cluster
    stage fits it (N2D: UMAP, then a Gaussian mixture), and its clusters' mean codes are the centres: the
    refinement then starts from that partition (its Student-t assignment to the means, not the partition itself).

    The embeddings come back to this process, nothing is written: the clustering needs them all here anyway.
    Returns the centres and a summary of numbers (inertia: squared distances to the centres; iterations; ACC and NMI
    of the partition when the input has labels: the baseline the refinement starts from). With `remote` (a cluster
    that has or may launch GPUs, see `engine.runtime.offload`) the k-means runs in a Ray task with a GPU, not here,
    and `callback` gets no iterations.
    """
    from sklearn.metrics import normalized_mutual_info_score

    from engine.cluster.assignments import table_vectors
    from engine.embed import embed_rows
    from engine.metrics import clustering_accuracy

    table = embed_rows(ds, pretrained, dim=dim, batch_size=batch_size, concurrency=concurrency, use_gpu=use_gpu)
    where = f"the embeddings of {pretrained}"
    if table is None or table.num_rows != n_rows:
        raise DataError(f"{where}: {0 if table is None else table.num_rows} rows but the input has {n_rows}")
    _, z, labels = table_vectors(table, where=where)
    if cluster.method == "kmeans" and cluster.manifold == "none":
        params = dict(n_clusters=cluster.k, init=cluster.init, n_init=cluster.n_init, max_iter=cluster.max_iter,
                      tol=cluster.tol, seed=seed, backend=cluster.backend)
        if remote:
            import ray

            fit = ray.remote(num_cpus=1, num_gpus=1, max_retries=0)(_fit_kmeans)
            centers, inertia, n_iter, found = ray.get(fit.remote(ray.put(z), params))
        else:
            centers, inertia, n_iter, found = _fit_kmeans(z, params, callback)
        summary: dict[str, Any] = {"inertia": inertia, "n_iter": n_iter, "in_driver": not remote}
    else:
        centers, found, summary = _partition_means(z, cluster, seed, where)
    if labels is not None:
        summary.update(acc=clustering_accuracy(labels, found), nmi=float(normalized_mutual_info_score(labels, found)))
    return centers, summary


def _partition_means(z: np.ndarray, cluster: Any, seed: int, where: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(centres, labels, summary) of `cluster`'s partition of z fitted here by `fit_labels`: each centre its
    cluster's mean row."""
    from engine.cluster._in_memory import cluster_means, fit_labels

    found, facts = fit_labels(z, cluster, seed)
    if facts["n_clusters"] != cluster.k:
        # A Gaussian component that wins no row is dropped: the refinement needs k centres.
        raise DataError(f"{where}: {cluster.described} found {facts['n_clusters']} clusters, not "
                        f"cluster.k={cluster.k}; the refinement needs k initial centres: try another seed or "
                        f"cluster.n_init, or cluster.method kmeans")
    centers, distance = cluster_means(z, found)
    summary = {"inertia": float(np.square(distance, dtype=np.float64).sum()), "n_iter": int(facts.get("n_iter", 0)),
               "in_driver": True, "fit_seconds": facts["fit_seconds"]}
    return centers, found, summary


def _fit_kmeans(z: np.ndarray, params: dict[str, Any],
                callback: Callable[[dict[str, Any]], None] | None = None) -> tuple[np.ndarray, float, int, np.ndarray]:
    """(centres, inertia, iterations, labels) of the engine's KMeans on z; on a GPU when this process has one."""
    from engine.cluster import KMeans

    km = KMeans(**params, callback=callback).fit(z)
    return km.cluster_centers_, float(km.inertia_), int(km.n_iter_), km.labels_
