"""Input sources: each one is a list of shard specs that Ray Data tasks read in parallel into `id, x, label`."""

from __future__ import annotations

import functools
import glob
import gzip
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import BlobsSource, DigitsSource, IdxSource, NpySource, ParquetSource
from engine.data.schema import ID, LABEL, X, check_finite, vector_array, vectors_to_numpy
from engine.errors import DataError

SOURCES: dict[str, str] = {
    "digits": "scikit-learn's bundled handwritten digits: 1797 x 64 (8x8 images), 10 classes",
    "blobs": "seeded Gaussian mixture of any size and dimension, generated in parallel by Ray Data",
    "parquet": "Parquet file, folder or glob; vector column (list or fixed_size_list), optional label/id",
    "npy": "a 2-D .npy matrix (or 3-D images), optional 1-D labels .npy",
    "idx": "MNIST-format idx image and label files, gzipped or not",
}


@dataclass(frozen=True)
class Source:
    """A source opened and checked in the driver: its shard specs, dimension and row count."""

    config: Any
    specs: list[dict[str, Any]]
    dim: int | None  # None when only reading the rows tells (Parquet list columns)
    n_rows: int
    has_labels: bool
    image_shape: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.config.source


def open_source(cfg: Any) -> Source:
    """Open a source: file and column checks happen here, before any compute."""
    opener = {
        "digits": _open_digits,
        "blobs": _open_blobs,
        "parquet": _open_parquet,
        "npy": _open_npy,
        "idx": _open_idx,
    }[cfg.source]
    return opener(cfg)


def read_shard(cfg: Any, spec: dict[str, Any]) -> pa.Table:
    """Read one shard as a table of the input schema, with NaN/inf and shape checks."""
    reader = {
        "digits": _read_digits,
        "blobs": _read_blobs,
        "parquet": _read_parquet,
        "npy": _read_npy,
        "idx": _read_idx,
    }[cfg.source]
    ids, x, labels, where, first_row = reader(cfg, spec)
    check_finite(x, ids, name=getattr(cfg, "column", X), where=where, first_row=first_row)
    return input_table(ids, x, labels)


def input_table(ids: np.ndarray, x: np.ndarray, labels: np.ndarray | None) -> pa.Table:
    cols = {ID: pa.array(np.asarray(ids, dtype=np.int64)), X: vector_array(x)}
    if labels is not None:
        cols[LABEL] = pa.array(np.asarray(labels, dtype=np.int64))
    return pa.table(cols)


def _ranges(n: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows_per_shard, n)) for s in range(0, n, rows_per_shard)]


# ---- digits ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def _open_digits(cfg: DigitsSource) -> Source:
    x, _ = _digits()
    specs = [{"start": s, "stop": e} for s, e in _ranges(len(x), cfg.rows_per_shard)]
    return Source(cfg, specs, dim=x.shape[1], n_rows=len(x), has_labels=True, image_shape=(8, 8))


def _read_digits(cfg: DigitsSource, spec: dict) -> tuple:
    x, y = _digits()
    s, e = spec["start"], spec["stop"]
    return np.arange(s, e), x[s:e], y[s:e], "digits", s


# ---- blobs -----------------------------------------------------------------------------------------


# Rows are generated in fixed blocks, each from its own seeded stream: a shard generates the blocks it
# overlaps and keeps its rows, so the data set depends on the seed and sizes only, never on rows_per_shard,
# and every shard is still reproducible alone, in any order, on any worker.
_BLOB_BLOCK = 1024


def _blob_rng(cfg: BlobsSource, *key: int) -> np.random.Generator:
    # spawn_key keeps the streams apart: default_rng([seed, 0]) would be the very stream of default_rng(seed).
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=key))


def blob_centers(cfg: BlobsSource) -> np.ndarray:
    rng = _blob_rng(cfg, 0)
    return rng.uniform(-cfg.center_box, cfg.center_box, size=(cfg.centers, cfg.n_features)).astype(np.float32)


def _open_blobs(cfg: BlobsSource) -> Source:
    specs = [{"start": s, "stop": e} for s, e in _ranges(cfg.n_samples, cfg.rows_per_shard)]
    return Source(cfg, specs, dim=cfg.n_features, n_rows=cfg.n_samples, has_labels=True)


def _blob_block(cfg: BlobsSource, centers: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    rng = _blob_rng(cfg, 1, block)
    n = min(_BLOB_BLOCK, cfg.n_samples - block * _BLOB_BLOCK)
    labels = rng.integers(0, cfg.centers, size=n)
    x = centers[labels] + rng.standard_normal((n, cfg.n_features), dtype=np.float32) * np.float32(cfg.cluster_std)
    return x, labels


def _read_blobs(cfg: BlobsSource, spec: dict) -> tuple:
    s, e = spec["start"], spec["stop"]
    centers = blob_centers(cfg)
    first, last = s // _BLOB_BLOCK, (e - 1) // _BLOB_BLOCK
    blocks = [_blob_block(cfg, centers, b) for b in range(first, last + 1)]
    x = np.concatenate([b[0] for b in blocks])
    labels = np.concatenate([b[1] for b in blocks])
    lo = s - first * _BLOB_BLOCK
    return np.arange(s, e), x[lo:lo + e - s], labels[lo:lo + e - s], "blobs", s


# ---- npy -------------------------------------------------------------------------------------------


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} file not found")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy {what} file ({e})") from None


