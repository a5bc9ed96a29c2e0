"""Curation: SemDeDup against an exact brute-force reference, resume and a killed worker, bad input; balanced
sampling. Integration tests run on the shared local Ray."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import KEY, s3_server
from typer.testing import CliRunner
from waiting import wait_for

from engine.cli import app
from engine.curate import dedup, greedy_dedup, open_embeddings, sample
from engine.curate.hierarchy import balanced_quotas, split_quota
from engine.data.schema import vector_array

EPS = 0.05


def planted(n: int = 3000, d: int = 32, copies: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, x): random rows in 4 directions, `copies` of them also present 1-3 times lightly perturbed."""
    rng = np.random.default_rng(seed)
    # centers small against the noise: unplanted rows stay far below the thresholds tested (no near-ties)
    centers = rng.normal(size=(4, d)) * 0.5
    base = n - 2 * copies
    x = centers[rng.integers(0, 4, base)] + rng.normal(size=(base, d))
    extra = []
    for src in rng.choice(base, copies, replace=False):
        for _ in range(rng.integers(1, 4)):
            extra.append(x[src] * rng.uniform(0.5, 2) + 0.02 * rng.normal(size=d))
    x = np.concatenate([x, np.array(extra)])[:n].astype(np.float32)
    ids = rng.permutation(10 * n)[:len(x)].astype(np.int64)
    return ids, x


def write(folder: Path, ids: np.ndarray, x: np.ndarray, files: int = 3, row_group: int = 400) -> Path:
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        pq.write_table(pa.table({"id": ids[part], "z": vector_array(x[part])}), folder / f"part-{i}.parquet",
                       row_group_size=row_group)
    return folder


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(ids: np.ndarray, u: np.ndarray, labels: np.ndarray, centroids: np.ndarray, keep: str,
                eps: float = EPS) -> dict[int, int]:
    """removed id -> kept id it duplicates: the definition, row by row, within each cluster."""
    removed = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        sims = u[members] @ centroids[c]
        order = members[np.lexsort((ids[members], sims if keep == "hard" else -sims))]
        kept: list[int] = []
        for i in order:
            if kept:
                s = u[kept].astype(np.float64) @ u[i].astype(np.float64)
                j = int(np.argmax(s))
                if s[j] > 1 - eps:
                    removed[int(ids[i])] = int(ids[kept[j]])
                    continue
            kept.append(i)
    return removed


def result(out: Path) -> tuple[np.ndarray, dict[int, int]]:
    kept = pq.read_table(out / "kept").column("id").to_numpy()
    dups = pq.read_table(out / "duplicates").to_pydict()
    return np.sort(kept), dict(zip(dups["id"], dups["duplicate_of"], strict=True))


# ---- without Ray ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [7, 64, 5000])
def test_blocked_pass_equals_the_row_by_row_definition(block):
    ids, x = planted(n=600, d=8, copies=80, seed=1)
    u = unit(x)
    order = np.argsort(ids)
    res = greedy_dedup(len(u), lambda i, j: u[order[i:j]], [0.01, EPS, 0.3], main=1, block=block)
    want = brute_force(ids[order], u[order], np.zeros(len(u), int), np.zeros((1, 8)), "hard")
    # zero centroid: all centroid similarities tie, so the order is by id, as `order` walks
    got = {int(ids[order][r]): int(ids[order][d]) for r, d in zip(res.removed, res.duplicate_of, strict=True)}
    assert got == want and len(want) > 50
    # every eps of the summary is the greedy rule at that eps (0.3: most rows removed, the dense case)
    for e, eps in enumerate([0.01, EPS, 0.3]):
        at_eps = brute_force(ids[order], u[order], np.zeros(len(u), int), np.zeros((1, 8)), "hard", eps=eps)
        assert res.removed_per_eps[e] == len(at_eps)
    assert res.removed_per_eps[0] < res.removed_per_eps[1] < res.removed_per_eps[2] > len(u) / 2
    assert (res.similarity > 1 - EPS).all()


