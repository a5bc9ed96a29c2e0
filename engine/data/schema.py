"""The shard schema: column names, vector columns as fixed_size_list<float32>, and their checks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine.errors import DataError

ID = "id"
X = "x"
LABEL = "label"
PARTITION = "partition"
Z = "z"
CLUSTER = "cluster"
DISTANCE = "distance"


def vector_array(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A (n, d) float matrix as a fixed_size_list<float32>[d] Arrow array (zero-copy when possible)."""
    m = np.ascontiguousarray(matrix, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {m.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def vectors_to_numpy(column: pa.ChunkedArray | pa.Array, *, name: str = X, where: str = "",
                     first_row: int = 0) -> np.ndarray:
    """A vector column as a (n, d) float32 matrix.

    Accepts fixed_size_list, list / large_list (all rows must have the same length) and tensor extension
    types (Ray's and Arrow's fixed-shape tensors, flattened). Mixed lengths and nulls are DataErrors naming
    `where`, the column and the row; rows are counted from `first_row` (the column's first row in `where`).
    """
    if isinstance(column, pa.ChunkedArray):
        parts, dim, row0 = [], None, first_row
        for chunk in column.chunks:
            part = vectors_to_numpy(chunk, name=name, where=where, first_row=row0)
            if len(part):
                if dim is not None and part.shape[1] != dim:
                    raise DataError(
                        f"{_prefix(where)}column '{name}' has vectors of mixed lengths: row {first_row} has "
                        f"{dim}, row {row0} has {part.shape[1]}"
                    )
                dim = part.shape[1]
                parts.append(part)
            row0 += len(chunk)
        if not parts:
            return np.zeros((0, _list_size(column.type) or 0), dtype=np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
    arr = column
    if arr.null_count:
        row = first_row + int(np.flatnonzero(np.asarray(arr.is_null()))[0])
        raise DataError(f"{_prefix(where)}column '{name}' row {row} is null")
    if isinstance(arr.type, pa.BaseExtensionType):
        # Ray's tensor type and Arrow's fixed_shape_tensor: their own conversion knows the logical layout.
        if hasattr(arr, "to_numpy_ndarray"):
            try:
                return np.asarray(arr.to_numpy_ndarray(), dtype=np.float32).reshape(len(arr), -1)
            except (ValueError, TypeError) as e:
                raise DataError(
                    f"{_prefix(where)}column '{name}' of type {arr.type} is not a tensor of numbers with "
                    f"one shape ({e})"
                ) from None
        arr = arr.storage
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
        return _numeric(arr.flatten(), name, where).reshape(len(arr), d)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = np.asarray(arr.value_lengths())
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise DataError(
                f"{_prefix(where)}column '{name}' has vectors of mixed lengths: row {first_row} has {lengths[0]}, "
                f"row {first_row + row} has {lengths[row]}"
            )
        d = int(lengths[0]) if len(lengths) else 0
        return _numeric(arr.flatten(), name, where).reshape(len(arr), d)
    raise DataError(
        f"{_prefix(where)}column '{name}' has type {arr.type}; expected a list or fixed_size_list of numbers"
    )


def check_finite(matrix: np.ndarray, ids: np.ndarray | None = None, *, name: str = X, where: str = "",
                 first_row: int = 0) -> None:
    """Raise a DataError naming the first row with NaN or inf (counted from `first_row`) and its id."""
    bad = ~np.isfinite(matrix)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        what = "NaN" if np.isnan(matrix[row]).any() else "inf"
        ident = f" (id={int(ids[row])})" if ids is not None else ""
        raise DataError(f"{_prefix(where)}column '{name}' row {first_row + row}{ident} has {what} values")


def _list_size(t: pa.DataType) -> int | None:
    return t.list_size if pa.types.is_fixed_size_list(t) else None


def _numeric(values: pa.Array, name: str, where: str) -> np.ndarray:
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise DataError(f"{_prefix(where)}column '{name}' holds {values.type}; expected numbers")
    if values.null_count:
        raise DataError(f"{_prefix(where)}column '{name}' has null elements inside its vectors")
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32)


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def match_by_id(ids: np.ndarray, other_ids: np.ndarray, values: np.ndarray, *, where: str) -> np.ndarray:
    """`values` (keyed by `other_ids`) reordered to `ids`; both id sets must be equal, each id exactly once."""
    if len(other_ids) != len(ids):
        raise DataError(f"{where}: holds {len(other_ids)} rows but the embeddings hold {len(ids)}")
    order = np.argsort(other_ids, kind="stable")
    sorted_ids = other_ids[order]
    if len(sorted_ids) > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
        raise DataError(f"{where}: some ids appear more than once")
    pos = np.searchsorted(sorted_ids, ids)
    pos = np.minimum(pos, len(sorted_ids) - 1)
    if (sorted_ids[pos] != ids).any():
        missing = ids[sorted_ids[pos] != ids][0]
        raise DataError(f"{where}: id {missing} of the embeddings has no row")
    return values[order][pos]
