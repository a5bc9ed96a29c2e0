"""Clustering metrics against hand-worked cases and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.datasets import make_blobs

from engine.errors import ConfigError, DataError
from engine.metrics import KEYS, clustering_accuracy, confusion_after_matching, evaluate


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    X, y = make_blobs(n_samples=600, n_features=5, centers=4, random_state=0)
    return X.astype(np.float32), y


def test_accuracy_hand_worked():
    # Matching cluster 1->class 0 (2 rows), 0->class 1 (2), 2->class 2 (1); row 4 (class 2 in cluster 0)
    # is the one miss: 5/6.
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [1, 1, 0, 0, 0, 2]
    assert clustering_accuracy(y_true, y_pred) == pytest.approx(5 / 6)
    confusion = confusion_after_matching(y_true, y_pred)
    np.testing.assert_array_equal(confusion.matrix, [[2, 0, 0], [0, 2, 0], [0, 1, 1]])
    np.testing.assert_array_equal(confusion.clusters, [1, 0, 2])
    np.testing.assert_array_equal(confusion.classes, [0, 1, 2])


def test_permuted_labels_score_perfectly():
    y_true = np.array([0, 0, 1, 1, 1, 2, 2, 3])
    y_pred = np.array([7, 7, 3, 3, 3, 0, 0, 5])
    result = evaluate(y_pred, labels_true=y_true)
    assert result["acc"] == pytest.approx(1.0)
    assert result["nmi"] == pytest.approx(1.0)
    assert result["ari"] == pytest.approx(1.0)


def test_more_clusters_than_classes():
    # Best map: cluster 0->class 0 (2 rows), cluster 2->class 1 (3); cluster 1 is unmatched: 5/6.
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [0, 0, 1, 2, 2, 2]
    assert clustering_accuracy(y_true, y_pred) == pytest.approx(5 / 6)
    confusion = confusion_after_matching(y_true, y_pred)
    np.testing.assert_array_equal(confusion.clusters, [0, 2, 1])  # matched first, then unmatched
    np.testing.assert_array_equal(confusion.matrix, [[2, 0, 1], [0, 3, 0]])


def test_fewer_clusters_than_classes():
    # Two clusters can serve only two of the three classes: at most 2 + 2 of 6 rows.
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 0, 1, 1]
    assert clustering_accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    confusion = confusion_after_matching(y_true, y_pred)
    assert confusion.matrix.shape == (3, 2)
    matched = confusion.matrix[confusion.rows, np.arange(len(confusion.rows))]
    assert matched.sum() == 4


def test_noise_counts_as_wrong_for_acc_and_as_a_cluster_for_nmi_ari():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 1, 1, -1, -1]
    # Were noise matched like a cluster, it would take class 2 and give 1.0.
    assert clustering_accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    result = evaluate(y_pred, labels_true=y_true)
    assert result["noise_fraction"] == pytest.approx(2 / 6)
    assert result["nmi"] == pytest.approx(1.0)
    assert result["ari"] == pytest.approx(1.0)
    confusion = confusion_after_matching(y_true, y_pred)
    assert confusion.clusters[-1] == -1


def test_string_class_labels():
    assert clustering_accuracy(["cat", "cat", "dog", "dog"], [1, 1, 1, 0]) == pytest.approx(3 / 4)


def test_evaluate_matches_sklearn(blobs):
    X, y = blobs
    pred = (y + 1) % 4
    pred[:30] = 0  # some errors, so the values are not trivially 1
    result = evaluate(pred, labels_true=y, X=X, inertia=12.5)
    assert tuple(result) == KEYS
    assert set(result) == {"acc", "nmi", "ari", "silhouette", "davies_bouldin", "calinski_harabasz",
                           "inertia", "noise_fraction"}
    assert result["acc"] == pytest.approx(np.mean(((pred - 1) % 4) == y))
    assert result["nmi"] == pytest.approx(skm.normalized_mutual_info_score(y, pred))
    assert result["ari"] == pytest.approx(skm.adjusted_rand_score(y, pred))
    assert result["silhouette"] == pytest.approx(skm.silhouette_score(X, pred), rel=1e-5)
    assert result["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(X, pred), rel=1e-5)
    assert result["calinski_harabasz"] == pytest.approx(skm.calinski_harabasz_score(X, pred), rel=1e-5)
    assert result["inertia"] == 12.5
    assert all(isinstance(v, float) for v in result.values())


def test_missing_inputs_give_none(blobs):
    X, y = blobs
    assert evaluate(y) == {**dict.fromkeys(KEYS), "noise_fraction": 0.0}
    no_labels = evaluate(y, X=X)
    assert no_labels["acc"] is None and no_labels["nmi"] is None and no_labels["ari"] is None
    assert no_labels["silhouette"] is not None
    no_x = evaluate(y, labels_true=y)
    assert no_x["acc"] == 1.0 and no_x["silhouette"] is None and no_x["davies_bouldin"] is None
    one_cluster = evaluate(np.zeros(len(y), dtype=int), labels_true=y, X=X)
    assert one_cluster["silhouette"] is None and one_cluster["calinski_harabasz"] is None
    assert one_cluster["acc"] == pytest.approx(np.bincount(y).max() / len(y))


def test_silhouette_on_a_seeded_sample(blobs):
    X, y = blobs
    full = skm.silhouette_score(X, y)
    a = evaluate(y, X=X, silhouette_sample=200, seed=1)["silhouette"]
    assert a == evaluate(y, X=X, silhouette_sample=200, seed=1)["silhouette"]
    assert a != evaluate(y, X=X, silhouette_sample=200, seed=2)["silhouette"]
    assert a == pytest.approx(full, abs=0.05)


def test_noise_rows_are_left_out_of_internal_indices(blobs):
    X, y = blobs
    pred = y.copy()
    pred[::7] = -1
    result = evaluate(pred, X=X)
    keep = pred != -1
    assert result["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(X[keep], y[keep]), rel=1e-5)
    assert result["silhouette"] == pytest.approx(skm.silhouette_score(X[keep], y[keep]), rel=1e-5)


def test_bad_input():
    with pytest.raises(DataError, match=r"^labels_true has 3 entries but labels_pred has 4\.$"):
        clustering_accuracy([0, 1, 1], [0, 1, 1, 0])
    with pytest.raises(DataError, match=r"^X has shape \(3, 2\), expected \(4, n_features\)"):
        evaluate([0, 1, 1, 0], X=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"^labels_pred should be 1-D, got shape \(2, 2\)\.$"):
        evaluate([[0, 1], [1, 0]])
    with pytest.raises(DataError, match=r"^labels are empty"):
        clustering_accuracy([], [])
    with pytest.raises(ConfigError, match=r"^silhouette_sample=1 should be >= 2\.$"):
        evaluate([0, 1], silhouette_sample=1)