def global_greedy(ids: np.ndarray, u: np.ndarray, csims: np.ndarray, walks: list[np.ndarray], keep: str,
                  eps: float = EPS) -> tuple[set[int], set[tuple[int, int]]]:
    """(removed ids, candidate edges as id pairs): SemDeDup's greedy rule, row by row in the global keep order, over
    the pairs above the threshold that share a walk (positions of the rows compared together)."""
    edges = set()
    for w in walks:
        s = u[w].astype(np.float64) @ u[w].T.astype(np.float64)
        for i, j in np.argwhere(np.triu(s > 1 - eps, 1)):
            edges.add((min(w[i], w[j]), max(w[i], w[j])))
    partners: dict[int, set[int]] = {}
    for a, b in edges:
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)
    from engine.curate.similarity import keep_order

    removed: set[int] = set()
    order = keep_order(ids, None, None, keep, 0, 0, centroid_sims=csims)
    rank = {int(r): n for n, r in enumerate(order)}
    for i in order:
        seen = partners.get(int(i), set())
        if any(rank[p] < rank[int(i)] and p not in removed for p in seen):
            removed.add(int(i))
    return {int(ids[r]) for r in removed}, {(int(ids[a]), int(ids[b])) for a, b in edges}


@pytest.mark.parametrize(("block", "edge_bytes"), [(7, 28 * 5), (64, 28 * 40), (5000, 1 << 20)])
@pytest.mark.parametrize("keep", ["hard", "random"])
def test_walks_and_the_global_pass_equal_the_greedy_rule_over_every_edge(tmp_path, block, edge_bytes, keep):
    from engine.curate.groups import walk_cluster
    from engine.curate.resolve import resolve_pending
    from engine.curate.similarity import keep_order

    ids, x = planted(n=600, d=8, copies=120, seed=4)
    u = unit(x).astype(np.float32)
    rng = np.random.default_rng(0)
    csims = rng.random(len(u)).astype(np.float32)
    homes = rng.integers(0, 3, len(u))
    # a third of the rows are guests in one other cluster, as probes make them
    guest_in = np.where(rng.random(len(u)) < 0.33, (homes + rng.integers(1, 3, len(u))) % 3, -1)
    walks, files = [], {"kept": [], "duplicates": [], "pending": [], "edges": []}
    alone = set()  # removed by each home walk taken alone, guests counted as kept (the undo-free rule)
    for c in range(3):
        w = np.flatnonzero((homes == c) | (guest_in == c))
        w = w[keep_order(ids[w], None, None, keep, 0, c, centroid_sims=csims[w])]
        walks.append(w)
        out = walk_cluster(c, ids[w], homes[w], csims[w], guest_in[w] >= 0, lambda i, j, w=w: u[w[i:j]], [EPS],
                           0, block)
        plain = greedy_dedup(len(w), lambda i, j, w=w: u[w[i:j]], [EPS], block=block)
        alone |= {int(i) for i in ids[w[plain.removed]][homes[w[plain.removed]] == c]}
        for what in files:
            files[what].append(tmp_path / f"{what}-{c}.parquet")
            pq.write_table(out[what], files[what][-1])
    # edge_bytes: the edges decided in many rank ranges (spilled), a few, or one
    n_kept, n_removed, extra = resolve_pending(files["kept"], files["pending"], files["edges"], keep, 0,
                                               tmp_path / "global", edge_bytes=edge_bytes)
    kept = np.concatenate([pq.read_table(f).column("id").to_numpy() for f in files["kept"] + extra[:1]])
    dups = pa.concat_tables([pq.read_table(f) for f in files["duplicates"] + extra[1:]]).to_pydict()
    want_removed, edges = global_greedy(ids, u, csims, walks, keep)
    assert set(dups["id"]) == want_removed and len(want_removed) > 100 and n_removed > 0 and n_kept > 0
    assert len(alone ^ want_removed) >= 5  # deciding in each walk alone is wrong here
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, dups["id"]])), np.sort(ids))
    kept_set = set(kept.tolist())
    assert not [e for e in edges if e[0] in kept_set and e[1] in kept_set]  # no kept pair the walks compared
    pos = {int(i): n for n, i in enumerate(ids)}
    for r, d, sim in zip(dups["id"], dups["duplicate_of"], dups["similarity"], strict=True):
        assert d in kept_set and ((min(r, d), max(r, d)) in edges or (max(r, d), min(r, d)) in edges)
        assert abs(float(u[pos[r]] @ u[pos[d]]) - sim) < 1e-5 and sim > 1 - EPS


