"""SemDeDup's within-cluster pass: a keep order, then greedy removal of rows too similar to a kept one, in blocks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# hard: keep the row farthest from the centroid (SemDeDup's default, "prototypicality" low first), easy: the
# closest, random: a seeded draw per cluster.
KEEP_MODES = ("hard", "easy", "random")
# Rows per block of the walk: the diagonal block's full product is half wasted, larger GEMMs run closer to the peak;
# 768 measured best on 10k-row clusters at d = 256, one thread (85 GFLOP/s of the exact pass against a 97 peak; 2,048:
# 69, 512: 81, 256: 70).
BLOCK = 768


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
    cosine similarity; the removed count for every eps of the summary. With `volatile` rows: the positions whose
    fate is `pending` (decided by the global pass) and the `edges` it needs, (later, earlier, similarity) position
    triples above the main threshold."""

    removed: np.ndarray
    duplicate_of: np.ndarray
    similarity: np.ndarray
    removed_per_eps: list[int]
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    edges: tuple[np.ndarray, np.ndarray, np.ndarray] = field(
        default_factory=lambda: (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)))


@functools.lru_cache(maxsize=4)
def _lower_mask(size: int) -> np.ndarray:
    return np.tril(np.ones((size, size), dtype=bool))


def _not_above_diagonal(b: int) -> np.ndarray:
    """(b, b) mask of the diagonal and below, sliced from a cached mask of a power-of-two size."""
    return _lower_mask(max(64, 1 << (b - 1).bit_length()))[:b, :b]


