"""`dce federate`: a config's partitions clustered by FederatedKMeans, the results written to the run directory.

Writes `config.yaml`, `centroids.npy`, `federated/` (`rounds.jsonl`: one record per round, `summary.json`: the
run, its partitions and what it spent) and, in experiment mode with labels, `metrics.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine import storage
from engine.config import PipelineConfig
from engine.errors import ConfigError, DataError
from engine.progress import Progress

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
STAGE = "federated"


@dataclass
class FederatedPartitions:
    """What the config's partitions are, before any client starts."""

    partitions: dict[str, Any]  # name -> array (simulated) or ParquetPartition
    report: dict[str, dict[str, Any]]  # name -> rows and label counts, where the driver knows them
    pooled: np.ndarray | None = None  # simulated: every partition's rows, in partition order
    labels: np.ndarray | None = None  # simulated: their labels, when the source has labels
    server_points: np.ndarray | None = None  # simulated with server_rows: the held-out server-side rows


@dataclass
class FederatedResult:
    run_dir: Path
    summary: dict[str, Any]


def build_partitions(cfg: PipelineConfig) -> FederatedPartitions:
    """The partitions the config describes; checks what it can without Ray (files, columns, split settings)."""
    from engine.federated.partitions import partitions_from_column, partitions_from_folders

    p = cfg.federated.partitions
    if p.by == "simulate":
        return _simulate(cfg)
    if cfg.data.source != "parquet":
        raise ConfigError(f"federated.partitions.by={p.by} reads Parquet partitions where they are; data.source is "
                          f"'{cfg.data.source}' (use data.source=parquet, or by=simulate)")
    if cfg.data.normalize != "none":
        raise ConfigError(f"data.normalize={cfg.data.normalize} needs statistics of the pooled data, which "
                          "federated partitions do not share; set data.normalize=none")
    if p.by == "column":
        parts = partitions_from_column(cfg.data.path, p.column, vector_column=cfg.data.column,
                                       label_column=cfg.data.label_column)
    else:
        parts = partitions_from_folders(cfg.data.path, vector_column=cfg.data.column,
                                        label_column=cfg.data.label_column)
    # Real partitions report their own sizes and label counts, from their clients.
    return FederatedPartitions(parts, {name: {} for name in parts})


def _simulate(cfg: PipelineConfig) -> FederatedPartitions:
    from engine.data.describe import normalisation
    from engine.federated.partitions import label_counts, split_indices

    x, labels = read_source(cfg.data)
    if cfg.data.normalize != "none":
        x64 = x.astype(np.float64)
        shift, scale = normalisation(cfg.data.normalize, n=len(x), s=x64.sum(0), sq=(x64 * x64).sum(0),
                                     lo=x.min(0), hi=x.max(0))
        x = ((x - shift) * scale).astype(np.float32)
    p, f = cfg.federated.partitions, cfg.federated
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1,)))
    server_points = None
    if p.server_rows:
        if p.server_rows >= len(x):
            raise ConfigError(f"federated.partitions.server_rows={p.server_rows} should be < the rows of the data "
                              f"({len(x)})")
        held = np.zeros(len(x), dtype=bool)
        held[rng.choice(len(x), size=p.server_rows, replace=False)] = True
        server_points, x = x[held], x[~held]
        labels = labels[~held] if labels is not None else None
    needs_local_k = f.mode == "one_shot" or (f.init_points is None and not p.server_rows)
    min_rows = (f.local_k or cfg.cluster.k) if needs_local_k else 1
    try:
        split = split_indices(len(x), p.n_partitions, split=p.split, labels=labels, alpha=p.alpha,
                              clusters_per_partition=p.clusters_per_partition, seed=cfg.seed, min_rows=min_rows)
    except ConfigError as e:
        raise ConfigError(f"federated.partitions: {e}") from None
    partitions = {name: x[rows] for name, rows in split.items()}
    report = {name: {"rows": int(len(rows)), "labels": label_counts(labels[rows] if labels is not None else None)}
              for name, rows in split.items()}
    order = np.concatenate(list(split.values()))
    return FederatedPartitions(partitions, report, x[order], labels[order] if labels is not None else None,
                               server_points)


