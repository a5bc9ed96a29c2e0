"""One validating pass over an input dataset: row count, dimension, labels and normalisation statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from engine.data.schema import ID, LABEL, X, vectors_to_numpy
from engine.errors import DataError


@dataclass
class DatasetInfo:
    """What the pipeline needs to know about its input before training."""

    n_rows: int
    dim: int
    has_labels: bool
    n_classes: int | None
    shift: np.ndarray  # x_normalised = (x - shift) * scale
    scale: np.ndarray
    image_shape: tuple[int, ...] | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "n_rows": self.n_rows,
            "dim": self.dim,
            "has_labels": self.has_labels,
            "n_classes": self.n_classes,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "source": self.source,
        }


def _block_stats(batch: pa.Table) -> pa.Table:
    x = vectors_to_numpy(batch.column(X))
    ids = batch.column(ID).to_numpy()
    has_label = LABEL in batch.column_names
    labels = np.unique(batch.column(LABEL).to_numpy()) if has_label else np.zeros(0, dtype=np.int64)
    x64 = x.astype(np.float64)

    def one_list(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), pa.array(values))

    return pa.table({
        "n": [len(x)],
        "dim": [x.shape[1] if len(x) else -1],
        "sum": [x64.sum(axis=0).tolist()],
        "sumsq": [(x64 * x64).sum(axis=0).tolist()],
        "min": [x.min(axis=0).tolist() if len(x) else []],
        "max": [x.max(axis=0).tolist() if len(x) else []],
        "ids": one_list(ids.astype(np.int64)),
        "labels": one_list(labels.astype(np.int64)),
    })


def describe(ds, *, normalize: str = "none", image_shape: tuple[int, ...] | None = None,
             source: str = "", where: str | None = None, column: str = X, id_column: str = ID) -> DatasetInfo:
    """Read every row once (this is where NaN, mixed lengths and duplicate ids are caught) and summarise; errors
    name `where` (the input's files, else the source) and the columns as the input calls them."""
    where = where or source or "input"
    rows = ds.map_batches(_block_stats, batch_format="pyarrow", batch_size=None).take_all()
    rows = [r for r in rows if r["n"] > 0]
    if not rows:
        raise DataError(f"{where}: the data set has no rows")
    dims = sorted({int(r["dim"]) for r in rows})
    if len(dims) > 1:
        raise DataError(f"{where}: column '{column}' has vectors of different lengths {dims}")
    n = int(sum(r["n"] for r in rows))
    ids = np.concatenate([np.asarray(r["ids"], dtype=np.int64) for r in rows])
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != n:
        first = int(np.flatnonzero(counts > 1)[0])
        dup, times = int(uniq[first]), int(counts[first])
        raise DataError(f"{where}: column '{id_column}' is not unique (id {dup} appears {times} times)")
    s = np.sum([r["sum"] for r in rows], axis=0)
    sq = np.sum([r["sumsq"] for r in rows], axis=0)
    lo = np.min([r["min"] for r in rows], axis=0)
    hi = np.max([r["max"] for r in rows], axis=0)
    labels = set()
    for r in rows:
        labels.update(r["labels"])
    has_labels = bool(labels)
    shift, scale = normalisation(normalize, n=n, s=s, sq=sq, lo=lo, hi=hi)
    return DatasetInfo(n_rows=n, dim=dims[0], has_labels=has_labels, n_classes=len(labels) if labels else None,
                       shift=shift, scale=scale, image_shape=image_shape, source=source)


def normalisation(kind: str, *, n: int, s: np.ndarray, sq: np.ndarray, lo: np.ndarray,
                  hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) per feature for a normalisation kind, from column sums and extremes."""
    d = len(s)
    if kind == "none":
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    if kind == "max":
        peak = float(np.max(np.abs(np.concatenate([lo, hi]))))
        return np.zeros(d, np.float32), np.full(d, 1.0 / peak if peak > 0 else 1.0, np.float32)
    if kind == "minmax":
        span = hi - lo
        return lo.astype(np.float32), np.where(span > 0, 1.0 / np.where(span > 0, span, 1), 1.0).astype(np.float32)
    if kind == "center":
        mean = s / n
        reach = float(np.max(np.maximum(hi - mean, mean - lo), initial=0.0))
        return mean.astype(np.float32), np.full(d, 1.0 / reach if reach > 0 else 1.0, np.float32)
    if kind == "standard":
        mean = s / n
        std = np.sqrt(np.maximum(sq / n - mean * mean, 0))
        return mean.astype(np.float32), np.where(std > 1e-12, 1.0 / np.where(std > 1e-12, std, 1), 1.0).astype(
            np.float32)
    raise ValueError(f"unknown normalisation {kind!r}")
