"""Lloyd-step math: nearest-centroid assignment, partial stats of a block, and k-means++ seeding."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import scipy.sparse

from engine.errors import ConfigError, DataError

if TYPE_CHECKING:  # torch is imported where it is used: a federated client that only answers a query, or runs
    import torch  # with the faiss backend, starts without it (~1.5 s a process; a Flower ClientApp is one a message)

Backend = Literal["auto", "faiss", "torch"]
BACKENDS = ("auto", "faiss", "torch")

# The torch backend holds a (rows x k) float32 distance block; a few MiB stays in CPU cache (measured
# fastest on CPU), while a GPU wants large blocks to keep its cores busy.
_TORCH_BLOCK_BYTES = {"cpu": 4 << 20, "cuda": 512 << 20}
# Below this k a full assignment costs little more than the bounds that would let rows skip it.
PRUNE_MIN_K = 32
_STATS_BLOCK_ROWS = 8192
# Elements per block of the NaN / inf check: a bool mask of the whole input would add a quarter of the
# input's bytes (0.3 GiB for a 5M x 64 shard actor, on every call); a block of it costs 4 MiB.
_CHECK_BLOCK_ELEMENTS = 4 << 20


@dataclass(frozen=True)
class PartialStats:
    """Sufficient statistics of a Lloyd step over one block of rows, for fixed centroids.

    Stats of disjoint blocks (shards, federated partitions) add up to the stats of their union, so a
    distributed step is `partial_stats(block_1, C) + partial_stats(block_2, C) + ...`, then `.centroids(C)`.
    """

    sums: np.ndarray  # (k, d) float64: weighted sum of the rows assigned to each centroid
    counts: np.ndarray  # (k,) float64: total weight assigned to each centroid
    sse: float  # weighted sum of squared distances to the assigned centroid (NaN: not released)
    # (k,) float64: the SSE of each cluster, which the empty-cluster repair splits by; None where a mode does not
    # release it (federated clients), and then the repair goes by counts.
    cluster_sse: np.ndarray | None = None

    def __add__(self, other: PartialStats) -> PartialStats:
        if not isinstance(other, PartialStats):
            return NotImplemented
        if self.sums.shape != other.sums.shape:
            raise DataError(
                f"cannot add partial stats of shape {self.sums.shape} and {other.sums.shape}: "
                "they were computed for different centroids"
            )
        cluster_sse = None
        if self.cluster_sse is not None and other.cluster_sse is not None:
            cluster_sse = self.cluster_sse + other.cluster_sse
        return PartialStats(self.sums + other.sums, self.counts + other.counts, self.sse + other.sse, cluster_sse)

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
        """The fields, for sending through Ray (`PartialStats(*t)` rebuilds it)."""
        return self.sums, self.counts, self.sse, self.cluster_sse

    def centroids(self, previous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """New centroids (float32, k x d) = sums / counts, and the indices of the empty clusters.

        An empty cluster (count 0) has no mean; it keeps its row of `previous` so the caller can decide
        how to repair it.
        """
        previous = np.asarray(previous)
        if previous.shape != self.sums.shape:
            raise DataError(f"previous centroids have shape {previous.shape}, expected {self.sums.shape}")
        filled = self.counts > 0
        new = previous.astype(np.float64, copy=True)
        new[filled] = self.sums[filled] / self.counts[filled, None]
        return new.astype(np.float32), np.flatnonzero(~filled)


def assign(
    X: np.ndarray, centroids: np.ndarray, *, backend: Backend = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row by squared L2: (labels int64[n], squared distances float32[n]).

    backend: "faiss" (GPU when the faiss build has GPUs, else CPU), "torch" (blocked matmul on CUDA when
    available, else CPU), or "auto" (faiss GPU when the faiss build has GPUs, else torch: measured
    fastest on CPU, see `resolve_backend`).
    A GPU backend uses one GPU, the current device (the one Ray assigned to the task or actor).
    """
    X = as_float32_matrix(X)
    centroids = as_centroids(centroids, n_features=X.shape[1])
    return nearest_on_host(X, centroids, resolve_backend(backend))