def read_source(data_cfg: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Every row (float32) and label (or None) of a configured source, read in this process."""
    import pyarrow as pa

    from engine.data.schema import LABEL, X, vectors_to_numpy
    from engine.data.sources import open_source, read_shard

    source = open_source(data_cfg)
    table = pa.concat_tables([read_shard(data_cfg, spec) for spec in source.specs])
    x = vectors_to_numpy(table.column(X), name=X, where=data_cfg.source)
    labels = table.column(LABEL).to_numpy() if LABEL in table.column_names else None
    return x, labels


def _init(cfg: PipelineConfig, built: FederatedPartitions) -> str | np.ndarray:
    path = cfg.federated.init_points
    if path is not None:
        if not Path(path).is_file():
            raise DataError(f"federated.init_points: {path}: file not found")
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"federated.init_points: {path}: not a readable .npy file ({e})") from None
    if built.server_points is not None:
        return built.server_points
    return "k-means++"


def run_federated(cfg: PipelineConfig, out: str | Path | None = None, *, progress: Progress | None = None,
                  verbose: bool = False, overwrite: bool = False, grid: Any = None) -> FederatedResult:
    """Build the partitions, fit FederatedKMeans over them, and write the run directory (checked first by
    engine.rundir's output-path policy; `overwrite` replaces the engine's own results in it).

    With federated.backend=flower and flower.address, this process only submits the Flower app to the SuperLink
    and waits: the ServerApp there calls this function again with its `grid` (the SuperNodes' partitions)."""
    from engine.rundir import check_output, guard_output, run_dir_for
    from engine.runtime import init_ray

    progress = progress or Progress()
    f = cfg.federated
    run_dir = run_dir_for(cfg, out)
    started = time.perf_counter()
    deployed = f.backend == "flower" and f.flower.address is not None
    output = check_output(cfg, run_dir, overwrite=overwrite, resume_command=None)  # first: no partition read to refuse
    built = FederatedPartitions({}, {}) if deployed else build_partitions(cfg)
    init = _init(cfg, built)
    if deployed and grid is None:
        return _submit(cfg, run_dir, overwrite, progress)
    compare = built.pooled is not None if f.compare_centralised == "auto" else f.compare_centralised
    if f.backend == "ray":
        with progress.stage("ray"):
            progress.info(init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,
                                   verbose=verbose).describe())

    def on_round(record: dict[str, Any]) -> None:
        inertia = "n/a" if record["objective"] is None else f"{record['objective']:.6g}"
        dropped = f", dropped {', '.join(record['dropped'])}" if record["dropped"] else ""
        progress.info(f"round {record['round']} {record['kind']}: inertia {inertia}, "
                      f"{len(record['participants'])} client(s){dropped}")

    # Imported once the input and the output are checked: the server side imports scikit-learn and torch (~2 s),
    # which a refused command need not wait for.
    from engine.federated import FederatedKMeans

    km = FederatedKMeans(
        cfg.cluster.k, mode=f.mode, local_k=f.local_k, max_rounds=f.max_rounds, tol=cfg.cluster.tol,
        local_steps=f.local_steps, local_max_iter=cfg.cluster.max_iter, init=init, privacy=f.privacy,
        secure_aggregation=f.secure_aggregation, secure_neighbours=f.secure_neighbours,
        dropout_recovery=f.dropout_recovery, clients_per_actor=f.clients_per_actor,
        placement=None if f.placement == "any" else f.placement, quorum=f.quorum, round_timeout=f.round_timeout,
        compare_centralised=compare, backend=cfg.cluster.backend, callback=on_round, seed=cfg.seed,
        transport="flower" if f.backend == "flower" else "ray",
    )
    if grid is not None:
        from engine.federated.flower import FlowerTransport

        with progress.stage("federate", f"{f.mode}, k={cfg.cluster.k}, Flower SuperNodes"):
            km.fit_transport(FlowerTransport.start(grid, km.client_args(), nodes=f.flower.nodes, wait=f.flower.wait,
                                                   **km.transport_options()))
    else:
        with progress.stage("federate", f"{f.mode}, k={cfg.cluster.k}, {len(built.partitions)} partition(s)"):
            km.fit(built.partitions)
    summary = _summary(cfg, km, built, time.perf_counter() - started)
    progress.info("partitions: " + ", ".join(
        f"{name} {p['rows']} rows" + (f" / {len(p['labels'])} labels" if p["labels"] else "")
        for name, p in summary["partitions"].items()))
    from engine.rundir import open_run_dir

    # Only this process writes the outputs, so any local path will do; an object-store URI is staged and uploaded.
    with guard_output(output, resumable=False), open_run_dir(run_dir, cfg.ray, nodes=1) as run:
        _write(cfg, run.local, km, built, summary)
    return FederatedResult(run_dir, summary)


def _submit(cfg: PipelineConfig, run_dir: Path, overwrite: bool, progress: Progress) -> FederatedResult:
    """Submit the Flower app to the SuperLink and wait for its ServerApp, which writes the run directory."""
    from engine.federated import flower

    fl = cfg.federated.flower
    flower.check_address(fl.address, fl.connect_timeout, insecure=fl.insecure, root_certificates=fl.root_certificates)
    with progress.stage("flower", f"SuperLink {fl.address}"):
        flower.submit(fl.address, {
            flower.RUN_CONFIG: cfg.model_dump_json(), flower.RUN_OUT: str(Path(run_dir).resolve()),
            flower.RUN_OVERWRITE: overwrite}, insecure=fl.insecure, root_certificates=fl.root_certificates,
            log=progress.info)
    summary_path = Path(run_dir) / STAGE / SUMMARY_FILE
    if not summary_path.is_file():
        raise DataError(f"federated.flower.address={fl.address}: the Flower run ended without writing {summary_path} "
                        "(its ServerApp failed, or writes on the SuperLink's host: see the SuperLink's log)")
    return FederatedResult(run_dir, json.loads(summary_path.read_text()))


def _partitions_from(cfg: PipelineConfig) -> dict[str, Any]:
    p = cfg.federated.partitions
    if p.by == "simulate":
        return p.model_dump()
    if p.by == "nodes":
        return {"by": p.by, "superlink": cfg.federated.flower.address}
    return {"by": p.by, "path": cfg.data.path}


def _summary(cfg: PipelineConfig, km: Any, built: FederatedPartitions, seconds: float) -> dict[str, Any]:
    partitions = {}
    for name, info in km.partitions_.items():
        labels = info.get("labels") or built.report.get(name, {}).get("labels")
        partitions[name] = {"rows": info["rows"], "dim": info["dim"], "node_id": info["node_id"], "labels": labels}
    return {
        "mode": cfg.federated.mode,
        "k": cfg.cluster.k,
        "partitions_from": _partitions_from(cfg),
        "partitions": partitions,
        "rounds": int(km.n_rounds_),
        "inertia": km.inertia_,
        "bytes_down": int(km.bytes_down_),
        "bytes_up": int(km.bytes_up_),
        "dropouts": {str(r["round"]): r["dropped"] for r in km.history_ if r["dropped"]},
        "secure_aggregation": cfg.federated.secure_aggregation,
        "dropout_recovery": cfg.federated.dropout_recovery,
        "privacy": km.privacy_spent_,
        "min_count": cfg.federated.privacy.min_count,
        "reference": km.reference_,
        "seconds": round(seconds, 3),
    }


def _write(cfg: PipelineConfig, run_dir: Path, km: Any, built: FederatedPartitions, summary: dict[str, Any]) -> None:
    from engine.data.folders import staged_folder, write_manifest
    from engine.metrics import evaluate
    from engine.rundir import save_config

    save_config(cfg, run_dir)
    storage.write_npy(run_dir / "centroids.npy", km.cluster_centers_)
    with staged_folder(run_dir / STAGE) as folder:
        (folder / ROUNDS_FILE).write_text("".join(json.dumps(r, default=float) + "\n" for r in km.history_))
        (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=float))
        write_manifest(folder, stage=STAGE, config_hash=cfg.hash(), rows=int(km.n_samples_),
                       files=[ROUNDS_FILE, SUMMARY_FILE], rounds=len(km.history_))
    if built.pooled is not None and built.labels is not None:
        metrics = evaluate(km.predict(built.pooled), labels_true=built.labels, X=built.pooled, inertia=km.inertia_,
                           silhouette_sample=cfg.evaluate.silhouette_sample, seed=cfg.seed)
        storage.write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
