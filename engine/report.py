"""The run report: a finished run's plots as PNGs and one self-contained HTML page, `RUN_DIR/report/index.html`.

The page embeds every image as base64 PNG and loads nothing from the network, so it can be mailed or archived
alone. Sections: metrics (with published figures for known data sets), a 2-D map of the latent space, training
curves, cluster sizes, sample images per cluster and decoded centroids (image data), the confusion matrix after
Hungarian matching (labelled data), and the run's config, versions, machine and time per stage. A section whose
input the run does not have (no labels, no model, no images) says so instead of being left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import PipelineConfig
from engine.data.schema import CLUSTER, ID, X
from engine.metrics import NOISE
from engine.progress import BOOKKEEPING
from engine.rundir import RunDir, as_run_dir

REPORT_DIR = "report"
INDEX = "index.html"
SECTIONS = {"metrics": "Metrics", "map": "Latent space", "curves": "Training curves", "sizes": "Cluster sizes",
            "images": "Images per cluster", "confusion": "Confusion matrix", "run": "Run"}
# Clustering accuracy (ACC) each paper reports on the full data set (MNIST: the 70,000 digits, train + test).
PUBLISHED: dict[str, list[tuple[str, str, float]]] = {
    "mnist": [
        ("DEC", "Xie, Girshick, Farhadi. ICML 2016", 0.843),
        ("IDEC", "Guo, Gao, Liu, Yin. IJCAI 2017", 0.881),
        ("DCEC", "Guo, Liu, Zhu, Yin. ICONIP 2017", 0.890),
        ("ClusterGAN", "Mukherjee, Asnani, Lin, Kannan. AAAI 2019", 0.95),
        ("N2D", "McConville, Santos-Rodriguez, Piechocki, Craddock. ICPR 2020", 0.979),
    ],
}
# Curves leave out what is not a loss term.
_NOT_TERMS = {*BOOKKEEPING, "seconds", "update", "iteration"}
_MAX_IMAGE_CLUSTERS = 30  # rows of the image grids: more would make an unreadable figure


def build_report(run_dir: RunDir | str | Path, cfg: PipelineConfig | None = None) -> Path:
    """Write `run_dir/report/` (index.html and one PNG per figure) atomically; returns the index.html path.

    Needs the run's embeddings and assignments; the image section reads sample rows of the input through
    Ray Data (a local Ray is started if none is connected).
    """
    from engine.cluster.assignments import load_vectors
    from engine.data import read_table
    from engine.data.folders import staged_folder, write_manifest
    from engine.data.schema import match_by_id
    from engine.rundir import load_run_config

    run = as_run_dir(run_dir)
    run_dir, assignments = run.local, run.folder("assignments")
    cfg = cfg or load_run_config(run_dir)
    ids, z, labels = load_vectors(run.folder("embeddings"))
    table = read_table(assignments, stage="assign", columns=[ID, CLUSTER])
    pred = match_by_id(ids, table.column(ID).to_numpy(), table.column(CLUSTER).to_numpy(), where=str(assignments))
    facts = _read_json(run_dir / "run.json")
    out = run_dir / REPORT_DIR
    with staged_folder(out) as tmp:
        page = _Page(tmp)
        _metrics_section(page, cfg, _read_json(run_dir / "metrics.json"))
        _map_section(page, cfg, z, pred, labels)
        _curves_section(page, run_dir, cfg, facts)
        _sizes_section(page, pred)
        _images_section(page, run_dir, cfg, ids, pred, facts)
        _confusion_section(page, labels, pred)
        _run_section(page, run, cfg, facts)
        (tmp / INDEX).write_text(page.html(f"{cfg.name}: {run.location}"))
        write_manifest(tmp, stage="report", config_hash=cfg.hash(), files=[INDEX, *page.files], rows=len(ids))
    return out / INDEX


# ---- the page --------------------------------------------------------------------------------------


class _Page:
    """Sections of HTML in order, and the PNGs written beside the page."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: list[str] = []
        self.sections: list[tuple[str, str]] = []

    def add(self, key: str, *parts: str) -> None:
        self.sections.append((key, "\n".join(parts)))

    def figure(self, fig: Any, name: str, alt: str) -> str:
        """Save a matplotlib Figure as NAME.png beside the page; return its <img> with the PNG inline."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        data = buf.getvalue()
        (self.folder / f"{name}.png").write_bytes(data)
        self.files.append(f"{name}.png")
        return (f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{html.escape(alt)}" '
                f'title="{name}.png">')

    def html(self, title: str) -> str:
        nav = " · ".join(f'<a href="#{k}">{SECTIONS[k]}</a>' for k, _ in self.sections)
        body = "\n".join(f'<section id="{k}">\n<h2>{SECTIONS[k]}</h2>\n{content}\n</section>'
                         for k, content in self.sections)
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
nav {{ margin-bottom: 1em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; }}
.note {{ color: #666; font-style: italic; }}
</style>
</head>
<body>
<h1>Deep Cluster Engine report: {html.escape(title)}</h1>
<p class="note">Built {html.escape(time.strftime("%Y-%m-%d %H:%M:%S"))}.</p>
<nav>{nav}</nav>
{body}
</body>
</html>
"""


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...] | None = None) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return '<td class="num">—</td>'
        if isinstance(v, bool):
            return f"<td>{v}</td>"
        if isinstance(v, float):
            return f'<td class="num">{v:.4g}</td>'
        if isinstance(v, int):
            return f'<td class="num">{v}</td>'
        return f"<td>{html.escape(str(v))}</td>"

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    return "<table>" + head + "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows) + "</table>"