def stats_from_assignment(
    X: np.ndarray,
    labels: np.ndarray,
    sq_distances: np.ndarray,
    n_clusters: int,
    sample_weight: np.ndarray | None = None,
) -> PartialStats:
    """Partial stats of rows whose assignment is already known (e.g. from `assign`).

    Inputs are taken as validated: X float32 (n, d), labels in [0, n_clusters), weights >= 0. Without
    weights nothing of n rows is allocated (the work memory is a block), so a shard actor's pass costs no
    more than its labels and distances.
    """
    n = X.shape[0]
    if labels.shape != (n,) or sq_distances.shape != (n,):
        raise DataError(
            f"labels {labels.shape} and sq_distances {sq_distances.shape} should both have shape ({n},)"
        )
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    ones = np.ones(min(n, _STATS_BLOCK_ROWS)) if w is None else None
    # One nonzero per column: a (k x rows) CSC matrix built without sorting; its product with X sums the
    # weighted rows per cluster in float64 (measured 7x faster than np.add.at on 200k x 32, k=256). Row
    # blocks keep the float64 copy of X small and in cache: 1M x 64, k=1024 went from 0.16-0.85 s to 0.06 s.
    sums = np.zeros((n_clusters, X.shape[1]))
    cluster_sse = np.zeros(n_clusters)
    indptr = np.arange(_STATS_BLOCK_ROWS + 1)
    for start in range(0, n, _STATS_BLOCK_ROWS):
        stop = min(start + _STATS_BLOCK_ROWS, n)
        data = ones[: stop - start] if w is None else w[start:stop]
        membership = scipy.sparse.csc_matrix(
            (data, labels[start:stop], indptr[: stop - start + 1]), shape=(n_clusters, stop - start)
        )
        sums += membership @ X[start:stop].astype(np.float64)
        # Per block too: bincount casts its weights to float64, a copy of the block only.
        sq = sq_distances[start:stop] if w is None else sq_distances[start:stop] * w[start:stop]
        cluster_sse += np.bincount(labels[start:stop], weights=sq, minlength=n_clusters)
    if w is None:
        counts = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    else:
        counts = np.bincount(labels, weights=w, minlength=n_clusters)
    return PartialStats(sums, counts, float(cluster_sse.sum()), cluster_sse)


def partial_stats(
    X: np.ndarray,
    centroids: np.ndarray,
    sample_weight: np.ndarray | None = None,
    *,
    backend: Backend = "auto",
) -> PartialStats:
    """Sums, counts and SSE of one block of rows for fixed centroids: the one Lloyd-step reduction."""
    X = as_float32_matrix(X)
    centroids = as_centroids(centroids, n_features=X.shape[1])
    w = None if sample_weight is None else as_weights(sample_weight, X.shape[0])
    labels, sq_distances = nearest_on_host(X, centroids, resolve_backend(backend))
    return stats_from_assignment(X, labels, sq_distances, centroids.shape[0], w)


def kmeans_plusplus(
    X: np.ndarray,
    n_clusters: int,
    *,
    sample_weight: np.ndarray | None = None,
    seed: int | np.random.Generator = 0,
    n_local_trials: int | None = None,
) -> np.ndarray:
    """Greedy k-means++ seeding as scikit-learn does it: (n_clusters, d) float32 rows of X.

    Each new centre is the best (lowest resulting potential) of `n_local_trials` candidates drawn with
    probability proportional to weight x squared distance to the nearest chosen centre; the default is
    2 + log(n_clusters) trials. Deterministic for an integer seed.
    """
    X = as_float32_matrix(X)
    check_n_clusters(n_clusters, X.shape[0])
    w = as_weights(sample_weight, X.shape[0])
    check_enough_weight(w, n_clusters)
    if n_local_trials is not None:
        if isinstance(n_local_trials, bool) or not isinstance(n_local_trials, int | np.integer):
            raise ConfigError(f"n_local_trials should be an int or None, got {n_local_trials!r}.")
        if n_local_trials < 1:
            raise ConfigError(f"n_local_trials={n_local_trials} should be >= 1.")
    return kmeans_plusplus_unchecked(X, n_clusters, w, np.random.default_rng(seed), n_local_trials)