def _open_npy(cfg: NpySource) -> Source:
    x = _load_npy(cfg.path, "data")
    if x.ndim not in (2, 3) or x.shape[0] == 0:
        raise DataError(f"{cfg.path}: expected an (n, d) matrix or (n, h, w) images, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{cfg.path}: expected numbers, got dtype {x.dtype}")
    has_labels = cfg.labels_path is not None
    if has_labels:
        y = _load_npy(cfg.labels_path, "labels")
        if y.shape != (x.shape[0],):
            raise DataError(
                f"{cfg.labels_path}: labels have shape {y.shape} but {cfg.path} has {x.shape[0]} rows"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{cfg.labels_path}: labels must be integers, got dtype {y.dtype}")
    specs = [{"start": s, "stop": e} for s, e in _ranges(x.shape[0], cfg.rows_per_shard)]
    image_shape = tuple(x.shape[1:]) if x.ndim == 3 else None
    return Source(cfg, specs, dim=int(np.prod(x.shape[1:])), n_rows=x.shape[0], has_labels=has_labels,
                  image_shape=image_shape)


def _read_npy(cfg: NpySource, spec: dict) -> tuple:
    s, e = spec["start"], spec["stop"]
    x = np.asarray(_load_npy(cfg.path, "data")[s:e], dtype=np.float32).reshape(e - s, -1)
    y = np.asarray(_load_npy(cfg.labels_path, "labels")[s:e]) if cfg.labels_path else None
    return np.arange(s, e), x, y, cfg.path, s


# ---- idx (MNIST) -----------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_open(path: str):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def idx_header(path: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header bytes) of an idx file, reading only its header."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: idx file not found")
    try:
        with _idx_open(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
                raise DataError(f"{path}: not an idx file (bad magic number {head.hex()})")
            ndim = head[3]
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"{path}: unreadable idx file ({e})") from None
    return np.dtype(_IDX_TYPES[head[2]]), tuple(dims), 4 + 4 * ndim


def _idx_size(dtype: np.dtype, shape: tuple[int, ...], offset: int) -> int:
    return int(np.prod(shape)) * dtype.itemsize + offset


def _idx_check_size(path: str) -> None:
    """A plain idx file's length against its header, up front; a gzipped one is checked when it is read."""
    dtype, shape, offset = idx_header(path)
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return
    size, expected = os.path.getsize(path), _idx_size(dtype, shape, offset)
    if size != expected:
        raise DataError(f"{path}: idx file is truncated or padded ({size} bytes, header says {expected})")


@functools.lru_cache(maxsize=4)
def _idx_array(path: str) -> np.ndarray:
    dtype, shape, offset = idx_header(path)
    try:
        with _idx_open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable or truncated idx file ({e})") from None
    expected = _idx_size(dtype, shape, offset)
    if len(raw) != expected:
        raise DataError(f"{path}: idx file is truncated or padded ({len(raw)} bytes, header says {expected})")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _open_idx(cfg: IdxSource) -> Source:
    if not cfg.images:
        raise DataError("data.images: at least one idx image file is needed")
    if cfg.labels is not None and len(cfg.labels) != len(cfg.images):
        raise DataError(
            f"data.labels names {len(cfg.labels)} files but data.images names {len(cfg.images)}; "
            "give one labels file per images file"
        )
    specs, total, image_shape = [], 0, None
    for i, path in enumerate(cfg.images):
        _, shape, _ = idx_header(path)
        _idx_check_size(path)
        if len(shape) < 2:
            raise DataError(f"{path}: expected an idx images file (3 dimensions), got shape {shape}")
        if image_shape is None:
            image_shape = shape[1:]
        elif shape[1:] != image_shape:
            raise DataError(f"{path}: images of shape {shape[1:]} do not match {cfg.images[0]}'s {image_shape}")
        if cfg.labels is not None:
            _, lshape, _ = idx_header(cfg.labels[i])
            if len(lshape) != 1:
                raise DataError(f"{cfg.labels[i]}: expected an idx labels file (1 dimension), got shape {lshape}")
            if lshape[0] != shape[0]:
                raise DataError(f"{cfg.labels[i]}: holds {lshape[0]} labels but {path} has {shape[0]} images")
            _idx_check_size(cfg.labels[i])
        for s, e in _ranges(shape[0], cfg.rows_per_shard):
            specs.append({"file": i, "start": s, "stop": e, "id0": total})
        total += shape[0]
    return Source(cfg, specs, dim=int(np.prod(image_shape)), n_rows=total, has_labels=cfg.labels is not None,
                  image_shape=tuple(image_shape))


def _read_idx(cfg: IdxSource, spec: dict) -> tuple:
    i, s, e = spec["file"], spec["start"], spec["stop"]
    images = _idx_array(cfg.images[i])
    x = images[s:e].reshape(e - s, -1).astype(np.float32)
    y = _idx_array(cfg.labels[i])[s:e].astype(np.int64) if cfg.labels is not None else None
    return np.arange(s, e) + spec["id0"], x, y, cfg.images[i], s


# ---- parquet ---------------------------------------------------------------------------------------


def parquet_files(path: str) -> list[str]:
    """The .parquet files named by a file, a folder (recursively) or a glob, sorted.

    In a folder, names starting with '.' or '_' are skipped at any depth (staging folders, `_temporary/`).
    """
    if os.path.isdir(path):
        root = Path(path)
        files = sorted(str(p) for p in root.rglob("*.parquet")
                       if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))
    elif any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif not os.path.exists(path):
        raise DataError(f"{path}: Parquet file or folder not found")
    else:
        files = [path]
    if not files:
        raise DataError(f"{path}: no Parquet files found")
    return files