@pytest.mark.parametrize("eps", [0.01, EPS, 0.3])
def test_guest_bounds_never_drop_a_pair_across_clusters(eps):
    from engine.curate.partition import bisector_reach, guest_margin

    rng = np.random.default_rng(0)
    u = unit(rng.normal(size=(2000, 4))).astype(np.float64)
    c = unit(rng.normal(size=(12, 4)))
    cs = u @ c.T
    home = cs.argmax(axis=1)
    a, b = np.nonzero(np.triu(u @ u.T > 1 - eps, 1))
    split = home[a] != home[b]
    a, b = np.concatenate([a[split], b[split]]), np.concatenate([b[split], a[split]])  # both directions
    assert len(a) > 100
    # row a of cluster home[a], partner b in home[b]: a must pass both bounds for home[b]
    gap = np.linalg.norm(c[home[a]] - c[home[b]], axis=1)
    assert (cs[a, home[a]] - cs[a, home[b]] <= bisector_reach(eps) * gap + 1e-12).all()
    angle = np.arccos(np.clip(cs, -1, 1))
    assert (angle[a, home[b]] <= angle[a, home[a]] + guest_margin(eps) + 1e-12).all()
    # and the bisector bound is the tighter of the two on these rows: fewer rows pass it
    near_margin = (angle <= angle[np.arange(len(u)), home][:, None] + guest_margin(eps)).sum()
    gaps = np.linalg.norm(c[home][:, None, :] - c[None, :, :], axis=2)
    near_bisector = (cs[np.arange(len(u)), home][:, None] - cs <= bisector_reach(eps) * gaps).sum()
    assert near_bisector < near_margin


@pytest.mark.parametrize("io", ["direct", "no O_DIRECT", "O_DIRECT refused"])
@pytest.mark.parametrize("dim", [3, 256])
def test_bucket_vectors_read_back_any_row_range(tmp_path, monkeypatch, io, dim):
    # direct I/O where the file system takes it; buffered where the platform has no O_DIRECT or the file system
    # refuses it (EINVAL, as older tmpfs does)
    import errno

    from engine.curate.partition import read_vectors, scratch_rows, write_vectors

    if io == "no O_DIRECT":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    elif io == "O_DIRECT refused":
        real_open, direct = os.open, os.O_DIRECT

        def refuse(path, flags, *args):
            if flags & direct:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", refuse)
    x = np.random.default_rng(dim).standard_normal((3000, dim)).astype(np.float32)
    v = scratch_rows("test", len(x), dim)
    v[:] = x
    write_vectors(v, tmp_path / "p.f32")
    with pytest.raises(TypeError):  # only page-aligned rows
        write_vectors(x, tmp_path / "q.f32")
    for r0, r1 in [(0, 3000), (0, 1), (1, 2), (341, 342), (1000, 2999), (2999, 3000), (5, 5)]:
        assert np.array_equal(read_vectors(tmp_path / "p.f32", r0, r1, dim), x[r0:r1]), (r0, r1)


