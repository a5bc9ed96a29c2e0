"""Choosing k: the engine's k-means on a run's embeddings for each k of a range, scored by inertia and the
internal indices, with a plot and a suggested k.

The suggested k is the one with the highest silhouette (on a seeded sample of `evaluate.silhouette_sample`
rows); ties go to the smaller k. The silhouette weighs how tight each cluster is against how far the next one
is, so unlike the inertia it does not keep improving as k grows, and on well separated groups it peaks at their
number. Inertia (for the elbow), Davies-Bouldin (lower is better) and Calinski-Harabasz (higher is better) are
reported beside it, not used by the rule.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ConfigError
from engine.rundir import RunDir, as_run_dir

RULE = "highest silhouette (sampled); ties go to the smaller k"
SWEEP_DIR = "sweep_k"
# Estimated multiply-adds one Ray task should hold at least: below it, starting one more worker process (and its
# torch import, seconds on a small machine) costs more than running its ks in a task already started.
MIN_TASK_WORK = 5e9
LLOYD_ITERATIONS = 20  # typical iterations of one k-means run, for the work estimate only


def parse_k_range(text: str) -> list[int]:
    """`2..30` (inclusive), `2,4,8` or `5` as a sorted list of distinct ks."""
    text = text.strip()
    m = re.fullmatch(r"(\d+)\s*\.\.\s*(\d+)", text)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise ConfigError(f"--k {text}: the range is empty ({lo} > {hi})")
        return list(range(lo, hi + 1))
    if re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        return sorted({int(p) for p in text.split(",")})
    raise ConfigError(f"--k {text!r} should be a range like 2..30 or a list like 2,4,8")


def check_ks(ks: list[int], n_rows: int) -> None:
    """Every k needs 2 <= k < rows: the silhouette is defined only between those."""
    if not ks:
        raise ConfigError("--k names no k")
    if ks[0] < 2 or ks[-1] >= n_rows:
        bad = ks[0] if ks[0] < 2 else ks[-1]
        raise ConfigError(f"--k: k={bad} should be >= 2 and < the number of embeddings ({n_rows})")


def score_k(z: np.ndarray, k: int, *, n_init: int, max_iter: int, tol: float, seed: int, backend: str,
            spherical: bool, silhouette_sample: int) -> dict[str, Any]:
    """Fit `engine.KMeans` with k clusters and score it: inertia, silhouette, Davies-Bouldin, Calinski-Harabasz."""
    from engine.cluster import KMeans
    from engine.metrics import evaluate

    t0 = time.perf_counter()
    km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, backend=backend,
                spherical=spherical).fit(z)
    x = z / np.linalg.norm(z, axis=1, keepdims=True) if spherical else z
    m = evaluate(km.labels_, X=x, silhouette_sample=silhouette_sample, seed=seed)
    return {"k": k, "inertia": float(km.inertia_), "silhouette": m["silhouette"],
            "davies_bouldin": m["davies_bouldin"], "calinski_harabasz": m["calinski_harabasz"],
            "n_iter": int(km.n_iter_), "seconds": round(time.perf_counter() - t0, 3)}


def suggest_k(results: list[dict[str, Any]]) -> int | None:
    """The k of the highest silhouette, the smaller k on ties; None when no k has one."""
    scored = [r for r in results if r["silhouette"] is not None]
    if not scored:
        return None
    return min(scored, key=lambda r: (-r["silhouette"], r["k"]))["k"]


def score_ks(z: np.ndarray, ks: list[int], **options: Any) -> list[dict[str, Any]]:
    """`score_k` for each k, one after the other (the body of one Ray task)."""
    return [score_k(z, k, **options) for k in ks]


def task_groups(ks: list[int], n_rows: int, dim: int, n_init: int, parallel: int) -> list[list[int]]:
    """The ks split over at most `parallel` tasks, fewer when the work is small (see MIN_TASK_WORK); round robin,
    so each task gets small and large ks alike."""
    work = sum(n_rows * dim * k * n_init * LLOYD_ITERATIONS for k in ks)
    n_tasks = max(1, min(len(ks), parallel, int(work // MIN_TASK_WORK)))
    return [ks[i::n_tasks] for i in range(n_tasks)]


def sweep_k(z: np.ndarray, ks: list[int], *, n_init: int = 3, max_iter: int = 100, tol: float = 1e-4,
            seed: int = 0, backend: str = "auto", spherical: bool = False, silhouette_sample: int = 10_000,
            use_gpu: bool = False,
            on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Score every k of `ks` on z with Ray tasks on the connected Ray (started if none): z is put in the object
    store once and every task reads that copy; the ks are spread over up to one task per CPU of the cluster (per
    GPU it has or its autoscaler may launch, each task taking one, with `use_gpu`), fewer when the data are small.
    Returns {"rule", "suggested_k", "results"}."""
    import ray

    ks = sorted(ks)
    check_ks(ks, len(z))
    z = np.ascontiguousarray(z, dtype=np.float32)
    from engine.runtime import gpus_possible

    score = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(score_ks)
    ref = ray.put(z)
    options = dict(n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, backend=backend, spherical=spherical,
                   silhouette_sample=silhouette_sample)
    slots = gpus_possible() if use_gpu else ray.cluster_resources().get("CPU", 1)
    groups = task_groups(ks, len(z), z.shape[1], n_init, max(1, int(slots)))
    pending = [score.remote(ref, group, **options) for group in groups]
    results = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for result in ray.get(done[0]):
            results.append(result)
            if on_result is not None:
                on_result(result)
    results.sort(key=lambda r: r["k"])
    return {"rule": RULE, "suggested_k": suggest_k(results), "results": results}