def resolve_backend(backend: str) -> str:
    """The concrete backend ("faiss-gpu", "faiss-cpu" or "torch") for a requested one."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} should be one of {', '.join(map(repr, BACKENDS))}.")
    if backend == "torch":
        return "torch"
    try:
        import faiss
    except ImportError:  # faiss is imported where it is used: the torch backend runs without it
        if backend == "faiss":
            from engine.runtime import require_faiss

            require_faiss("backend='faiss'")
        return "torch"
    if faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    if backend == "auto":
        # torch on CUDA when the faiss build has no GPU; on CPU too: one GEMM range per thread with numpy's
        # vectorised argmin ran at the matmul peak (1M x 64, k=1024), faiss.knn at 70-85% of it, and
        # faiss's OpenMP barriers degrade far more when the cores are shared with other work.
        return "torch"
    return "faiss-cpu"


def as_float32_matrix(X: object, name: str = "X") -> np.ndarray:
    """X as a C-contiguous float32 (n, d) array with n, d >= 1 and only finite values, else DataError."""
    if scipy.sparse.issparse(X):
        raise DataError(f"{name} is a sparse matrix; k-means needs a dense array (call .toarray()).")
    try:
        arr = np.asarray(X)
    except ValueError as e:  # ragged nested sequences
        raise DataError(f"{name} is not a rectangular array: {e}") from e
    if arr.dtype.kind == "c":
        raise DataError(f"{name} has dtype {arr.dtype}. Complex data not supported.")
    if arr.ndim != 2:
        raise DataError(
            f"{name} should be a 2-D array (n_samples, n_features), got shape {arr.shape}. Reshape your "
            "data: X.reshape(-1, 1) if it has a single feature, X.reshape(1, -1) if it is a single row."
        )
    for axis, what in enumerate(("sample", "feature")):
        if arr.shape[axis] == 0:
            raise DataError(f"{name} has 0 {what}(s) (shape={arr.shape}) while a minimum of 1 is required.")
    try:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} should hold numbers, got dtype {np.asarray(X).dtype}.") from e
    block = max(1, _CHECK_BLOCK_ELEMENTS // arr.shape[1])
    for start in range(0, arr.shape[0], block):
        part = arr[start:start + block]
        if not np.isfinite(part).all():
            row = start + int(np.flatnonzero(~np.isfinite(part).all(axis=1))[0])
            raise DataError(f"{name} contains NaN or infinity (row {row}).")
    return arr


def as_centroids(centroids: object, *, n_features: int, name: str = "centroids") -> np.ndarray:
    """Centroids as float32 (k, d) matching the data's d, else DataError."""
    C = as_float32_matrix(centroids, name=name)
    if C.shape[1] != n_features:
        raise DataError(f"{name} have {C.shape[1]} features, but X has {n_features} features.")
    return C


def as_weights(sample_weight: object, n_samples: int) -> np.ndarray:
    """Sample weights as float64 (n,), finite and >= 0; None means all ones."""
    if sample_weight is None:
        return np.ones(n_samples)
    try:
        w = np.asarray(sample_weight, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError("sample_weight should hold numbers.") from e
    if w.ndim == 0:
        w = np.full(n_samples, float(w))  # a scalar weighs every row the same, as in scikit-learn
    if w.ndim != 1:
        raise DataError(f"sample_weight should be 1-D, got shape {w.shape}.")
    if w.shape[0] != n_samples:
        raise DataError(f"sample_weight has {w.shape[0]} entries but X has {n_samples} rows.")
    if not np.isfinite(w).all():
        row = int(np.flatnonzero(~np.isfinite(w))[0])
        raise DataError(f"sample_weight contains NaN or infinity (row {row}).")
    if (w < 0).any():
        row = int(np.flatnonzero(w < 0)[0])
        raise DataError(f"sample_weight should be >= 0, got {w[row]} (row {row}).")
    return w


def check_n_clusters(n_clusters: object, n_samples: int) -> None:
    """n_clusters is an int in [1, n_samples], else ConfigError."""
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer):
        raise ConfigError(f"n_clusters should be an int, got {n_clusters!r}.")
    if n_clusters < 1:
        raise ConfigError(f"n_clusters={n_clusters} should be >= 1.")
    if n_samples < n_clusters:
        raise ConfigError(f"n_samples={n_samples} should be >= n_clusters={n_clusters}.")