def greedy_dedup(n: int, rows: Callable[[int, int], np.ndarray], eps: Sequence[float], *, main: int = 0,
                 block: int = BLOCK, counted: np.ndarray | None = None,
                 volatile: np.ndarray | None = None) -> ClusterResult:
    """Walk the n rows of a cluster in keep order (`rows(i, j)` gives unit rows i..j-1 of that order); a row is
    removed when its cosine similarity to an earlier kept row exceeds 1 - eps. Done for every eps of `eps` in the
    same pass (the similarities are computed once), positions of removed rows reported for `eps[main]` with their
    most similar earlier kept row; `removed_per_eps` counts only the rows where `counted` is true (all when None).

    `volatile` rows (guests, and members that are guests elsewhere) may have partners this walk does not see, so at
    the main eps each row is one of: kept for sure (not volatile, and every earlier partner removed for sure),
    removed for sure (an earlier partner kept for sure: its `duplicate_of`), or pending. A pending row's fate is
    SemDeDup's greedy rule over the edges of every walk: its edges to earlier rows not removed for sure are
    returned (a removed-for-sure volatile row's edge to its partner too, as a guest's fate is written elsewhere).
    Other eps of `eps` treat every row as decided here (an approximation where rows are volatile).

    Memory is bounded by two blocks of rows and one block x block similarity matrix, whatever n is, plus the
    pending rows' edges; the cost is n^2 d / 2 multiply-adds, as one exact pass must be.
    """
    thresholds = 1.0 - np.asarray(eps, dtype=np.float64)
    thr = thresholds[main]
    E = len(thresholds)
    kept = np.zeros((E, n), dtype=bool)  # at main: kept for sure or pending (not removed for sure)
    sure = np.zeros(n, dtype=bool)
    pending = np.zeros(n, dtype=bool)
    vol = np.zeros(n, dtype=bool) if volatile is None else np.asarray(volatile, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    dup_sim = np.zeros(n, dtype=np.float32)
    e_later, e_earlier, e_sim = [], [], []
    open_eps = np.arange(E) != main
    product = np.empty(block * block, dtype=np.float32)  # each block pair's similarities, in reused memory
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        xb = np.ascontiguousarray(rows(b0, b1), dtype=np.float32)
        b = b1 - b0
        # Per eps, the best similarity to an earlier kept row (at main: kept for sure), tracked only where it exceeds
        # that eps's threshold: below it the row is not removed, so a lower value decides the same.
        best = np.full((E, b), -np.inf, dtype=np.float32)
        best_at = np.full(b, -1, dtype=np.int64)
        cand_later, cand_earlier, cand_sim = [], [], []  # edges to earlier pending rows, kept if the row is pending
        for a0 in range(0, b0, block):
            a1 = min(b0, a0 + block)
            if not kept[:, a0:a1].any():
                continue
            s = np.matmul(rows(a0, a1), xb.T, out=product[:(a1 - a0) * b].reshape(a1 - a0, b))  # (a, b)
            colmax = s.max(axis=0)
            # Per eps, only the kept rows and the columns whose best similarity can pass the threshold: on dense
            # data most rows are removed at large eps and few columns pass at small ones, so the sub-matrices are
            # small where the full masked pass per eps cost ~4 times the matrix product. A column already removed
            # at an eps other than the main one has nothing more to learn there.
            cand = colmax > thresholds[:, None]
            cand[open_eps] &= best[open_eps] <= thresholds[open_eps, None]
            for e in np.flatnonzero(cand.any(axis=1)):
                cols_e = np.flatnonzero(cand[e])
                rows_e = np.flatnonzero((sure if e == main else kept[e])[a0:a1])
                if not len(rows_e):
                    continue
                sub = s[:, cols_e] if len(rows_e) == a1 - a0 else s[np.ix_(rows_e, cols_e)]
                if e == main:
                    at = sub.argmax(axis=0)
                    m = sub[at, np.arange(len(cols_e))]
                    better = m > best[e, cols_e]
                    best_at[cols_e[better]] = a0 + rows_e[at[better]]
                else:
                    m = sub.max(axis=0)
                best[e, cols_e] = np.maximum(best[e, cols_e], m)
            rows_p = np.flatnonzero(pending[a0:a1])
            cols_m = np.flatnonzero(colmax > thr)
            if len(rows_p) and len(cols_m):
                sub = s[np.ix_(rows_p, cols_m)]
                pi, ci = np.nonzero(sub > thr)
                cand_later.append(cols_m[ci])
                cand_earlier.append(a0 + rows_p[pi])
                cand_sim.append(sub[pi, ci])
        # Similarities to later rows of the same block only (row i, column j > i); -inf elsewhere.
        su = xb @ xb.T
        np.putmask(su, _not_above_diagonal(b), -np.inf)
        rowmax = su.max(axis=1)  # row i's best similarity to a later row of the block
        for e in range(E):
            if e == main:
                continue
            k = best[e] <= thresholds[e]
            # The sequential walk visits only kept rows with a later in-block neighbour above the threshold (each
            # removes those neighbours): few where the eps is small (few neighbours) and where it is large (few
            # rows kept), where a walk over the removed rows would visit nearly every row.
            for i in np.flatnonzero(k & (rowmax > thresholds[e])):
                if k[i]:
                    k[su[i] > thresholds[e]] = False
            kept[e, b0:b1] = k
        # The main eps: the same walk with three fates.
        cl = np.concatenate(cand_later) if cand_later else np.zeros(0, np.int64)
        open_prev = np.zeros(b, dtype=bool)
        open_prev[cl] = True
        gone = best[main] > thr
        ok = ~gone & ~vol[b0:b1] & ~open_prev
        sb, pb = ok.copy(), ~gone & ~ok
        # In order, so a row's fate is final when it is visited: a row kept for sure removes its later neighbours
        # for sure; a pending one makes those not removed pending.
        rm = gone.copy()
        for i in np.flatnonzero(~gone & (rowmax > thr)):
            if rm[i]:
                continue
            later = np.flatnonzero(su[i] > thr)
            if sb[i]:
                rm[later], sb[later], pb[later] = True, False, False
            else:
                later = later[~rm[later]]
                sb[later], pb[later] = False, True
        sure[b0:b1], pending[b0:b1] = sb, pb
        kept[main, b0:b1] = sb | pb
        gone = np.flatnonzero(~(sb | pb))
        inner = np.where(sb[:, None], su[:, gone], -np.inf)
        at = inner.argmax(axis=0)
        m = inner[at, np.arange(len(gone))]
        use_inner = m > best[main, gone]
        dup_of[b0 + gone] = np.where(use_inner, b0 + at, best_at[gone])
        dup_sim[b0 + gone] = np.maximum(m, best[main, gone])
        # Edges the global pass needs: a pending row's to earlier pending rows (earlier blocks, then this block),
        # and a volatile removed row's to its partner.
        if len(cl):
            ce, cs = np.concatenate(cand_earlier), np.concatenate(cand_sim)
            keep_edge = pb[cl]
            e_later.append(b0 + cl[keep_edge])
            e_earlier.append(ce[keep_edge])
            e_sim.append(cs[keep_edge])
        pr = np.flatnonzero(pb)
        sub = su[np.ix_(pr, pr)]
        ii, jj = np.nonzero(sub > thr)
        e_later.append(b0 + pr[jj])
        e_earlier.append(b0 + pr[ii])
        e_sim.append(sub[ii, jj])
        vg = gone[vol[b0 + gone]]
        e_later.append(b0 + vg)
        e_earlier.append(dup_of[b0 + vg])
        e_sim.append(dup_sim[b0 + vg])
    removed = np.flatnonzero(~kept[main])
    counted = np.ones(n, dtype=bool) if counted is None else counted
    edges = (np.concatenate(e_later).astype(np.int64) if e_later else np.zeros(0, np.int64),
             np.concatenate(e_earlier).astype(np.int64) if e_earlier else np.zeros(0, np.int64),
             np.concatenate(e_sim).astype(np.float32) if e_sim else np.zeros(0, np.float32))
    return ClusterResult(removed, dup_of[removed], dup_sim[removed],
                         [int((counted & ~kept[e]).sum()) for e in range(E)], np.flatnonzero(pending), edges)