def _figure(width: float, height: float):
    # A bare Figure renders with Agg and never touches pyplot's global state or the user's backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# ---- sections --------------------------------------------------------------------------------------


def known_dataset(cfg: PipelineConfig) -> str | None:
    """The published data set the run's input is, when its files say so (MNIST), else None."""
    d = cfg.data
    names = " ".join(str(p).lower() for p in [getattr(d, "path", None), *(getattr(d, "images", None) or [])] if p)
    if "mnist" in names and "fashion" not in names:
        return "mnist"
    return None


def _metrics_section(page: _Page, cfg: PipelineConfig, metrics: dict[str, Any]) -> None:
    parts = [_table([(k, v) for k, v in metrics.items()], ("metric", "value")) if metrics
             else _note("No metrics.json: run `dce evaluate RUN_DIR` first.")]
    dataset = known_dataset(cfg)
    if dataset:
        rows = [(method, cite, acc) for method, cite, acc in PUBLISHED[dataset]]
        parts += [f"<h3>Published figures ({dataset}, ACC)</h3>", _table(rows, ("method", "paper", "ACC"))]
    else:
        parts.append(_note(f"No published figures are recorded for this data set ({cfg.data.source})."))
    page.add("metrics", *parts)


def _colours(values: np.ndarray):
    """One colour per distinct value (noise, -1, in grey) and the sorted distinct values."""
    from matplotlib import colormaps

    distinct = np.unique(values)
    real = distinct[distinct != NOISE]
    cmap = colormaps["tab10" if len(real) <= 10 else "tab20" if len(real) <= 20 else "turbo"]
    n = max(len(real), 1)
    palette = {v: cmap(i if len(real) <= 20 else i / max(n - 1, 1)) for i, v in enumerate(real)}
    palette[NOISE] = (0.6, 0.6, 0.6, 0.5)
    return palette, distinct


