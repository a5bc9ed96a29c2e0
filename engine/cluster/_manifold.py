"""The optional manifold step before clustering: UMAP of the embeddings (umap-learn, the `umap` extra)."""

from __future__ import annotations

import functools
import warnings

import numpy as np

from engine.config import UmapConfig, check_installed
from engine.errors import ConfigError


@functools.cache
def import_umap():
    """umap-learn, with numba's on-disk cache switched on for its compiled functions that lack it.

    umap-learn and pynndescent compile ~250 numba functions, most without `cache=True`: every new process (a
    `dce run`, a Ray task) compiled them again, ~20 s on a 2-core CPU for a 1,000-row UMAP. Cached, a later process
    loads them in ~1 s. Only module-level functions not yet compiled are switched; numba writes each cache file
    atomically, so concurrent processes are safe. Once per process: later calls return the module.
    """
    import sys

    import umap
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher
    from numba.core.errors import NumbaWarning

    # A few of pynndescent's functions use dynamic globals, which numba cannot cache: it compiles them as before
    # and warns, once per function and process; the warning says nothing a user can act on.
    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)

    for name in [m for m in list(sys.modules) if m.split(".")[0] in ("umap", "pynndescent")]:
        for value in list(vars(sys.modules[name]).values()):
            if (isinstance(value, Dispatcher) and isinstance(value._cache, NullCache)
                    and getattr(value, "__module__", None) == name and not value.overloads):
                value.enable_caching()
    return umap


def umap_reduce(z: np.ndarray, cfg: UmapConfig, n_components: int, *, seed: int = 0,
                knn: tuple | None = None) -> np.ndarray:
    """z (n, d) embedded by UMAP into (n, n_components) float32, seeded and therefore single-threaded.

    N2D (McConville et al. 2019) clusters an autoencoder's latent space after this step: UMAP keeps the
    local neighbourhoods, so clusters that curve through the latent space become compact blobs that a
    Gaussian mixture or k-means separates. `knn` is a k-nearest-neighbour graph of z from `umap_knn`, so that
    several layouts of the same rows build it once.
    """
    check_umap_sizes(z.shape[0], cfg, n_components)
    umap = import_umap()
    reducer = umap.UMAP(n_components=n_components, n_neighbors=cfg.n_neighbors, min_dist=cfg.min_dist,
                        metric=cfg.metric, random_state=seed, n_jobs=1,
                        **({"precomputed_knn": knn} if knn is not None else {}))
    with warnings.catch_warnings():
        # A seeded UMAP is single-threaded by design; umap-learn warns about it every time.
        warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state.*")
        # A precomputed graph has no search index: UMAP's `transform` of new rows, which is not used, is unavailable.
        warnings.filterwarnings("ignore", message=r".*precomputed_knn\[2\].*")
        try:
            out = reducer.fit_transform(z)
        except ValueError as e:
            if "metric" in str(e).lower():
                raise ConfigError(f"cluster.umap.metric={cfg.metric!r}: {e}") from None
            raise
    return np.ascontiguousarray(out, dtype=np.float32)


def umap_knn(z: np.ndarray, cfg: UmapConfig, n_components: int, *, seed: int = 0) -> tuple:
    """The k-nearest-neighbour graph (indices, distances; each row its own first neighbour) that UMAP builds its
    fuzzy graph from, for `umap_reduce(..., knn=)`: layouts from other seeds then differ only in UMAP's
    optimisation. Euclidean: exact, by FAISS (a flat index: all n^2 distances). Other metrics: UMAP's own
    approximate search (NN-descent, seeded), whose kernels numba cannot cache (~30 s to compile in each process)."""
    check_umap_sizes(z.shape[0], cfg, n_components)
    if cfg.metric in ("euclidean", "l2"):
        import faiss

        x = np.ascontiguousarray(z, dtype=np.float32)
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        squared, indices = index.search(x, cfg.n_neighbors)
        return indices.astype(np.int32), np.sqrt(np.maximum(squared, 0)).astype(np.float32)
    umap = import_umap()
    try:
        indices, distances, _ = umap.umap_.nearest_neighbors(z, cfg.n_neighbors, cfg.metric, {}, False,
                                                             np.random.RandomState(seed), n_jobs=1)
    except (ValueError, KeyError) as e:
        if "metric" in str(e).lower() or cfg.metric in str(e):
            raise ConfigError(f"cluster.umap.metric={cfg.metric!r}: {e}") from None
        raise
    return indices, distances


def check_umap_sizes(n: int, cfg: UmapConfig, n_components: int) -> None:
    """UMAP's settings against the number of rows (and that umap is installed), before any work."""
    if cfg.n_neighbors >= n:
        raise ConfigError(f"cluster.umap.n_neighbors={cfg.n_neighbors} should be < the number of rows ({n})")
    # UMAP's spectral initialisation needs n_components + 1 eigenvectors of an n x n graph.
    if n_components >= n - 1:
        raise ConfigError(
            f"cluster.umap.n_components={n_components} should be < the number of rows - 1 ({n - 1})"
        )
    check_installed("umap", extra="umap", key="cluster.manifold")