def test_cluster_groups_are_contiguous_fit_memory_and_come_in_a_multiple_of_the_cpus():
    from engine.curate.partition import plan_groups

    rng = np.random.default_rng(0)
    cap = 50_000  # rows of d = 8 in memory_bytes
    for big in (False, True):
        counts = rng.integers(1, 2000, 1000)
        if big:
            counts[500] = 90_000  # larger than the budget: a group alone
        for cpus in (1, 2, 3, 16):
            groups = plan_groups(counts, 8, memory_bytes=cap * 4 * 8, cpus=cpus)
            assert [c for g in groups for c in g] == list(range(len(counts)))
            sizes = np.array([counts[g].sum() for g in groups])
            assert all(s <= cap or len(g) == 1 for g, s in zip(groups, sizes, strict=True))
            fit = sizes[sizes <= cap]
            assert len(fit) % cpus == 0 or big, (len(fit), cpus)  # the cluster alone may split a range in two
            assert fit.max() <= 1.25 * np.median(fit) or big, sizes
    few = plan_groups(np.array([5, 5, 5]), 8, memory_bytes=1 << 30, cpus=4)
    assert few == [[0], [1], [2]]


def test_cli_and_job_probes_default_is_the_library_default():
    import inspect

    from engine.cli import dedup as cli_dedup
    from engine.curate.dedup import DEFAULT_PROBES
    from jobs import dedup as job

    assert inspect.signature(cli_dedup).parameters["probes"].default == DEFAULT_PROBES
    assert f"default={DEFAULT_PROBES}," in inspect.getsource(job)


def test_balanced_quotas_split_evenly_where_sizes_allow():
    rng = np.random.default_rng(0)
    q = split_quota(np.array([100, 3, 50, 1]), 40, rng)
    assert q.tolist() == [18, 3, 18, 1]
    assert split_quota(np.array([5, 5]), 20, rng).tolist() == [5, 5]

    class L:
        def __init__(self, k, labels):
            self.centroids, self.labels = np.zeros((k, 2)), np.asarray(labels)

    # level 1: 4 clusters; level 2: {0, 1} and {2, 3}
    quotas = balanced_quotas([L(4, []), L(2, [0, 0, 1, 1])], np.array([1000, 10, 5, 5]), 30, seed=0)
    # 30 over the top: 20 and 10 (all its rows); the 20 evenly over {1000, 10} rows
    assert quotas.tolist() == [10, 10, 5, 5]


# ---- on Ray --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_set(tmp_path_factory):
    ids, x = planted()
    return ids, x, write(tmp_path_factory.mktemp("planted") / "emb", ids, x)


@pytest.mark.parametrize("keep", ["hard", "easy"])
def test_dedup_equals_brute_force_and_writes_every_id_once(ray_local, planted_set, tmp_path, keep):
    ids, x, emb = planted_set
    # tiny memory: every group is memory-mapped and walked in blocks of 50 rows
    summary = dedup(emb, tmp_path / "out", eps=EPS, k=6, keep=keep, block=50, memory_bytes=1, probes=1)
    out = tmp_path / "out"
    centroids = np.load(out / "centroids.npy")
    u = unit(x)
    labels = (u @ centroids.T).argmax(axis=1)
    want = brute_force(ids, u, labels, centroids, keep)
    kept, got = result(out)
    assert got == want and len(want) >= 150
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, list(got)])), np.sort(ids))
    assert summary["removed"] == len(want) and summary["kept"] == len(ids) - len(want)
    counts = {s["eps"]: s["removed"] for s in summary["summary"]}
    assert counts[EPS] == len(want) and counts[0.001] <= counts[EPS] <= counts[0.2]
    for name in ("kept", "duplicates"):
        assert json.loads((out / name / "_manifest.json").read_text())["rows"] == len(pq.read_table(out / name))
    assert not (tmp_path / ".out.partial").exists()