def project_2d(z: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates of the rows of z: PCA, UMAP or t-SNE (seeded)."""
    z = np.asarray(z, dtype=np.float32)
    if z.shape[1] == 1:
        return np.column_stack([z[:, 0], np.zeros(len(z), np.float32)])
    if method == "umap":
        from engine.cluster._manifold import import_umap

        return import_umap().UMAP(n_components=2, random_state=seed).fit_transform(z)
    if method == "tsne":
        from sklearn.manifold import TSNE

        # Barnes-Hut's tree pays off on large samples only: on a few hundred rows the exact gradient is ~7x faster.
        return TSNE(n_components=2, init="pca", random_state=seed, method="exact" if len(z) <= 500 else "barnes_hut",
                    perplexity=min(30.0, max(1.0, (len(z) - 1) / 3))).fit_transform(z)
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(z)


def _map_section(page: _Page, cfg: PipelineConfig, z: np.ndarray, pred: np.ndarray,
                 labels: np.ndarray | None) -> None:
    r = cfg.report
    rows = np.arange(len(z))
    if len(z) > r.sample:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(len(z), size=r.sample, replace=False))
    xy = project_2d(z[rows], r.map, cfg.seed)
    colourings = [("cluster", pred[rows])] + ([("true label", labels[rows])] if labels is not None else [])
    fig = _figure(5.5 * len(colourings), 5)
    for i, (what, values) in enumerate(colourings):
        ax = fig.add_subplot(1, len(colourings), i + 1)
        palette, distinct = _colours(values)
        for v in distinct:
            keep = values == v
            ax.scatter(xy[keep, 0], xy[keep, 1], s=4, color=palette[v], label="noise" if v == NOISE else str(v),
                       rasterized=True)
        ax.set_title(f"{r.map.upper() if r.map != 'tsne' else 't-SNE'} of the embeddings, coloured by {what}")
        ax.set_xticks([])
        ax.set_yticks([])
        if len(distinct) <= 20:
            ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    sample = f"a seeded sample of {len(rows)} of {len(z)} rows" if len(rows) < len(z) else f"all {len(z)} rows"
    page.add("map", _note(f"{r.map} (report.map) of {sample}; latent dimension {z.shape[1]}; "
                          + ("left coloured by cluster, right by true label." if labels is not None
                             else "coloured by cluster (the data have no labels).")),
             page.figure(fig, "map", "2-D map of the latent space"))


def _history(run_dir: Path, cfg: PipelineConfig, facts: dict[str, Any]) -> list[tuple[str, str, list[dict]]]:
    """(stage, x key, records) of each training history the run holds: the train stage's epochs from its
    checkpoint (whatever terms the model logs: reconstruction, kl, g_loss, d_loss, ...), refine's updates."""
    from engine.data import read_manifest
    from engine.errors import IncompleteResultError
    from engine.train import load_checkpoint

    found = []
    try:
        read_manifest(run_dir / "model", stage="train")
        found.append(("train", "epoch", load_checkpoint(run_dir / "model")["history"]))
    except IncompleteResultError:
        pass
    refine = facts.get("refine") or {}
    if cfg.model.refines and refine.get("history"):
        found.append(("refine", "iteration", refine["history"]))
    return [(stage, x, records) for stage, x, records in found if records]


def history_terms(records: list[dict[str, Any]]) -> list[str]:
    """The numeric terms of a history in order of first appearance (a record may lack some, e.g. refine's first
    update has no loss yet)."""
    terms: dict[str, None] = {}
    for record in records:
        terms.update((k, None) for k, v in record.items()
                     if k not in _NOT_TERMS and isinstance(v, int | float) and not isinstance(v, bool))
    return list(terms)


def _curves_section(page: _Page, run_dir: Path, cfg: PipelineConfig, facts: dict[str, Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    histories = _history(run_dir, cfg, facts)
    panels = []
    for stage, x_key, records in histories:
        panels += [(stage, x_key, term, records) for term in history_terms(records)]
    if not panels:
        page.add("curves", _note("No training history: this run has no trained model (e.g. imported embeddings)."))
        return
    cols = min(3, len(panels))
    n_rows = -(-len(panels) // cols)
    fig = _figure(4.2 * cols, 3 * n_rows)
    for i, (stage, x_key, term, records) in enumerate(panels):
        ax = fig.add_subplot(n_rows, cols, i + 1)
        xs = [rec.get(x_key, j + 1) for j, rec in enumerate(records)]
        ax.plot(xs, [rec.get(term, np.nan) for rec in records], marker="o" if len(records) < 30 else None, ms=3)
        ax.set_title(f"{stage}: {term}")
        ax.set_xlabel(x_key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    rows = [(stage, len(records), ", ".join(history_terms(records))) for stage, _, records in histories]
    page.add("curves", _table(rows, ("stage", "records", "terms")),
             page.figure(fig, "curves", "loss terms per epoch"))


def _sizes_section(page: _Page, pred: np.ndarray) -> None:
    clusters, counts = np.unique(pred, return_counts=True)
    real = clusters != NOISE
    fig = _figure(max(5.0, min(16.0, 0.35 * len(clusters) + 2)), 3.2)
    ax = fig.add_subplot()
    palette, _ = _colours(pred)
    ax.bar([str(c) if c != NOISE else "noise" for c in clusters], counts, color=[palette[c] for c in clusters])
    ax.set_xlabel("cluster")
    ax.set_ylabel("rows")
    if len(clusters) > 40:
        ax.set_xticks([])
    summary = (f"{int(real.sum())} clusters over {len(pred)} rows; smallest {int(counts[real].min())}, largest "
               f"{int(counts[real].max())} rows" if real.any() else f"{len(pred)} rows, all noise")
    noise = int(counts[~real].sum())
    page.add("sizes", f"<p>{html.escape(summary)}" + (f"; {noise} noise rows" if noise else "") + ".</p>",
             page.figure(fig, "sizes", "rows per cluster"))


def _image_shape(facts: dict[str, Any]) -> tuple[int, ...] | None:
    shape = (facts.get("data") or {}).get("image_shape")
    return tuple(int(s) for s in shape) if shape else None


def _as_image(row: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A flat row as something imshow draws: (h, w) grey, or (h, w, 3) from channels-first (3, h, w)."""
    img = np.asarray(row, dtype=np.float32).reshape(shape)
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
        if img.ndim == 3:
            lo, hi = float(img.min()), float(img.max())
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img


def _rows_by_id(cfg: PipelineConfig, wanted: np.ndarray) -> dict[int, np.ndarray]:
    """The input rows (`x`, raw) of the given ids, read from the run's source by Ray Data tasks."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from engine.data import open_source, read_dataset

    wanted_set = pa.array(np.asarray(wanted, dtype=np.int64))

    def keep(batch: pa.Table) -> pa.Table:
        return batch.select([ID, X]).filter(pc.is_in(batch.column(ID), value_set=wanted_set))

    found = read_dataset(open_source(cfg.data)).map_batches(keep, batch_format="pyarrow", batch_size=None).take_all()
    return {int(r[ID]): np.asarray(r[X], dtype=np.float32).reshape(-1) for r in found}


def _decoded_centroids(run_dir: Path, cfg: PipelineConfig) -> np.ndarray | None:
    """The centroids decoded by the run's model into input space (raw scale), or None without a decoder."""
    import torch

    from engine.data import read_manifest
    from engine.errors import IncompleteResultError
    from engine.rundir import model_dir_for
    from engine.train import load_checkpoint, model_from_checkpoint

    model_dir, stage = model_dir_for(cfg, run_dir)
    try:
        read_manifest(model_dir, stage=stage)
    except IncompleteResultError:
        return None
    state = load_checkpoint(model_dir)
    model = model_from_checkpoint(state).eval()
    # dec / idec wrap the autoencoder that holds the decoder.
    decode = getattr(model, "decode", None) or getattr(getattr(model, "autoencoder", None), "decode", None)
    path = run_dir / "centroids.npy"
    if decode is None or not path.is_file():
        return None
    centroids = np.load(path, allow_pickle=False).astype(np.float32)
    with torch.inference_mode():
        x = decode(torch.from_numpy(centroids)).float().reshape(len(centroids), -1)
    return (x / state["input"]["scale"] + state["input"]["shift"]).numpy()


def _mosaic(grid: list[list[np.ndarray]]) -> np.ndarray:
    """Images from `_as_image`, one list per row, tiled with a 1-pixel gap: one imshow instead of one Axes per
    image (Axes cost ~30 ms each to draw)."""
    first = next(img for row in grid for img in row)
    h, w = first.shape[:2]
    cols = max(len(row) for row in grid)
    # Grey gaps are NaN (drawn blank by the colormap); colour gaps are white.
    out = np.full(((h + 1) * len(grid) - 1, (w + 1) * cols - 1, *first.shape[2:]), np.nan if first.ndim == 2 else 1.0,
                  dtype=np.float32)
    for i, row in enumerate(grid):
        for j, img in enumerate(row):
            out[i * (h + 1): i * (h + 1) + h, j * (w + 1): j * (w + 1) + w] = img
    return out


def _mosaic_figure(grid: list[list[np.ndarray]], row_labels: list[str], title: str):
    mosaic = _mosaic(grid)
    cols = max(len(row) for row in grid)
    fig = _figure(0.55 * cols + 1.0, 0.55 * len(grid) + 0.6)
    ax = fig.add_subplot()
    ax.imshow(mosaic, cmap="gray_r", interpolation="nearest")
    h = grid[0][0].shape[0]
    ax.set_yticks([i * (h + 1) + (h - 1) / 2 for i in range(len(grid))], row_labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    for side in ax.spines.values():
        side.set_visible(False)
    return fig


def _images_section(page: _Page, run_dir: Path, cfg: PipelineConfig, ids: np.ndarray, pred: np.ndarray,
                    facts: dict[str, Any]) -> None:
    shape = _image_shape(facts)
    if shape is None:
        page.add("images", _note("The input is not image data (it has no image shape): no image grids."))
        return
    per = cfg.report.images_per_cluster
    clusters = [int(c) for c in np.unique(pred) if c != NOISE][:_MAX_IMAGE_CLUSTERS]
    if not clusters:
        page.add("images", _note("Every row is noise: no cluster to show."))
        return
    rng = np.random.default_rng(cfg.seed)
    chosen = {c: np.sort(rng.choice(ids[pred == c], size=min(per, int((pred == c).sum())), replace=False))
              for c in clusters}
    rows = _rows_by_id(cfg, np.concatenate(list(chosen.values())))
    grid = [[_as_image(rows[int(i)], shape) for i in chosen[c]] for c in clusters]
    fig = _mosaic_figure(grid, [str(c) for c in clusters], "one cluster a row")
    parts = [_note(f"Up to {per} seeded random rows (report.images_per_cluster) of each cluster"
                   + (f"; the first {_MAX_IMAGE_CLUSTERS} clusters." if len(clusters) == _MAX_IMAGE_CLUSTERS
                      else ".")),
             page.figure(fig, "samples", "sample images per cluster")]
    decoded = _decoded_centroids(run_dir, cfg)
    if decoded is not None:
        shown = [_as_image(row, shape) for row in decoded[:_MAX_IMAGE_CLUSTERS]]
        grid = [shown[i:i + 10] for i in range(0, len(shown), 10)]
        fig = _mosaic_figure(grid, [f"{i}-{i + len(g) - 1}" for i, g in zip(range(0, len(shown), 10), grid,
                                                                             strict=True)],
                             "clusters left to right")
        parts += ["<h3>Centroids decoded</h3>", _note("Each cluster's centroid run through the model's decoder."),
                  page.figure(fig, "centroids", "centroids decoded by the model's decoder")]
    else:
        parts.append(_note("The run's model has no decoder (decode): no decoded centroids."))
    page.add("images", *parts)


def _confusion_section(page: _Page, labels: np.ndarray | None, pred: np.ndarray) -> None:
    from engine.metrics import clustering_accuracy, confusion_after_matching

    if labels is None:
        page.add("confusion", _note("The data have no labels: no confusion matrix."))
        return
    m = confusion_after_matching(labels, pred)
    n_cls, n_clu = m.matrix.shape
    fig = _figure(max(4.0, min(18.0, 0.45 * n_clu + 2)), max(3.5, min(18.0, 0.4 * n_cls + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(m.matrix, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label="rows")
    if n_cls * n_clu <= 900:
        peak = m.matrix.max() or 1
        for (i, j), v in np.ndenumerate(m.matrix):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > peak / 2 else "black")
    if n_clu <= 50:
        ax.set_xticks(range(n_clu), ["noise" if c == NOISE else str(c) for c in m.clusters], fontsize=8)
    if n_cls <= 50:
        ax.set_yticks(range(n_cls), [str(c) for c in m.classes], fontsize=8)
    ax.set_xlabel("cluster, in matched order")
    ax.set_ylabel("true label")
    ax.set_title(f"ACC {clustering_accuracy(labels, pred):.4f}")
    page.add("confusion", _note(f"{n_cls} classes x {n_clu} clusters; columns ordered by the Hungarian matching: "
                                f"the first min(classes, clusters) columns are the matched clusters, in class "
                                f"order, then unmatched clusters, then noise."),
             page.figure(fig, "confusion", "confusion matrix after Hungarian matching"))


def _run_section(page: _Page, run: RunDir, cfg: PipelineConfig, facts: dict[str, Any]) -> None:
    seconds = facts.get("seconds") or {}
    started, finished = facts.get("started"), facts.get("finished")
    when = [("run directory", str(run.location if run.remote else run.local.resolve()))]
    if started:
        when.append(("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started)))))
    if started and finished:
        when.append(("wall time (s)", round(float(finished) - float(started), 1)))
    if facts.get("ray"):
        when.append(("ray", facts["ray"]))
    parts = [_table(when)]
    if seconds:
        parts += ["<h3>Time per stage (s)</h3>",
                  _table([(k, float(v)) for k, v in seconds.items()] + [("total", float(sum(seconds.values())))],
                         ("stage", "seconds"))]
    for title, key in (("Versions", "versions"), ("Machine", "machine"), ("Data", "data")):
        if facts.get(key):
            parts += [f"<h3>{title}</h3>", _table(list(facts[key].items()))]
    if not facts:
        parts.append(_note("No run.json: this run was not made by `dce run` (no versions, machine or times)."))
    parts += ["<h3>Config</h3>", f"<pre>{html.escape(cfg.to_yaml())}</pre>"]
    page.add("run", *parts)