def check_int(name: str, value: object, *, minimum: int) -> int:
    """`value` as an int >= `minimum`; anything else (a bool, a float, a smaller int) is a ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} should be an int, got {value!r}.")
    if value < minimum:
        raise ConfigError(f"{name}={value} should be >= {minimum}.")
    return int(value)


def unit_rows(X: np.ndarray, name: str = "X", first_row: int = 0) -> np.ndarray:
    """A copy of X with every row scaled to unit L2 norm; a zero row is a DataError naming it (counted from
    `first_row`, for a piece of a larger input)."""
    norms = np.sqrt(row_sq_norms(X))
    zero = norms == 0
    if zero.any():
        row = first_row + int(np.flatnonzero(zero)[0])
        raise DataError(f"{name} row {row} is all zeros: spherical=True needs rows with a direction.")
    return X / norms[:, None]


def check_enough_weight(w: np.ndarray, n_clusters: int) -> None:
    """At least n_clusters rows have positive weight, so k distinct rows can seed the centroids."""
    nonzero = int(np.count_nonzero(w))
    if nonzero < n_clusters:
        raise DataError(f"sample_weight has {nonzero} nonzero entries, should be >= n_clusters={n_clusters}.")


def nearest_on_host(
    X: np.ndarray, centroids: np.ndarray, backend: str, x_sq: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and squared distances; x_sq (the rows' squared norms) may be passed in to skip recomputing it."""
    if backend == "torch":
        return _assign_torch(X, centroids, x_sq)[:2]
    import faiss

    if backend == "faiss-gpu":
        # knn_gpu runs on the current device only: exactly one GPU, the one Ray assigned (faiss.Kmeans(gpu=1)
        # would shard over every visible GPU instead).
        sq_distances, labels = faiss.knn_gpu(faiss_gpu_resources(), X, centroids, 1)
    else:
        sq_distances, labels = faiss.knn(X, centroids, 1)
    # The BLAS expansion ||x||^2 - 2x.c + ||c||^2 can dip just below 0 for points on a centroid.
    return labels[:, 0].astype(np.int64, copy=False), np.maximum(sq_distances[:, 0], 0)


def _assign_and_stats(
    X: np.ndarray, centroids: np.ndarray, backend: str, w: np.ndarray, x_sq: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, PartialStats]:
    """`_assign`, then `stats_from_assignment` of the result: one Lloyd step's reduction.

    With torch on CPU each thread reduces the rows it has just assigned, while they are still in cache,
    and the threads' stats are added; elsewhere the whole assignment is reduced at once.
    """
    if _torch_on_cpu(backend):
        labels, sq_distances, stats = _assign_torch(X, centroids, x_sq, w)
        return labels, sq_distances, cast(PartialStats, stats)  # given w, the CPU path always reduces
    labels, sq_distances = nearest_on_host(X, centroids, backend, x_sq)
    return labels, sq_distances, stats_from_assignment(X, labels, sq_distances, centroids.shape[0], w)