def test_dedup_with_one_cluster_is_the_exact_all_pairs_result(ray_local, planted_set, tmp_path):
    ids, x, emb = planted_set
    dedup(emb, tmp_path / "out", eps=EPS, k=1, keep="hard", block=300)
    u = unit(x)
    centroids = np.load(tmp_path / "out" / "centroids.npy")
    assert result(tmp_path / "out")[1] == brute_force(ids, u, np.zeros(len(u), int), centroids, "hard")


def test_random_keep_is_seeded(ray_local, planted_set, tmp_path):
    _, _, emb = planted_set
    a = dedup(emb, tmp_path / "a", k=4, keep="random", seed=5)
    b = dedup(emb, tmp_path / "b", k=4, keep="random", seed=5)
    assert result(tmp_path / "a")[1] == result(tmp_path / "b")[1] and a["removed"] == b["removed"]


def boundary_pairs(centers: int = 6, d: int = 64, background: int = 1200, pairs: int = 150,
                   seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(ids, x): rows around `centers` directions, plus `pairs` near-duplicate pairs planted on the bisecting plane
    of two centers, so about half of them fall on either side of a cluster boundary."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    x = [c[rng.integers(0, centers, background)] + rng.normal(size=(background, d))]
    for _ in range(pairs):
        a, b = rng.choice(centers, 2, replace=False)
        normal = (c[a] - c[b]) / np.linalg.norm(c[a] - c[b])
        noise = rng.normal(size=d)
        row = (c[a] + c[b]) / 2 + noise - (noise @ normal) * normal
        x.append(np.stack([row, row + 0.2 * rng.normal(size=d)]))
    x = np.concatenate([x[0], *x[1:]]).astype(np.float32)
    return rng.permutation(10 * len(x))[:len(x)].astype(np.int64), x


@pytest.mark.parametrize("keep", ["hard", "random"])
def test_probes_find_pairs_split_across_clusters(ray_local, tmp_path, keep):
    ids, x = boundary_pairs()
    emb = write(tmp_path / "emb", ids, x)
    u = unit(x).astype(np.float64)
    sims = u @ u.T
    exact = np.argwhere(np.triu(sims > 1 - EPS, 1))
    assert len(exact) >= 150  # the planted pairs, and no near-tie decides the test
    assert not ((sims > 1 - EPS - 0.01) & (sims < 1 - EPS + 0.01)).any()
    pos = {int(i): n for n, i in enumerate(ids)}
    missed = {}
    for probes in (1, 3):
        out = tmp_path / f"p{probes}"
        summary = dedup(emb, out, eps=EPS, k=6, keep=keep, probes=probes, block=64)
        kept, got = result(out)
        np.testing.assert_array_equal(np.sort(np.concatenate([kept, list(got)])), np.sort(ids))
        is_kept = np.isin(ids, kept)
        # pairs the exact search finds that the result leaves with both rows kept
        missed[probes] = int((is_kept[exact[:, 0]] & is_kept[exact[:, 1]]).sum())
        # precision against the exact search: every removed row's partner is kept and really above the threshold
        for r, d in got.items():
            assert d in set(kept.tolist()) and sims[pos[r], pos[d]] > 1 - EPS
        assert summary["removed"] == len(got) and summary["probes"] == probes
    assert missed[1] >= 10, missed  # within-cluster search alone leaves split pairs
    assert missed[3] == 0, missed


@pytest.mark.parametrize("keep", ["hard", "easy"])
def test_probes_leave_no_pair_the_search_compared_with_both_rows_kept(ray_local, tmp_path, keep):
    """Dense rows in 6 dimensions (a few partners each, chains of them across cluster boundaries): deciding each row
    in its own cluster and undoing removals whose partner went elsewhere left 28 (hard) and 34 (easy) kept pairs
    here; the global pass leaves none among the pairs the search compared."""
    from engine.curate.partition import guest_margin

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 6)).astype(np.float32)
    ids = rng.permutation(30000)[:3000].astype(np.int64)
    emb = write(tmp_path / "emb", ids, x)
    out = tmp_path / "out"
    summary = dedup(emb, out, eps=EPS, k=20, keep=keep, probes=3, block=64)
    kept, got = result(out)
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, list(got)])), np.sort(ids))
    u = unit(x).astype(np.float64)
    sims = u @ u.T
    pos = {int(i): n for n, i in enumerate(ids)}
    is_kept = np.isin(ids, kept)
    for r, d in got.items():  # the engine compares in float32
        assert is_kept[pos[d]] and sims[pos[r], pos[d]] > 1 - EPS - 1e-6
    # the pairs the search compared: same home cluster, or one row a guest (within the margin, among the 3
    # nearest) in the other's; pairs within 1e-4 of a threshold or margin are left out (float32 vs float64)
    cs = u @ np.load(out / "centroids.npy").astype(np.float64).T
    top = np.argsort(-cs, axis=1)[:, :3]
    home = top[:, 0]
    limit = np.cos(np.arccos(np.clip(cs[np.arange(len(u)), home], -1, 1)) + guest_margin(EPS))
    guest = np.zeros(cs.shape, dtype=bool)
    for j in (1, 2):
        guest[np.arange(len(u)), top[:, j]] = cs[np.arange(len(u)), top[:, j]] >= limit + 1e-4
    a, b = np.nonzero(np.triu(sims > 1 - EPS + 1e-4, 1))
    compared = (home[a] == home[b]) | guest[a, home[b]] | guest[b, home[a]]
    assert compared.sum() >= 2000 and (home[a] != home[b])[compared].sum() >= 300
    both = is_kept[a] & is_kept[b] & compared
    assert not both.any(), [(int(ids[i]), int(ids[j])) for i, j in zip(a[both], b[both], strict=True)][:5]
    assert summary["pending"] > 0 and summary["removed"] == len(got)


