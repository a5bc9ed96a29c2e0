"""Hierarchical k-means with resampling steps and balanced quotas over its tree (Vo et al. 2024, "Automatic
Data Curation for Self-Supervised Learning"; facebookresearch/ssl-data-curation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Level:
    """One level: its unit centroids, and for each item of the level below (rows of the sample for level 1,
    centroids of level t-1 above) the cluster it is in."""

    centroids: np.ndarray
    labels: np.ndarray


def _nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = x @ centroids.T
    labels = sims.argmax(axis=1)
    return labels, sims[np.arange(len(x)), labels]


def resampled_kmeans(x: np.ndarray, k: int, *, steps: int, resample_size: int, seed: int,
                     max_iter: int = 25) -> Level:
    """Spherical k-means, then `steps` times: keep the `resample_size` items of each cluster closest to its
    centroid and run k-means again on those alone. Big dense clusters then weigh no more than small ones,
    which moves centroids from the dense modes towards the tails (the paper's point: uniform over concepts)."""
    from engine.cluster import KMeans

    km = KMeans(k, spherical=True, seed=seed, max_iter=max_iter).fit(x)
    centroids = km.cluster_centers_.astype(np.float32)
    labels, sims = _nearest(x, centroids)
    for step in range(steps if resample_size > 1 else 0):
        picked = []
        for c in range(k):
            members = np.flatnonzero(labels == c)
            picked.append(members[np.argsort(-sims[members], kind="stable")[:resample_size]])
        chosen = np.concatenate(picked)
        if len(chosen) < k:
            break
        centroids = KMeans(k, spherical=True, seed=seed + step + 1, max_iter=max_iter).fit(
            x[chosen]).cluster_centers_.astype(np.float32)
        labels, sims = _nearest(x, centroids)
    return Level(centroids, labels)


def hierarchical_kmeans(x: np.ndarray, ks: list[int], *, steps: int, seed: int,
                        resample_sizes: list[int] | None = None) -> list[Level]:
    """Level 1 clusters the rows `x`, level t the centroids of level t-1; the resample size defaults to half the
    mean cluster size of each level, as the paper's configurations set it."""
    levels: list[Level] = []
    items = x
    for t, k in enumerate(ks):
        size = resample_sizes[t] if resample_sizes else max(1, len(items) // k // 2)
        levels.append(resampled_kmeans(items, k, steps=steps, resample_size=size, seed=seed + 1000 * t))
        items = levels[-1].centroids
    return levels


def split_quota(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """As even a split of `target` over groups of `sizes` as their sizes allow: every group gets min(x, size)
    for the largest such x, and the remainder goes one each to randomly chosen groups still larger than x."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.sum() <= target:
        return sizes.copy()
    lo, hi = 0, int(sizes.max())
    while hi - lo > 1:  # largest x with sum(min(x, sizes)) <= target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if np.minimum(mid, sizes).sum() <= target else (lo, mid)
    x = hi if np.minimum(hi, sizes).sum() <= target else lo
    quota = np.minimum(x, sizes)
    remainder = target - int(quota.sum())
    if remainder:
        quota[rng.choice(np.flatnonzero(sizes > x), remainder, replace=False)] += 1
    return quota


def balanced_quotas(levels: list[Level], level1_sizes: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Rows to draw from each level-1 cluster: `n` split evenly over the top level's clusters, each one's share
    split evenly over its children, down to level 1 (Vo et al.'s hierarchical sampling, without repeats)."""
    rng = np.random.default_rng(seed)
    flat = [np.asarray(level1_sizes, dtype=np.int64)]  # rows under each cluster of each level
    for t in range(1, len(levels)):
        flat.append(np.bincount(levels[t].labels, weights=flat[-1], minlength=len(levels[t].centroids)).astype(
            np.int64))
    quotas = split_quota(flat[-1], n, rng)
    for t in range(len(levels) - 1, 0, -1):  # share level t's quotas among level t-1's clusters
        below = np.zeros(len(levels[t - 1].centroids), dtype=np.int64)
        for c in range(len(quotas)):
            children = np.flatnonzero(levels[t].labels == c)
            if len(children):
                below[children] = split_quota(flat[t - 1][children], int(quotas[c]), rng)
        quotas = below
    return quotas