class HostRows:
    """Rows in host memory with the Lloyd step's reduction (`stats`) and assignment: the CPU paths (torch's
    threads, faiss), the same interface as `DeviceRows`.

    With the torch backend on a CPU and k >= PRUNE_MIN_K, an assignment after the first skips the rows whose
    nearest centroid cannot have changed (Hamerly 2010, exact): each row keeps a lower bound on its distance to
    every other centroid, lowered by the largest distance any other centroid has moved since; a row whose exact
    distance to its own centroid (n x d work, not n x k x d) is below that bound keeps its label. Only the other
    rows are compared with all k centroids. Near convergence that is a small share of the rows, so Lloyd's later
    iterations cost a fraction of the first (measured in benchmarks/kmeans_inmemory.py). The bounds carry every
    rounding error of the fp32 distances they come from, so a skipped row's label is the one a full pass gives,
    ties within rounding aside.
    """

    def __init__(self, X: np.ndarray, w: np.ndarray | None, backend: str, x_sq: np.ndarray | None = None):
        self.X, self.w, self.backend = X, w, backend
        self.x_sq = row_sq_norms(X) if x_sq is None else x_sq
        self.holds = f"{X.shape[0]} rows x {X.shape[1]} in host memory ({backend})"
        self.prune = _torch_on_cpu(backend)
        # The last assignment's centroids, labels, and lower bounds on each row's distance to any other centroid.
        self._bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.pruned_ = 0  # rows the last assignment did not compare with every centroid

    def stats(self, centroids: np.ndarray) -> PartialStats:
        if self.w is None or self._prunes(centroids):  # nothing of n rows beyond the assignment is allocated
            labels, sq_distances = self.assign(centroids)
            return stats_from_assignment(self.X, labels, sq_distances, centroids.shape[0], self.w)
        return _assign_and_stats(self.X, centroids, self.backend, self.w, self.x_sq)[2]

    def assign(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A Lloyd step's assignment: skips the rows the bounds clear (see the class docstring)."""
        if not self._prunes(centroids):
            return self.nearest_centroids(centroids)
        return self._assign_pruned(np.ascontiguousarray(centroids, dtype=np.float32))

    def nearest_centroids(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A full assignment that neither reads nor keeps bounds: for seeding, whose candidate sets are not a
        moving set of centroids."""
        return nearest_on_host(self.X, centroids, self.backend, self.x_sq)

    def _prunes(self, centroids: np.ndarray) -> bool:
        return self.prune and centroids.shape[0] >= PRUNE_MIN_K

    def _assign_pruned(self, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X, n = self.X, self.X.shape[0]
        c_sq = row_sq_norms(C)
        if self._bounds is None or self._bounds[0].shape != C.shape:
            labels, sq_distances, lower = self._nearest_two(np.arange(n), C, c_sq)
            self._bounds, self.pruned_ = (C.copy(), labels, lower), 0
            return labels, sq_distances
        previous, labels, lower = self._bounds
        labels, lower = labels.copy(), lower.copy()
        moved = np.sqrt(np.square(C.astype(np.float64) - previous).sum(axis=1))
        # The largest move among the centroids other than a row's own: the runner-up for the rows of the largest.
        first, second = (np.argsort(moved)[-2:][::-1] if len(moved) > 1 else (0, 0))
        lower -= np.where(labels == first, moved[second], moved[first]).astype(np.float32)
        sq_distances = _own_sq_distances(X, C, labels)
        check = np.flatnonzero(np.sqrt(sq_distances) >= lower)
        if check.size:
            labels[check], sq_distances[check], lower[check] = self._nearest_two(check, C, c_sq)
        self._bounds, self.pruned_ = (C.copy(), labels, lower), n - check.size
        return labels, sq_distances

    def _nearest_two(self, rows: np.ndarray, C: np.ndarray, c_sq: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the given rows: the nearest centroid, the squared distance to it (exact, not the expansion), and a
        lower bound on the distance to every other centroid: the runner-up's fp32 expansion less its worst
        rounding error, (2d + 4) u (||x||^2 + max ||c||^2) with u = 2^-24 (Higham's bound for a dot product of
        length d, doubled for the two terms beside it)."""
        X = self.X if rows.size == self.X.shape[0] else self.X[rows]
        x_sq = self.x_sq if rows.size == self.X.shape[0] else self.x_sq[rows]
        labels, _, runner_up = _assign_torch(X, C, x_sq, second=True)
        error = (2 * X.shape[1] + 4) * 2.0**-24 * (x_sq + float(c_sq.max()))
        lower = np.sqrt(np.maximum(runner_up - error, 0)).astype(np.float32)
        return labels, _own_sq_distances(X, C, labels), lower


def _own_sq_distances(X: np.ndarray, C: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """||x - c_label||^2 of every row, computed directly (float32, no cancellation), in blocks of rows."""
    out = np.empty(X.shape[0], dtype=np.float32)
    for start in range(0, X.shape[0], _STATS_BLOCK_ROWS):
        stop = min(start + _STATS_BLOCK_ROWS, X.shape[0])
        diff = X[start:stop] - C[labels[start:stop]]
        out[start:stop] = np.einsum("ij,ij->i", diff, diff)
    return out


def row_sq_norms(X: np.ndarray) -> np.ndarray:
    """Squared L2 norm of every row, float32 (n,)."""
    return np.einsum("ij,ij->i", X, X)


def _torch_on_cpu(backend: str) -> bool:
    """The torch backend, on a machine without CUDA."""
    if backend != "torch":
        return False
    import torch

    return not torch.cuda.is_available()


def _assign_torch(
    X: np.ndarray, centroids: np.ndarray, x_sq: np.ndarray | None = None, w: np.ndarray | None = None,
    second: bool = False,
) -> tuple[np.ndarray, np.ndarray, PartialStats | np.ndarray | None]:
    """Labels and squared distances; the third value is the stats of the rows given `w` (CPU only), or with
    `second` (CPU only) the runner-up's squared distances by the same expansion."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not X.flags.writeable:
        X = X.copy()  # torch.from_numpy warns on read-only arrays
    n, k = X.shape[0], centroids.shape[0]
    block = max(1, _TORCH_BLOCK_BYTES[device.type] // (4 * k))
    labels = np.empty(n, dtype=np.int64)
    sq_distances = np.empty(n, dtype=np.float32)
    if x_sq is None:
        x_sq = row_sq_norms(X)
    with torch.inference_mode():
        C = torch.from_numpy(np.ascontiguousarray(centroids)).to(device)
        c_sq = (C * C).sum(dim=1)
        if device.type == "cpu":
            runner_up = np.empty(n, dtype=np.float32) if second else None
            stats = _assign_torch_cpu(X, C, c_sq, block, labels, sq_distances, x_sq, w, runner_up)
            return labels, sq_distances, runner_up if second else stats
        x_all = torch.from_numpy(X)
        for start in range(0, n, block):
            stop = min(start + block, n)
            dist = torch.addmm(c_sq, x_all[start:stop].to(device, non_blocking=True), C.T, alpha=-2.0)
            best, arg = dist.min(dim=1)
            sq_distances[start:stop] = best.cpu().numpy()
            labels[start:stop] = arg.cpu().numpy()
    sq_distances += x_sq
    # The expansion can dip just below 0 for points on a centroid.
    np.maximum(sq_distances, 0, out=sq_distances)
    return labels, sq_distances, None


def _assign_torch_cpu(
    X: np.ndarray,
    C: torch.Tensor,
    c_sq: torch.Tensor,
    block: int,
    labels: np.ndarray,
    sq_distances: np.ndarray,
    x_sq: np.ndarray,
    w: np.ndarray | None,
    runner_up: np.ndarray | None = None,
) -> PartialStats | None:
    """Fill labels and sq_distances, one contiguous row range per thread; with w, also their stats; with
    `runner_up`, fill it with each row's second smallest squared distance.

    Each of torch's intra-op threads takes a range and runs single-threaded GEMMs on it: no barrier per
    block. With torch's own 2-thread GEMM on small blocks a shared 2-core machine spent most of its time
    in OpenMP barriers (6 GFLOP/s vs 25 here, faiss.knn 16, measured in one run at n=100k, d=64, k=1024).
    """
    import torch

    n, k = X.shape[0], C.shape[0]
    workers = max(1, min(torch.get_num_threads(), -(-n // block)))
    X_t = torch.from_numpy(X)

    def run(rows: range) -> PartialStats | None:
        with torch.inference_mode():  # thread-local, so entered in every worker
            buffer = torch.empty(min(block, len(rows)), k)  # reused: stays in cache
            for start in range(rows.start, rows.stop, block):
                stop = min(start + block, rows.stop)
                # ||c||^2 - 2 x.c ranks the centroids for a row; ||x||^2 is added to the winner only.
                dist = torch.addmm(c_sq, X_t[start:stop], C.T, alpha=-2.0, out=buffer[: stop - start]).numpy()
                # numpy's row argmin is vectorised: 10 G elements/s on one core here, torch.min(dim=1) with
                # indices 0.5 G, which cost more than the GEMM itself (k=1024, d=64).
                best = dist.argmin(axis=1)
                labels[start:stop] = best
                sq_distances[start:stop] = np.take_along_axis(dist, best[:, None], axis=1)[:, 0]
                if runner_up is not None:
                    dist[np.arange(stop - start), best] = np.inf
                    runner_up[start:stop] = dist.min(axis=1) if k > 1 else np.inf
        part = slice(rows.start, rows.stop)
        if runner_up is not None:
            runner_up[part] += x_sq[part]
        sq_distances[part] += x_sq[part]
        # The expansion can dip just below 0 for points on a centroid.
        np.maximum(sq_distances[part], 0, out=sq_distances[part])
        if w is None:
            return None
        return stats_from_assignment(X[part], labels[part], sq_distances[part], k, w[part])

    if workers == 1:
        return run(range(n))
    step = -(-n // workers)
    ranges = [range(start, min(start + step, n)) for start in range(0, n, step)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = list(thread_pool(workers).map(run, ranges))
    finally:
        torch.set_num_threads(threads)
    if w is None:
        return None
    total = parts[0]
    for part_stats in parts[1:]:
        total += part_stats
    return total


@functools.cache
def thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="engine-assign")


@functools.cache
def faiss_gpu_resources() -> faiss.StandardGpuResources:  # noqa: F821
    import faiss

    # One set of GPU scratch buffers per process; allocating them per call costs more than the search.
    return faiss.StandardGpuResources()


def kmeans_plusplus_unchecked(
    X: np.ndarray, n_clusters: int, w: np.ndarray, rng: np.random.Generator, n_local_trials: int | None
) -> np.ndarray:
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    n = X.shape[0]
    x_sq = np.einsum("ij,ij->i", X, X)
    centers = np.empty((n_clusters, X.shape[1]), dtype=np.float32)

    first = rng.choice(n, p=w / w.sum())
    centers[0] = X[first]
    closest_sq = _sq_dist_to(X[first : first + 1], X, x_sq)[0]
    potential = float(closest_sq @ w)
    for c in range(1, n_clusters):
        cumulative = np.cumsum(w * closest_sq)
        candidate_ids = np.searchsorted(cumulative, rng.uniform(size=n_local_trials) * potential)
        np.clip(candidate_ids, None, n - 1, out=candidate_ids)
        # Squared distance of every row to its nearest centre if each candidate were added (in place: the
        # (trials x n) float64 block is the largest buffer of the seeding).
        candidate_sq = _sq_dist_to(X[candidate_ids], X, x_sq)
        np.minimum(closest_sq, candidate_sq, out=candidate_sq)
        candidate_pot = candidate_sq @ w
        best = int(np.argmin(candidate_pot))
        potential = float(candidate_pot[best])
        closest_sq = candidate_sq[best]
        centers[c] = X[candidate_ids[best]]
    return centers


def _sq_dist_to(points: np.ndarray, X: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """Squared L2 distances (m, n) from `points` to every row of X, in float64 for the cumulative sums."""
    p_sq = np.einsum("ij,ij->i", points, points)
    d = (x_sq[None, :] - 2.0 * (points @ X.T) + p_sq[:, None]).astype(np.float64)
    return np.maximum(d, 0.0, out=d)