class Stop(Exception):
    """Stands for a crash of the driver after some clusters finished."""


def test_rerun_skips_finished_clusters_and_equals_an_uninterrupted_run(ray_local, planted_set, tmp_path):
    _, _, emb = planted_set
    settings = dict(eps=EPS, k=12, keep="easy", block=64, flush_rows=1)
    dedup(emb, tmp_path / "whole", **settings)

    def crash(stage, info):
        if stage == "similarity":
            raise Stop

    with pytest.raises(Stop):
        dedup(emb, tmp_path / "out", on_progress=crash, **settings)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial" / "plan.json").is_file()
    # the stopped tasks are killed asynchronously: one still alive could finish a cluster after the rerun counts them
    deadline = time.monotonic() + 30
    while _group_task_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    summary = dedup(emb, tmp_path / "out", **settings)
    # every row group was assigned before the crash, so none is read for assignment again
    assert summary["clusters_resumed"] > 0 and summary["pieces_resumed"] == len(open_embeddings(str(emb)).pieces)
    assert summary["group_tasks"]["clusters_skipped"] == summary["clusters_resumed"]
    assert result(tmp_path / "out")[0].tolist() == result(tmp_path / "whole")[0].tolist()
    assert result(tmp_path / "out")[1] == result(tmp_path / "whole")[1]


