"""Federated partitions: the sources a client reads its rows from (arrays, Parquet, Ray Datasets, simulated splits)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.data.schema import LABEL, X, Z, check_finite, vectors_to_numpy
from engine.errors import ConfigError, DataError

SPLITS = ("iid", "dirichlet", "clusters")


@dataclass(frozen=True)
class ParquetPartition:
    """The rows of a Parquet file, folder or glob; with `filter_column`, only those where it equals `value`.

    column: the vector column (None: `z` when the files have it, else `x`); label_column: ground-truth labels,
    only counted for the report (None: `label` when present).
    """

    path: str
    column: str | None = None
    label_column: str | None = None
    filter_column: str | None = None
    value: Any = None


def resolve_partitions(partitions: Any) -> dict[str, Any]:
    """The partitions as name -> numpy array, ParquetPartition or Ray Dataset; a path becomes a ParquetPartition."""
    if not isinstance(partitions, dict) or not partitions:
        raise ConfigError(
            "partitions should be a non-empty dict mapping a partition name to a numpy array, a Parquet path or "
            f"a Ray Dataset, got {type(partitions).__name__}"
        )
    out: dict[str, Any] = {}
    for name, source in partitions.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"partition names should be non-empty strings, got {name!r}")
        if isinstance(source, str | Path):
            source = ParquetPartition(str(source))
        if isinstance(source, np.ndarray):
            if source.ndim != 2:
                raise DataError(f"partition '{name}' should be a 2-D array (rows, dims), got shape {source.shape}")
            if not np.issubdtype(source.dtype, np.number):
                raise DataError(f"partition '{name}' should hold numbers, got dtype {source.dtype}")
        elif not isinstance(source, ParquetPartition) and not _is_dataset(source):
            raise ConfigError(
                f"partition '{name}' should be a numpy array, a Parquet path or a Ray Dataset, got "
                f"{type(source).__name__}"
            )
        out[name] = source
    return out


def read_partition(name: str, source: Any, column: str | None = None,
                   label_column: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows float32 (n, d), labels or None) of one partition, checked for NaN/inf; runs in its client."""
    where = f"partition '{name}'"
    if isinstance(source, np.ndarray):
        X_ = np.ascontiguousarray(source, dtype=np.float32)
        if X_.shape[0]:
            check_finite(X_, name="rows", where=where)
        return X_, None
    if isinstance(source, ParquetPartition):
        table = _read_parquet(where, source, column or source.column, label_column or source.label_column)
    else:
        table = _read_dataset(where, source, column, label_column)
    x = vectors_to_numpy(table.column(0), name=table.column_names[0], where=where)
    if table.num_rows == 0:
        return np.zeros((0, 0), dtype=np.float32), None
    check_finite(x, name=table.column_names[0], where=where)
    labels = table.column(1).to_numpy(zero_copy_only=False) if table.num_columns > 1 else None
    return x, labels


def _pick_columns(where: str, names: list[str], column: str | None, label_column: str | None) -> list[str]:
    if column is None:
        column = next((c for c in (Z, X) if c in names), None)
        if column is None:
            raise DataError(f"{where}: no vector column '{Z}' or '{X}' (columns: {', '.join(names)}); name it with "
                            "`column`")
    elif column not in names:
        raise DataError(f"{where}: no column '{column}' (columns: {', '.join(names)})")
    if label_column is None:
        label_column = LABEL if LABEL in names else None
    elif label_column not in names:
        raise DataError(f"{where}: no label column '{label_column}' (columns: {', '.join(names)})")
    return [column] + ([label_column] if label_column else [])


def _read_parquet(where: str, part: ParquetPartition, column: str | None, label_column: str | None) -> pa.Table:
    from engine.data.sources import parquet_files

    tables = []
    for file in parquet_files(part.path):
        try:
            names = pq.read_schema(file).names
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{where}: {file} is not a readable Parquet file ({e})") from None
        cols = _pick_columns(f"{where}: {file}", names, column, label_column)
        filters = None
        if part.filter_column is not None:
            if part.filter_column not in names:
                raise DataError(f"{where}: {file} has no partition column '{part.filter_column}'")
            filters = [(part.filter_column, "==", part.value)]
        tables.append(pq.read_table(file, columns=cols, filters=filters))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _read_dataset(where: str, ds: Any, column: str | None, label_column: str | None) -> pa.Table:
    cols = _pick_columns(where, list(ds.schema().names), column, label_column)
    blocks = list(ds.select_columns(cols).iter_batches(batch_size=None, batch_format="pyarrow"))
    if not blocks:
        return pa.table({c: pa.array([], pa.float32()) for c in cols})
    return pa.concat_tables(blocks)


def _is_dataset(obj: Any) -> bool:
    try:
        from ray.data import Dataset
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return isinstance(obj, Dataset)


# ---- partitions of real data -----------------------------------------------------------------------


def partitions_from_column(path: str, column: str = "partition", *, vector_column: str | None = None,
                           label_column: str | None = None) -> dict[str, ParquetPartition]:
    """One partition per distinct value of `column` in the Parquet data at `path`; each client reads only
    the rows with its value (the driver reads the partition column alone, to learn the names)."""
    from engine.data.sources import parquet_files

    values: set = set()
    for file in parquet_files(path):
        names = pq.read_schema(file).names
        if column not in names:
            raise DataError(f"{file}: no partition column '{column}' (columns: {', '.join(names)})")
        part = pq.read_table(file, columns=[column]).column(0)
        if part.null_count:
            row = int(np.flatnonzero(np.asarray(part.is_null()))[0])
            raise DataError(f"{file}: partition column '{column}' row {row} is null")
        values.update(part.to_pylist())
    if not values:
        raise DataError(f"{path}: the partition column '{column}' holds no values")
    return {str(v): ParquetPartition(path, vector_column, label_column, column, v) for v in sorted(values)}


