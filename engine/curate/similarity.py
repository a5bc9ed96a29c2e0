"""SemDeDup's within-cluster pass: a keep order, then greedy removal of rows too similar to a kept one, in blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# hard: keep the row farthest from the centroid (SemDeDup's default, "prototypicality" low first), easy: the
# closest, random: a seeded draw per cluster.
KEEP_MODES = ("hard", "easy", "random")


def keep_order(ids: np.ndarray, unit: np.ndarray | None, centroid: np.ndarray | None, keep: str, seed: int,
               cluster: int, centroid_sims: np.ndarray | None = None) -> np.ndarray:
    """The order in which a cluster's rows claim to be kept (first = preferred), ties broken by id. One global
    order: a row's key depends on the row alone (its similarity to its own centroid, or a seeded hash of its id), so
    rows compared across clusters (probes) rank the same wherever they meet."""
    if keep == "random":
        # Independent of how the clusters were grouped into tasks, resumed, or which cluster the row is met in.
        return np.lexsort((ids, random_key(ids, seed)))
    sims = centroid_sims if centroid_sims is not None else unit @ centroid
    # lexsort: last key first; hard = farthest first = lowest cosine similarity to the centroid first.
    return np.lexsort((ids, sims if keep == "hard" else -sims))


def random_key(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per id (SplitMix64's finaliser of id + seed's stream offset)."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass
class ClusterResult:
    """Positions (in keep order) of the rows removed at the main eps, with the kept row each duplicates and their
    cosine similarity; the removed count for every eps of the summary."""

    removed: np.ndarray
    duplicate_of: np.ndarray
    similarity: np.ndarray
    removed_per_eps: list[int]


def greedy_dedup(n: int, rows: Callable[[int, int], np.ndarray], eps: Sequence[float], *, main: int = 0,
                 block: int = 2048, counted: np.ndarray | None = None,
                 preferred: np.ndarray | None = None) -> ClusterResult:
    """Walk the n rows of a cluster in keep order (`rows(i, j)` gives unit rows i..j-1 of that order); a row is
    removed when its cosine similarity to an earlier kept row exceeds 1 - eps. Done for every eps of `eps` in the
    same pass (the similarities are computed once), positions of removed rows reported for `eps[main]`;
    `removed_per_eps` counts only the rows where `counted` is true (all when None). A removed row's `duplicate_of`
    is its most similar earlier kept row where `preferred` is true (rows whose fate is final) when one is above the
    threshold, else its most similar earlier kept row.

    Memory is bounded by two blocks of rows and one block x block similarity matrix, whatever n is; the cost is
    n^2 d / 2 multiply-adds, as one exact pass must be.
    """
    thresholds = 1.0 - np.asarray(eps, dtype=np.float64)
    lowest = thresholds.min()
    E = len(thresholds)
    kept = np.zeros((E, n), dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    dup_sim = np.zeros(n, dtype=np.float32)
    pref = np.ones(n, dtype=bool) if preferred is None else np.asarray(preferred, dtype=bool)
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        xb = np.ascontiguousarray(rows(b0, b1), dtype=np.float32)
        b = b1 - b0
        # Per eps, the best similarity to an earlier kept row, tracked only where some similarity exceeds the lowest
        # threshold: below it no eps removes the row, so a lower value decides the same.
        best = np.full((E, b), -np.inf, dtype=np.float32)
        best_at = np.full(b, -1, dtype=np.int64)
        pbest = np.full(b, -np.inf, dtype=np.float32)  # the same at the main eps, over preferred kept rows only
        pbest_at = np.full(b, -1, dtype=np.int64)
        for a0 in range(0, b0, block):
            a1 = min(b0, a0 + block)
            if not kept[:, a0:a1].any():
                continue
            s = rows(a0, a1) @ xb.T  # (a, b)
            cols = np.flatnonzero(s.max(axis=0) > lowest)
            if not len(cols):
                continue
            sc = s[:, cols]
            for e in range(E):
                masked = np.where(kept[e, a0:a1, None], sc, -np.inf)
                at = masked.argmax(axis=0)
                m = masked[at, np.arange(len(cols))]
                if e == main:
                    better = m > best[e, cols]
                    best_at[cols[better]] = a0 + at[better]
                    if preferred is not None:
                        pm = np.where(pref[a0:a1, None], masked, -np.inf)
                        pat = pm.argmax(axis=0)
                        pv = pm[pat, np.arange(len(cols))]
                        pbetter = pv > pbest[cols]
                        pbest_at[cols[pbetter]] = a0 + pat[pbetter]
                        pbest[cols] = np.maximum(pbest[cols], pv)
                best[e, cols] = np.maximum(best[e, cols], m)
        # Similarities to earlier rows of the same block only (i before j); -inf elsewhere.
        su = np.where(np.triu(np.ones((b, b), dtype=bool), 1), xb @ xb.T, -np.inf).astype(np.float32)
        cols = np.flatnonzero(su.max(axis=0) > lowest)
        sc = su[:, cols]
        for e in range(E):
            near = sc > thresholds[e]  # (b, len(cols))
            k = best[e] <= thresholds[e]
            # Only rows with an earlier in-block neighbour above the threshold depend on which earlier rows were
            # kept; every other row's fate is already known, so the sequential walk is over those few.
            for c in np.flatnonzero(k[cols] & near.any(axis=0)):
                if (near[:, c] & k).any():
                    k[cols[c]] = False
            kept[e, b0:b1] = k
            if e == main:
                gone = np.flatnonzero(~k)
                inner = np.where(k[:, None], su[:, gone], -np.inf)
                at = inner.argmax(axis=0)
                m = inner[at, np.arange(len(gone))]
                use_inner = m > best[e, gone]
                dup_of[b0 + gone[use_inner]] = b0 + at[use_inner]
                dup_of[b0 + gone[~use_inner]] = best_at[gone[~use_inner]]
                dup_sim[b0 + gone] = np.maximum(m, best[e, gone])
                if preferred is not None:
                    pin = np.where((k & pref[b0:b1])[:, None], su[:, gone], -np.inf)
                    pat = pin.argmax(axis=0)
                    pv = pin[pat, np.arange(len(gone))]
                    use_pin = pv >= pbest[gone]
                    pv_best = np.maximum(pv, pbest[gone])
                    ok = pv_best > thresholds[e]
                    pick = np.where(use_pin, b0 + pat, pbest_at[gone])
                    dup_of[b0 + gone[ok]] = pick[ok]
                    dup_sim[b0 + gone[ok]] = pv_best[ok]
    removed = np.flatnonzero(~kept[main])
    counted = np.ones(n, dtype=bool) if counted is None else counted
    return ClusterResult(removed, dup_of[removed], dup_sim[removed],
                         [int((counted & ~kept[e]).sum()) for e in range(E)])