def _group_task_pids() -> list[int]:
    """Workers running a cluster-group task: Ray titles a worker process after the task it runs."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::process_group"):
                pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_worker_killed_mid_run_loses_nothing(ray_local, tmp_path):
    ids, x = planted(n=12000, d=64, copies=600, seed=2)
    emb = write(tmp_path / "emb", ids, x, files=2, row_group=3000)
    records = tmp_path / ".out.partial" / "records"
    killed: list[int] = []

    def kill_a_group_task():
        wait_for(lambda: records.is_dir() and any(records.glob("*.json")), 120, "the first finished cluster")
        pid = wait_for(_group_task_pids, 30, "a running group task")[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_a_group_task, daemon=True)
    killer.start()
    summary = dedup(emb, tmp_path / "out", eps=EPS, k=8, keep="hard", block=16, flush_rows=1, probes=1)
    killer.join(timeout=5)
    assert killed, "no group task was killed"
    out = tmp_path / "out"
    centroids = np.load(out / "centroids.npy")
    u = unit(x)
    want = brute_force(ids, u, (u @ centroids.T).argmax(axis=1), centroids, "hard")
    kept, got = result(out)
    assert got == want and summary["removed"] == len(want)
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, list(got)])), np.sort(ids))


def test_dedup_and_sample_read_embeddings_from_an_object_store(ray_local, planted_set, tmp_path):
    import pyarrow.fs as pafs

    ids, x, emb = planted_set
    dedup(emb, tmp_path / "local", eps=EPS, k=4, keep="hard")
    with s3_server() as s3:
        fs = pafs.S3FileSystem(endpoint_override=s3.endpoint, scheme="http", access_key=KEY, secret_key=KEY,
                               region="us-east-1")
        for f in sorted(emb.glob("*.parquet")):
            pq.write_table(pq.read_table(f), f"{s3.bucket}/emb/{f.name}", filesystem=fs, row_group_size=400)
        uri = s3.uri("emb")
        r = _cli("dedup", uri, "--out", str(tmp_path / "remote"), "--k", "4", "--keep", "hard")
        assert r.exit_code == 0, r.output
        r = _cli("sample", uri, "--out", str(tmp_path / "sampled"), "--n", "300", "--levels", "2")
        assert r.exit_code == 0, r.output
    # the same rows, read from the object store, give the same result as from the local folder
    assert result(tmp_path / "remote")[1] == result(tmp_path / "local")[1]
    assert result(tmp_path / "remote")[0].tolist() == result(tmp_path / "local")[0].tolist()
    sampled = pq.read_table(tmp_path / "sampled" / "sampled").column("id").to_numpy()
    assert len(sampled) == 300 and np.isin(sampled, ids).all()


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_error(r, *words: str) -> None:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("case", ["zero", "nan", "eps0", "eps2", "id", "k", "state_in_out", "state_in_input",
                                  "state_in_store"])
def test_dedup_bad_input_is_one_error_and_writes_nothing(ray_local, tmp_path, case):
    ids, x = planted(n=300, d=8, copies=10)
    if case == "zero":
        x[17] = 0
    if case == "nan":
        x[42, 3] = np.nan
    emb = write(tmp_path / "emb", ids, x, files=1)
    if case == "id":
        pq.write_table(pa.table({"key": ids, "z": vector_array(x)}), emb / "part-0.parquet")
    args = {"eps0": ["--eps", "0"], "eps2": ["--eps", "2.5"], "k": ["--k", "301"],
            "state_in_out": ["--state-dir", str(tmp_path / "out" / "state")],
            "state_in_input": ["--state-dir", str(emb / "state")],
            "state_in_store": ["--state-dir", "s3://bucket/state"]}.get(case, [])
    assert len(ids) <= 300
    r = _cli("dedup", str(emb), "--out", str(tmp_path / "out"), "--k", "3", *args)
    words = {"zero": ["row 17", f"id={ids[17]}", "all zeros"], "nan": ["row 42", "NaN"], "eps0": ["--eps=0"],
             "eps2": ["--eps=2.5", "(0, 2)"], "id": ["missing column 'id'", "--id-column"],
             "k": ["--k=301", f"{len(ids)}"], "state_in_out": ["--state-dir=", "inside --out"],
             "state_in_input": ["--state-dir=", "inside the input"], "state_in_store": ["--state-dir=s3://bucket/state",
                                                                                       "not an object store"]}[case]
    _one_error(r, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]


def test_a_large_kmeans_fit_takes_the_free_cpus_of_a_node_and_a_small_one_one(ray_local):
    from engine.curate.partition import THREADED_ABOVE, fit_cpus

    free = int(ray_local.available_resources()["CPU"])
    assert fit_cpus(THREADED_ABOVE, 1) == min(free, int(ray_local.cluster_resources()["CPU"])) > 1
    assert fit_cpus(THREADED_ABOVE - 1, 1) == 1
    pg = ray_local.util.placement_group([{"CPU": free - 1}])
    ray_local.get(pg.ready())
    try:  # another job holds all CPUs but one: the fit asks for what is free
        assert fit_cpus(THREADED_ABOVE, 1) == 1
    finally:
        ray_local.util.remove_placement_group(pg)


def test_dedup_cli_writes_kept_and_duplicates(ray_local, planted_set, tmp_path):
    _, _, emb = planted_set
    r = _cli("dedup", str(emb), "--out", str(tmp_path / "out"), "--k", "4", "--keep", "random")
    assert r.exit_code == 0, r.output
    assert "kept" in r.output and (tmp_path / "out" / "summary.json").is_file()
    again = _cli("dedup", str(emb), "--out", str(tmp_path / "out"), "--k", "4")
    _one_error(again, "not empty", "--overwrite")
    assert _cli("dedup", str(emb), "--out", str(tmp_path / "out"), "--k", "4", "--overwrite").exit_code == 0


# ---- sampling ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    sizes = [1500, 300, 100, 60, 40]
    x = np.concatenate([c + 0.1 * rng.normal(size=(s, 16)) for c, s in zip(centers, sizes, strict=True)])
    labels = np.repeat(np.arange(5), sizes)
    ids = np.arange(len(x)) * 3 + 1
    return ids, labels, write(tmp_path_factory.mktemp("imbalanced") / "emb", ids, x.astype(np.float32), files=2)


@pytest.mark.parametrize("strategy", ["random", "closest"])
def test_sample_is_balanced_across_the_hierarchy(ray_local, imbalanced, tmp_path, strategy):
    ids, labels, emb = imbalanced
    summary = sample(emb, tmp_path / "out", n=200, levels=2, k=[20, 5], strategy=strategy, resample_steps=3)
    got = pq.read_table(tmp_path / "out" / "sampled").column("id").to_numpy()
    assert len(got) == len(set(got)) == 200 and set(got) <= set(ids)
    per_blob = np.bincount(labels[np.searchsorted(ids, got)], minlength=5)
    # uniform sampling would give 150/30/10/6/4; balanced gives each concept about the same share
    assert per_blob.min() >= 25 and per_blob.max() <= 60, per_blob
    level2 = pq.read_table(tmp_path / "out" / "hierarchy" / "level-2.parquet")
    assert level2.num_rows == 5 and sum(level2.column("rows").to_pylist()) == len(ids)
    level1 = pq.read_table(tmp_path / "out" / "hierarchy" / "level-1.parquet")
    assert sum(level1.column("quota").to_pylist()) == 200 and summary["n"] == 200
    again = sample(emb, tmp_path / "again", n=200, levels=2, k=[20, 5], strategy=strategy, resample_steps=3)
    assert again["n"] == 200
    np.testing.assert_array_equal(pq.read_table(tmp_path / "again" / "sampled").column("id").to_numpy(), np.sort(got))


@pytest.mark.parametrize("case", ["n", "levels", "zero"])
def test_sample_bad_input_is_one_error_and_writes_nothing(ray_local, tmp_path, case):
    ids, x = planted(n=300, d=8, copies=10)
    if case == "zero":
        x[5] = 0
    emb = write(tmp_path / "emb", ids, x, files=1)
    args = {"n": ["--n", f"{len(ids) + 1}"], "levels": ["--n", "10", "--levels", "2", "--k", "5"],
            "zero": ["--n", "10", "--levels", "1", "--k", "5"]}[case]
    r = _cli("sample", str(emb), "--out", str(tmp_path / "out"), *args)
    _one_error(r, *{"n": [f"--n={len(ids) + 1}", f"{len(ids)}"], "levels": ["--k has 1 values", "--levels=2"],
                    "zero": ["row 5", "all zeros"]}[case])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]