def partitions_from_folders(root: str, *, vector_column: str | None = None,
                            label_column: str | None = None) -> dict[str, ParquetPartition]:
    """One partition per subfolder of `root` that holds Parquet files, named after the subfolder."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{root}: not a folder (one subfolder per partition is expected)")
    out = {}
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if any(sub.rglob("*.parquet")):
            out[sub.name] = ParquetPartition(str(sub), vector_column, label_column)
    if not out:
        raise DataError(f"{root}: no subfolder holds Parquet files (one subfolder per partition is expected)")
    return out


# ---- simulated partitions --------------------------------------------------------------------------


def split_indices(n_rows: int, n_partitions: int, *, split: str = "iid", labels: np.ndarray | None = None,
                  alpha: float = 1.0, clusters_per_partition: int = 2, seed: int = 0,
                  min_rows: int = 1) -> dict[str, np.ndarray]:
    """Row indices of each simulated partition, named p0, p1, ... (zero-padded so names sort in order).

    iid: a seeded shuffle cut into equal parts. dirichlet: each label's rows are divided among the partitions
    in proportions drawn from Dirichlet(alpha) (small alpha: few labels per partition). clusters: as in k-FED,
    partition i holds `clusters_per_partition` labels (assigned round-robin, so every label is held) and each
    label's rows are divided evenly among its holders. Partitions left with fewer than `min_rows` rows (only
    dirichlet can) take random rows from the largest one.
    """
    if isinstance(n_partitions, bool) or not isinstance(n_partitions, int) or n_partitions < 1:
        raise ConfigError(f"n_partitions={n_partitions!r} should be an int >= 1 "
                          "(config: federated.partitions.n_partitions)")
    if n_partitions * max(1, min_rows) > n_rows:
        raise ConfigError(f"n_partitions={n_partitions} partitions of at least {max(1, min_rows)} row(s) need "
                          f"{n_partitions * max(1, min_rows)} rows; the data has {n_rows} "
                          "(config: federated.partitions.n_partitions)")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} should be one of {', '.join(SPLITS)} (config: federated.partitions.split)")
    rng = np.random.default_rng(seed)
    if split == "iid":
        parts = np.array_split(rng.permutation(n_rows), n_partitions)
    else:
        if labels is None:
            raise ConfigError(f"split={split!r} divides the rows by label, but the data has no labels "
                              "(config: federated.partitions.split)")
        labels = np.asarray(labels)
        parts = (_dirichlet(labels, n_partitions, alpha, rng) if split == "dirichlet"
                 else _clusters(labels, n_partitions, clusters_per_partition, rng))
        parts = _top_up(parts, min_rows, rng)
    width = len(str(n_partitions - 1))
    return {f"p{i:0{width}d}": np.sort(p) for i, p in enumerate(parts)}


def _dirichlet(labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    if not alpha > 0:
        raise ConfigError(f"alpha={alpha} should be > 0 (config: federated.partitions.alpha)")
    chunks: list[list[np.ndarray]] = [[] for _ in range(n)]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha)))[:-1] * len(rows)).astype(np.int64)
        for i, part in enumerate(np.split(rows, cuts)):
            chunks[i].append(part)
    return [np.concatenate(c) for c in chunks]


def _clusters(labels: np.ndarray, n: int, per_partition: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    if per_partition > len(classes):
        raise ConfigError(f"clusters_per_partition={per_partition} should be <= the number of labels "
                          f"({len(classes)})")
    if n * per_partition < len(classes):
        raise ConfigError(f"{n} partitions x clusters_per_partition={per_partition} hold fewer labels than the "
                          f"data has ({len(classes)}); some rows would be in no partition")
    holders: dict[int, list[int]] = {c: [] for c in range(len(classes))}
    for p in range(n):
        for j in range(per_partition):
            holders[(p * per_partition + j) % len(classes)].append(p)
    chunks: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c, label in enumerate(classes):
        rows = rng.permutation(np.flatnonzero(labels == label))
        for p, part in zip(holders[c], np.array_split(rows, len(holders[c])), strict=True):
            chunks[p].append(part)
    return [np.concatenate(c) if c else np.zeros(0, dtype=np.int64) for c in chunks]


def _top_up(parts: list[np.ndarray], min_rows: int, rng: np.random.Generator) -> list[np.ndarray]:
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    for i in range(len(parts)):
        missing = min_rows - len(parts[i])
        if missing <= 0:
            continue
        donor = int(np.argmax([len(p) for p in parts]))
        take = rng.choice(len(parts[donor]), size=missing, replace=False)
        parts[i] = np.concatenate([parts[i], parts[donor][take]])
        parts[donor] = np.delete(parts[donor], take)
    return parts


def label_counts(labels: np.ndarray | None) -> dict[str, int] | None:
    """How many rows of each label, for the partition report (None without labels)."""
    if labels is None:
        return None
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {str(v): int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}
