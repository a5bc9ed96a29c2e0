"""Clustering quality: Hungarian accuracy, NMI, ARI and the internal indices, as one dict per run."""

# scipy and scikit-learn are imported where they are used: the cluster settings' checks import this module (NOISE)
# before a run starts, and importing both cost ~1 s of every refused `dce` command.

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from engine.errors import ConfigError, DataError

NOISE = -1  # a predicted label meaning "no cluster" (density-based algorithms)
KEYS = ("acc", "nmi", "ari", "silhouette", "davies_bouldin", "calinski_harabasz", "inertia", "noise_fraction")


class MatchedConfusion(NamedTuple):
    """Contingency counts (classes x clusters) with the columns in matching order.

    Column j < len(matched) holds the cluster matched to class `classes[rows[j]]`, so the matched
    counts are `matrix[rows, arange(len(rows))]`; then come the unmatched clusters, then noise if any.
    """

    matrix: np.ndarray  # (n_classes, n_clusters) int64
    classes: np.ndarray  # row labels: the distinct true labels, sorted
    clusters: np.ndarray  # column labels: predicted labels in the order of the columns
    rows: np.ndarray  # row index of the class matched to each of the first len(rows) columns


def clustering_accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of rows whose cluster maps to their class under the best one-to-one cluster->class map.

    The map maximises the matched count (Hungarian algorithm on the contingency matrix). Clusters and
    classes may differ in number: rows of unmatched clusters and of noise (y_pred == -1) count as wrong.
    """
    confusion = confusion_after_matching(y_true, y_pred)
    matched = confusion.matrix[confusion.rows, np.arange(len(confusion.rows))].sum()
    return float(matched / confusion.matrix.sum())


def confusion_after_matching(y_true: Any, y_pred: Any) -> MatchedConfusion:
    """The contingency matrix of true classes x predicted clusters, columns reordered by the matching."""
    y_true, y_pred = _check_labels(y_true, y_pred)
    classes, class_idx = np.unique(y_true, return_inverse=True)
    clusters, cluster_idx = np.unique(y_pred, return_inverse=True)
    matrix = np.zeros((len(classes), len(clusters)), dtype=np.int64)
    np.add.at(matrix, (class_idx, cluster_idx), 1)

    # Noise is never matched to a class: leave its column out of the assignment problem.
    candidates = np.flatnonzero(clusters != NOISE)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(matrix[:, candidates], maximize=True)
    matched_cols = candidates[cols]
    unmatched = np.setdiff1d(candidates, matched_cols)  # sorted, so the order is stable
    noise = np.flatnonzero(clusters == NOISE)
    order = np.concatenate([matched_cols, unmatched, noise])
    return MatchedConfusion(matrix[:, order], classes, clusters[order], rows)


def evaluate(
    labels_pred: Any,
    *,
    labels_true: Any = None,
    X: Any = None,
    inertia: float | None = None,
    silhouette_sample: int = 10000,
    seed: int = 0,
) -> dict[str, float | None]:
    """All quality measures of one clustering, keyed by KEYS; None where a measure cannot be computed.

    - acc, nmi, ari need labels_true. NMI uses the arithmetic mean normalisation (sklearn's default).
      Noise (-1) counts as one more cluster for NMI and ARI and as wrong for acc.
    - silhouette, davies_bouldin, calinski_harabasz need X and at least 2 clusters; they are computed
      on the non-noise rows. The silhouette (quadratic in n) uses a seeded sample of at most
      `silhouette_sample` rows and is None if the sample holds fewer than 2 clusters.
    - inertia is passed through as a float (it depends on the centroids, which only the model knows).
    - noise_fraction is the share of rows labelled noise (-1), 0.0 for methods that assign every row. The
      external measures are over all rows, noise included, so a method cannot raise its acc by declaring
      its hard rows noise: read them together with noise_fraction.
    """
    if isinstance(silhouette_sample, bool) or not isinstance(silhouette_sample, int | np.integer):
        raise ConfigError(f"silhouette_sample should be an int, got {silhouette_sample!r}.")
    if silhouette_sample < 2:
        raise ConfigError(f"silhouette_sample={silhouette_sample} should be >= 2.")
    pred = _as_labels(labels_pred, "labels_pred")
    result: dict[str, float | None] = dict.fromkeys(KEYS)
    result["inertia"] = None if inertia is None else float(inertia)
    result["noise_fraction"] = float(np.mean(pred == NOISE)) if pred.size else None

    if labels_true is not None:
        from sklearn import metrics

        true, pred = _check_labels(labels_true, pred)
        result["acc"] = clustering_accuracy(true, pred)
        result["nmi"] = float(metrics.normalized_mutual_info_score(true, pred, average_method="arithmetic"))
        result["ari"] = float(metrics.adjusted_rand_score(true, pred))

    if X is not None:
        result.update(_internal_indices(X, pred, silhouette_sample, seed))
    return result


def _internal_indices(X: Any, pred: np.ndarray, silhouette_sample: int, seed: int) -> dict[str, float | None]:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] != pred.shape[0]:
        raise DataError(
            f"X has shape {X.shape}, expected ({pred.shape[0]}, n_features) to match labels_pred."
        )
    keep = pred != NOISE
    X, pred = X[keep], pred[keep]
    n_clusters = len(np.unique(pred))
    # Every index needs 2 <= clusters, and the silhouette also needs clusters < rows.
    if n_clusters < 2 or n_clusters >= len(pred):
        return {"silhouette": None, "davies_bouldin": None, "calinski_harabasz": None}
    from sklearn import metrics

    out: dict[str, float | None] = {
        "davies_bouldin": float(metrics.davies_bouldin_score(X, pred)),
        "calinski_harabasz": float(metrics.calinski_harabasz_score(X, pred)),
    }
    if len(pred) > silhouette_sample:
        rows = np.random.default_rng(seed).choice(len(pred), size=silhouette_sample, replace=False)
        X, pred = X[rows], pred[rows]
    sampled_clusters = len(np.unique(pred))
    silhouette_defined = 2 <= sampled_clusters < len(pred)
    out["silhouette"] = float(metrics.silhouette_score(X, pred)) if silhouette_defined else None
    return out


def _check_labels(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    true = _as_labels(y_true, "labels_true")
    pred = _as_labels(y_pred, "labels_pred")
    if true.shape != pred.shape:
        raise DataError(f"labels_true has {true.shape[0]} entries but labels_pred has {pred.shape[0]}.")
    if true.size == 0:
        raise DataError("labels are empty: nothing to evaluate.")
    return true, pred


def _as_labels(labels: Any, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"{name} should be 1-D, got shape {arr.shape}.")
    return arr