def _is_vector_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _open_parquet(cfg: ParquetSource) -> Source:
    specs, total, dim = [], 0, None
    for file in parquet_files(cfg.path):
        try:
            with pq.ParquetFile(file) as pf:
                schema, meta = pf.schema_arrow, pf.metadata
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{file}: not a readable Parquet file ({e})") from None
        for col, role in ((cfg.column, "data.column"), (cfg.label_column, "data.label_column"),
                          (cfg.id_column, "data.id_column")):
            if col is not None and col not in schema.names:
                hint = "; set data.id_column=null to number the rows instead" if role == "data.id_column" else ""
                raise DataError(f"{file}: missing column '{col}' ({role}); the file has columns {schema.names}{hint}")
        t = schema.field(cfg.column).type
        storage = t.storage_type if isinstance(t, pa.BaseExtensionType) else t
        if not _is_vector_type(storage) or not (pa.types.is_integer(storage.value_type)
                                                or pa.types.is_floating(storage.value_type)):
            raise DataError(f"{file}: column '{cfg.column}' has type {t}; expected a list of numbers")
        if pa.types.is_fixed_size_list(storage):
            if dim is not None and storage.list_size != dim:
                raise DataError(
                    f"{file}: column '{cfg.column}' has vectors of length {storage.list_size}, "
                    f"other files have {dim}"
                )
            dim = storage.list_size
        for col, role in ((cfg.label_column, "label"), (cfg.id_column, "id")):
            if col is not None and not pa.types.is_integer(schema.field(col).type):
                raise DataError(f"{file}: {role} column '{col}' has type {schema.field(col).type}; "
                                "expected integers")
        row0 = 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n:
                specs.append({"file": file, "row_group": rg, "row0": row0, "id0": total})
            row0 += n
            total += n
    if total == 0:
        raise DataError(f"{cfg.path}: the Parquet data has no rows")
    return Source(cfg, specs, dim=dim, n_rows=total, has_labels=cfg.label_column is not None)


def _int_column(t: pa.Table, col: str, role: str, file: str, row0: int) -> np.ndarray:
    values = t.column(col)
    if values.null_count:
        row = row0 + int(np.flatnonzero(np.asarray(values.is_null()))[0])
        raise DataError(f"{file}: {role} column '{col}' row {row} is null")
    return values.to_numpy()


def _read_parquet(cfg: ParquetSource, spec: dict) -> tuple:
    file, row0 = spec["file"], spec["row0"]
    cols = [c for c in (cfg.column, cfg.label_column, cfg.id_column) if c is not None]
    with pq.ParquetFile(file) as pf:
        t = pf.read_row_group(spec["row_group"], columns=list(dict.fromkeys(cols)))
    x = vectors_to_numpy(t.column(cfg.column), name=cfg.column, where=file, first_row=row0)
    if cfg.id_column is not None:
        ids = _int_column(t, cfg.id_column, "id", file, row0)
    else:
        ids = np.arange(len(t)) + spec["id0"]
    y = _int_column(t, cfg.label_column, "label", file, row0) if cfg.label_column is not None else None
    return ids, x, y, file, row0


# ---- Ray Data --------------------------------------------------------------------------------------


def read_dataset(source: Source):
    """The source as a Ray Dataset of the input schema, one block per shard, read by parallel tasks."""
    import ray.data

    cfg = source.config

    def read(batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for i in range(len(batch["spec"])):
            yield read_shard(cfg, batch["spec"][i])

    items = [{"spec": s} for s in source.specs]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read, batch_size=1, batch_format="numpy"
    )
