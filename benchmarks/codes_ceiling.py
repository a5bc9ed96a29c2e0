"""Is a run held back by its clustering or by its encoder? Its ACC beside what labelled classifiers reach on its codes.

For each finished `dce run` directory (embeddings/ with a label column, assignments/): the run's ACC, and the accuracy
of classifiers given the true labels on the same codes the clustering saw: k-nearest-neighbours (faiss, exact,
leave-one-out) and an RBF SVM (scikit-learn, k-fold, on at most --svm-rows rows). A run within a few tenths of these
ceilings cannot gain much from another clustering step (UMAP settings, a mixture, self-labelling on its partition):
its encoder's codes are what to improve. Issue 26 item 2 asked this of N2D's MNIST codes.

    python benchmarks/codes_ceiling.py RUN_DIR [RUN_DIR ...] [--neighbors 5 10] [--record]

One JSON line per run; --record appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import append_section  # noqa: E402

from engine.data import read_table  # noqa: E402
from engine.errors import IncompleteResultError  # noqa: E402
from engine.metrics import clustering_accuracy  # noqa: E402


class RunError(ValueError):
    """A run directory this script cannot read: the message names the folder and what is missing."""


def codes(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, true labels, the run's clusters), rows in id order."""
    if not run.is_dir():
        raise RunError(f"{run}: no such run directory")
    try:
        emb = read_table(run / "embeddings", stage="embed")
        assign = read_table(run / "assignments", stage="assign", columns=["id", "cluster"])
    except IncompleteResultError as e:
        raise RunError(f"{e} (not a finished dce run?)") from None
    if emb is None or assign is None:
        raise RunError(f"{run}: its embeddings or assignments hold no rows")
    if "label" not in emb.column_names:
        raise RunError(f"{run / 'embeddings'}: no label column (the data set has no labels)")
    emb, assign = emb.sort_by("id"), assign.sort_by("id")
    if not np.array_equal(emb.column("id").to_numpy(), assign.column("id").to_numpy()):
        raise RunError(f"{run}: embeddings/ and assignments/ hold different rows")
    z = np.stack(emb.column("z").to_numpy(zero_copy_only=False)).astype(np.float32)
    return z, emb.column("label").to_numpy(), assign.column("cluster").to_numpy()


def knn_accuracy(z: np.ndarray, y: np.ndarray, neighbors: list[int]) -> dict[int, float]:
    """Leave-one-out accuracy of a majority vote of each row's nearest neighbours' true labels (ties: lowest label)."""
    import faiss

    index = faiss.IndexFlatL2(z.shape[1])
    index.add(np.ascontiguousarray(z))
    _, nearest = index.search(np.ascontiguousarray(z), max(neighbors) + 1)
    # The row itself is its own nearest neighbour unless an exact duplicate ties it: drop the row's id wherever it is.
    others = np.array([row[row != i][:max(neighbors)] for i, row in enumerate(nearest)])
    classes = int(y.max()) + 1
    out = {}
    for k in neighbors:
        votes = np.zeros((len(y), classes), np.int64)
        np.add.at(votes, (np.repeat(np.arange(len(y)), k), y[others[:, :k]].ravel()), 1)
        out[k] = float(np.mean(votes.argmax(1) == y))
    return out


def svm_accuracy(z: np.ndarray, y: np.ndarray, rows: int, folds: int, seed: int) -> float:
    """Mean k-fold accuracy of an RBF SVM (scikit-learn defaults, standardised codes) on a seeded sample of rows."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if len(y) > rows:
        pick = np.random.default_rng(seed).choice(len(y), rows, replace=False)
        z, y = z[pick], y[pick]
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(make_pipeline(StandardScaler(), SVC()), z, y, cv=cv).mean())


def measure(run: Path, neighbors: list[int], svm_rows: int, folds: int, seed: int = 0) -> dict:
    started = time.perf_counter()
    z, y, clusters = codes(run)
    knn = knn_accuracy(z, y, neighbors)
    svm = svm_accuracy(z, y, svm_rows, folds, seed) if svm_rows > 0 else None
    acc = clustering_accuracy(y, clusters)
    ceiling = max([*knn.values(), *([svm] if svm is not None else [])])
    try:
        name = json.loads((run / "run.json").read_text())["name"]
    except (OSError, ValueError, KeyError):
        name = run.name
    return {"bench": "codes_ceiling", "run": str(run), "config": name, "rows": int(len(y)), "dim": int(z.shape[1]),
            "acc": round(acc, 4), **{f"knn{k}": round(v, 4) for k, v in knn.items()},
            "svm": None if svm is None else round(svm, 4), "headroom": round(ceiling - acc, 4),
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished dce run directories")
    p.add_argument("--neighbors", nargs="+", type=int, default=[5, 10])
    p.add_argument("--svm-rows", type=int, default=20000, help="rows the SVM sees (0: no SVM); it is O(rows^2)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    if min(a.neighbors) < 1 or a.folds < 2 or a.svm_rows < 0:
        print("error: --neighbors must be >= 1, --folds >= 2 and --svm-rows >= 0", file=sys.stderr)
        return 2
    lines = []
    for run in a.runs:
        try:
            line = measure(run, a.neighbors, a.svm_rows, a.folds)
        except RunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(line), flush=True)
        lines.append(line)
    if a.record:
        header = ["run", "config", "rows x dim", "run ACC", *(f"kNN-{k} (labels)" for k in a.neighbors),
                  "RBF SVM (labels)", "headroom (points)"]
        rows = [[Path(x["run"]).name, f"`{x['config']}`", f"{x['rows']} x {x['dim']}", f"{x['acc']:.4f}",
                 *(f"{x[f'knn{k}']:.4f}" for k in a.neighbors), "-" if x["svm"] is None else f"{x['svm']:.4f}",
                 f"{100 * x['headroom']:+.1f}"] for x in lines]
        append_section("Supervised ceilings of a run's codes (`benchmarks/codes_ceiling.py`)", header, rows,
                       notes="Classifiers given the true labels, on the codes the run clustered: kNN leave-one-out "
                             f"(faiss, exact), RBF SVM {a.folds}-fold on at most {a.svm_rows} rows. Headroom: the "
                             "best of them less the run's ACC.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
