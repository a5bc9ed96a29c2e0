"""Rows held on a torch device for Lloyd steps: uploaded once per fit, assigned and reduced there.

`DeviceRows` is the torch backend's data for a fit on a GPU (or, in reduced precision, on a CPU): per
iteration the distances, the argmin, the sums (float64), the counts and the SSE are all computed on the device,
and only the k x d statistics come back. Rows that do not fit in device memory stay in pinned host memory and
stream through in chunks, the copy of the next chunk overlapping the work on this one.

Reduced precision (`tf32`, `bf16`) ranks the centroids with low-precision products; a row whose two best
scores are closer than the products' worst-case rounding error is ranked again in fp32, so the labels are those
of fp32 (ties aside).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from engine.cluster import _fused
from engine.cluster._stats import HostRows, PartialStats

PRECISIONS = ("fp32", "tf32", "bf16")
# Unit roundoff of a product's inputs: tf32 keeps 10 mantissa bits, bf16 7.
_UNIT_ROUNDOFF = {"fp32": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}
_FP32_UNIT = 2.0**-24
# Rows per block of the distance work: a (block x k) float32 block of 256 MiB keeps a GPU's cores busy;
# the CPU wants blocks that stay in cache.
_BLOCK_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}
# Share of the free device memory the rows may take; the rest is the distance blocks and the allocator's slack.
_RESIDENT_SHARE = 0.6


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device of a fit: CUDA (the current one, i.e. Ray's assignment) when there is one, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def supported_precision(precision: str, device: torch.device, *, cpu_has_bf16: bool | None = None) -> str:
    """`precision` where `device` computes it natively; else fp32, with one warning saying why.

    tf32 needs an NVIDIA GPU of compute capability 8.0 (Ampere) or newer, bf16 too or a CPU with AVX512-BF16
    or AMX (emulated bf16 is slower than fp32: the setting is for speed, so it falls back).
    """
    if precision not in PRECISIONS:
        from engine.errors import ConfigError

        raise ConfigError(f"precision={precision!r} should be one of {', '.join(map(repr, PRECISIONS))}.")
    if precision == "fp32":
        return precision
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 8:
            return precision
        reason = f"{torch.cuda.get_device_name(device)} (compute capability {major}.x) has no {precision} units"
    elif precision == "bf16":
        if cpu_has_bf16 is None:
            cpu_has_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if cpu_has_bf16:
            return precision
        reason = "this CPU has no native bfloat16 (AVX512-BF16 or AMX)"
    else:
        reason = "a CPU has no tf32"
    warnings.warn(f"precision={precision}: {reason}; computing in fp32 instead", RuntimeWarning, stacklevel=3)
    return "fp32"


def place_rows(X: np.ndarray, w: np.ndarray | None, backend: str, *, device: str | torch.device | None = None,
               precision: str = "fp32", x_sq: np.ndarray | None = None) -> HostRows | DeviceRows:
    """The rows of a fit (KMeans's, a shard actor's) where it computes: on the GPU, uploaded once, for torch on
    CUDA and for faiss's GPU index; on the CPU in torch's reduced precision where the CPU has it; else in host
    memory. `backend` is a concrete one (`resolve_backend`); `precision` is checked here (`supported_precision`).
    """
    if backend == "faiss-gpu":
        return DeviceRows(X, w, device=torch.device("cuda"), search="faiss")
    if backend != "torch":
        return HostRows(X, w, backend, x_sq)
    device = resolve_device(device)
    precision = supported_precision(precision, device)
    if device.type == "cpu" and precision == "fp32":
        return HostRows(X, w, backend, x_sq)  # threads over row ranges: measured fastest on CPU
    # Unit weights are not sent: the device then skips the products by them.
    return DeviceRows(X, None if w is None or np.all(w == 1) else w, device=device, precision=precision)


class DeviceRows:
    """The rows (and weights) of a fit on one torch device, with the Lloyd step's reduction.

    X: (n, d) float32, checked; w: (n,) float64 weights or None; precision: one of PRECISIONS, already
    supported by the device (`supported_precision`); memory_limit: bytes of the device the rows may take
    (default: a share of the free memory on CUDA, no limit on CPU). `holds` says what the fit holds where.
    """

    def __init__(self, X: np.ndarray, w: np.ndarray | None = None, *, device: torch.device | str | None = None,
                 precision: str = "fp32", memory_limit: int | None = None, search: str = "torch"):
        self.device = resolve_device(device)
        self.precision = precision
        self.search = search  # "torch" (matrix products here) or "faiss" (a flat index of the centroids)
        self.n, self.d = X.shape
        self.w = w
        if not X.flags.writeable:
            X = X.copy()  # torch.from_numpy warns on read-only arrays
        host = torch.from_numpy(X)
        host_w = None if w is None else torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64))
        row_bytes = self.d * (4 + (2 if precision == "bf16" else 0)) + 4 + (8 if w is not None else 0)
        if memory_limit is None:
            memory_limit = (int(torch.cuda.mem_get_info(self.device)[0] * _RESIDENT_SHARE)
                            if self.device.type == "cuda" else self.n * row_bytes)
        chunk_rows = max(1, min(self.n, memory_limit // row_bytes))
        self.streamed = chunk_rows < self.n
        if self.streamed and self.device.type == "cuda":
            # Two chunks in flight (one computed, the next copied): each takes half the budget.
            chunk_rows = max(1, chunk_rows // 2)
            host = host.pin_memory()  # an asynchronous copy needs page-locked memory
            host_w = None if host_w is None else host_w.pin_memory()
        self._host = host
        self._host_w = host_w
        self._chunk_rows = chunk_rows
        self._resident = None if self.streamed else self._upload(0, self.n)
        what = f"{self.n} rows x {self.d} on {self.device} in {precision}"
        self.holds = (f"{what}, streamed from pinned host memory in chunks of {chunk_rows} rows" if self.streamed
                      else f"{what}, resident ({self.n * row_bytes / 2**20:.1f} MiB)")

    # --- the data interface ---------------------------------------------------------------------------------

    def stats(self, centroids: np.ndarray) -> PartialStats:
        """Sums (float64), counts and SSE of every row for `centroids`, computed on the device."""
        C, c_sq, C_low = self._centroids(centroids)
        k = C.shape[0]
        sums = torch.zeros((k, self.d), dtype=torch.float64, device=self.device)
        counts = torch.zeros(k, dtype=torch.float64, device=self.device)
        cluster_sse = torch.zeros(k, dtype=torch.float64, device=self.device)
        for X, x_sq, w, _ in self._chunks():
            for start in range(0, X.shape[0], self._block(k)):
                stop = min(start + self._block(k), X.shape[0])
                labels, sq = self._nearest(X[start:stop], x_sq[start:stop], C, c_sq, C_low)
                rows = X[start:stop].double()
                weight = torch.ones_like(sq, dtype=torch.float64) if w is None else w[start:stop]
                if w is not None:
                    rows = rows * weight[:, None]
                sums.index_add_(0, labels, rows)
                counts.index_add_(0, labels, weight)
                cluster_sse.index_add_(0, labels, sq.double() * weight)
        cluster_sse_np = cluster_sse.cpu().numpy()
        return PartialStats(sums.cpu().numpy(), counts.cpu().numpy(), float(cluster_sse_np.sum()), cluster_sse_np)

    def nearest_centroids(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`assign`: the device keeps no bounds between passes (HostRows' seeding entry point, for both)."""
        return self.assign(centroids)

    def assign(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid (int64) and squared distance (float32) of every row, copied back to the host."""
        C, c_sq, C_low = self._centroids(centroids)
        labels = np.empty(self.n, dtype=np.int64)
        sq_distances = np.empty(self.n, dtype=np.float32)
        for X, x_sq, _, offset in self._chunks():
            for start in range(0, X.shape[0], self._block(C.shape[0])):
                stop = min(start + self._block(C.shape[0]), X.shape[0])
                lab, sq = self._nearest(X[start:stop], x_sq[start:stop], C, c_sq, C_low)
                labels[offset + start:offset + stop] = lab.cpu().numpy()
                sq_distances[offset + start:offset + stop] = sq.cpu().numpy()
        return labels, sq_distances

    # --- internals ------------------------------------------------------------------------------------------

    def _upload(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        X = self._host[start:stop].to(self.device, non_blocking=True)
        w = None if self._host_w is None else self._host_w[start:stop].to(self.device, non_blocking=True)
        return X, (X * X).sum(dim=1), w

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]]:
        """(rows, their squared norms, weights, offset) of each chunk on the device; streamed chunks are copied
        on a side stream one chunk ahead of the work."""
        if self._resident is not None:
            yield (*self._resident, 0)
            return
        starts = list(range(0, self.n, self._chunk_rows))
        cuda = self.device.type == "cuda"
        copier = torch.cuda.Stream(self.device) if cuda else None

        def fetch(start: int):
            ctx = torch.cuda.stream(copier) if cuda else contextlib.nullcontext()
            with ctx:
                chunk = self._upload(start, min(start + self._chunk_rows, self.n))
                done = torch.cuda.Event() if cuda else None
                if cuda:
                    done.record(copier)
            return chunk, done

        pending = fetch(starts[0])
        for i, start in enumerate(starts):
            (X, x_sq, w), done = pending
            if cuda:
                torch.cuda.current_stream(self.device).wait_event(done)
                for t in (X, x_sq, w):
                    if t is not None:
                        t.record_stream(torch.cuda.current_stream(self.device))
            if i + 1 < len(starts):
                pending = fetch(starts[i + 1])
            yield X, x_sq, w, start

    def _block(self, k: int) -> int:
        return max(1, _BLOCK_BYTES.get(self.device.type, _BLOCK_BYTES["cuda"]) // (4 * k))

    def _centroids(self, centroids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        C = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(self.device)
        low = C.to(torch.bfloat16) if self.precision == "bf16" else None
        return C, (C * C).sum(dim=1), low

    def _nearest(self, X: torch.Tensor, x_sq: torch.Tensor, C: torch.Tensor, c_sq: torch.Tensor,
                 C_low: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.search == "faiss":
            return faiss_nearest(X, C)
        return nearest(X, x_sq, C, c_sq, self.precision, C_low)


def faiss_nearest(X: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance by a faiss flat index of the centroids, on X's device: a GPU index
    searches the CUDA tensor in place (faiss.contrib.torch_utils), so the rows never leave the device."""
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (faiss indexes take torch tensors, CUDA ones without a copy)

    if X.device.type == "cuda":
        from engine.cluster._stats import faiss_gpu_resources

        config = faiss.GpuIndexFlatConfig()
        config.device = X.device.index if X.device.index is not None else torch.cuda.current_device()
        index = faiss.GpuIndexFlatL2(faiss_gpu_resources(), C.shape[1], config)
    else:
        index = faiss.IndexFlatL2(C.shape[1])
    index.add(C.contiguous())
    sq, labels = index.search(X.contiguous(), 1)
    # The BLAS expansion can dip just below 0 for points on a centroid.
    return labels[:, 0].long(), torch.clamp_min(sq[:, 0], 0)


def kmeans_plusplus_device(rows: DeviceRows, n_clusters: int, w: np.ndarray, rng: np.random.Generator,
                           n_local_trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ (scikit-learn's, as `kmeans_plusplus`) on resident device rows: every pass over the rows
    runs on the device, and nothing waits for the host between centres (the draws are made up front).

    The same draws as the host version for the same generator, so the same seeds up to float rounding.
    """
    if rows.streamed:
        raise ValueError("kmeans_plusplus_device needs resident rows")
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    X, x_sq, _ = rows._resident
    n = X.shape[0]
    with torch.inference_mode():
        weights = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)).to(rows.device)
        first = int(rng.choice(n, p=w / w.sum()))
        # The host version draws uniform(size=trials) once per centre after the first: the same stream here.
        draws = torch.from_numpy(rng.uniform(size=(n_clusters - 1, n_local_trials))).to(rows.device)
        chosen = torch.empty(n_clusters, dtype=torch.int64, device=rows.device)
        chosen[0] = first
        closest = _sq_dist_rows(X[first:first + 1], X, x_sq)[0]
        potential = closest @ weights
        for c in range(1, n_clusters):
            cumulative = torch.cumsum(weights * closest, 0)
            ids = torch.searchsorted(cumulative, draws[c - 1] * potential).clamp_(max=n - 1)
            candidate = torch.minimum(closest, _sq_dist_rows(X[ids], X, x_sq))
            pots = candidate @ weights
            best = torch.argmin(pots)
            potential, closest = pots[best], candidate[best]
            chosen[c] = ids[best]
        return X[chosen].cpu().numpy()


def _sq_dist_rows(points: torch.Tensor, X: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances (m, n) from `points` to every row, float64 (for the cumulative sums), >= 0."""
    p_sq = (points * points).sum(dim=1)
    return torch.clamp_min((x_sq[None, :] - 2.0 * (points @ X.T) + p_sq[:, None]).double(), 0)


def nearest(X: torch.Tensor, x_sq: torch.Tensor, C: torch.Tensor, c_sq: torch.Tensor, precision: str = "fp32",
            C_low: torch.Tensor | None = None, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (int64) and squared distance (float32, >= 0) of each row of X, on X's device.

    fp32 ranks by ||c||^2 - 2 x.c in fp32. tf32 and bf16 rank with products in that precision, then rank again
    in fp32 the rows whose two best scores are within twice the worst-case error of a score:
    |error| <= 2 (3u + 2 d 2^-24) ||x|| max||c|| + d 2^-24 max||c||^2, u the precision's unit roundoff (inputs
    rounded: 2u, the product rounded to bf16: u; fp32 accumulation: d 2^-24). Outside those rows the low-precision
    winner is the fp32 winner, so the labels are fp32's.

    fused: rank with the Triton kernel of `_fused` (distance and argmin in one pass, the n x k scores never
    written: what bounds low-dimensional rows on a GPU); None uses it where it runs (CUDA, d <= 128).
    """
    with torch.inference_mode():
        if C.shape[0] == 1:
            return torch.zeros(X.shape[0], dtype=torch.int64, device=X.device), torch.clamp_min(
                c_sq[0] - 2.0 * (X @ C[0]) + x_sq, 0)
        if fused is None:
            fused = _fused.available(X.device) and X.shape[1] <= _fused.MAX_DIM
        if fused:
            labels, best, second = _fused.fused_assign(X, C, c_sq, precision=precision)
            if precision == "fp32":
                return labels, torch.clamp_min(best + x_sq, 0)
        elif precision == "fp32":
            best, labels = torch.addmm(c_sq, X, C.T, alpha=-2.0).min(dim=1)
            return labels, torch.clamp_min(best + x_sq, 0)
        else:
            if precision == "bf16":
                low = C.to(torch.bfloat16) if C_low is None else C_low
                scores = c_sq - 2.0 * (X.to(torch.bfloat16) @ low.T).float()
            else:
                with _tf32(X.device):
                    scores = torch.addmm(c_sq, X, C.T, alpha=-2.0)
            two, top = scores.topk(2, dim=1, largest=False)
            labels, best, second = top[:, 0].clone(), two[:, 0], two[:, 1]
        u = _UNIT_ROUNDOFF[precision]
        c_max = torch.sqrt(c_sq.max())
        d = X.shape[1]
        error = 2 * (3 * u + 2 * d * _FP32_UNIT) * torch.sqrt(x_sq) * c_max + d * _FP32_UNIT * c_max**2
        close = torch.nonzero(second - best <= 2 * error).squeeze(1)
        if close.numel():
            labels[close] = torch.addmm(c_sq, X[close], C.T, alpha=-2.0).argmin(dim=1)
        # The winner's distance in fp32: a low-precision score's error would otherwise reach the SSE.
        best = c_sq[labels] - 2.0 * (X * C[labels]).sum(dim=1)
        return labels, torch.clamp_min(best + x_sq, 0)


@contextlib.contextmanager
def _tf32(device: torch.device) -> Iterator[None]:
    """TF32 matrix products inside the block only (a process-wide switch in torch)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