def plot_sweep(sweep: dict[str, Any], path: Path) -> None:
    """Inertia (elbow), silhouette, Davies-Bouldin and Calinski-Harabasz against k, the suggested k marked."""
    from matplotlib.figure import Figure

    results, best = sweep["results"], sweep["suggested_k"]
    ks = [r["k"] for r in results]
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    panels = [("inertia", "inertia (elbow)"), ("silhouette", "silhouette (higher is better)"),
              ("davies_bouldin", "Davies-Bouldin (lower is better)"),
              ("calinski_harabasz", "Calinski-Harabasz (higher is better)")]
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        ax.plot(ks, [np.nan if r[key] is None else r[key] for r in results], marker="o", ms=3)
        if best is not None:
            ax.axvline(best, color="tab:red", ls="--", lw=1, label=f"suggested k = {best}")
            ax.legend(frameon=False, fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    fig.savefig(path, format="png", dpi=100)


def sweep_run(run_dir: RunDir | str | Path, cfg: Any, ks: list[int], *,
              on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Sweep k over `run_dir/embeddings` with the run's cluster settings (n_init, max_iter, tol, backend,
    spherical) and write `run_dir/sweep_k/` (sweep_k.json, sweep_k.png, manifest) atomically."""
    from engine.cluster.assignments import load_vectors
    from engine.data.folders import staged_folder, write_manifest
    from engine.runtime import use_gpu

    run = as_run_dir(run_dir)
    _, z, _ = load_vectors(run.folder("embeddings"))
    check_ks(sorted(ks), len(z))
    c = cfg.cluster
    sweep = sweep_k(z, ks, n_init=c.n_init, max_iter=c.max_iter, tol=c.tol, seed=cfg.seed, backend=c.backend,
                    spherical=c.spherical, silhouette_sample=cfg.evaluate.silhouette_sample,
                    use_gpu=use_gpu(cfg.embed.use_gpu), on_result=on_result)
    with staged_folder(run.local / SWEEP_DIR) as tmp:
        (tmp / "sweep_k.json").write_text(json.dumps(sweep, indent=2))
        plot_sweep(sweep, tmp / "sweep_k.png")
        write_manifest(tmp, stage="sweep_k", config_hash=cfg.hash(), rows=len(z),
                       files=["sweep_k.json", "sweep_k.png"], suggested_k=sweep["suggested_k"])
    return sweep
