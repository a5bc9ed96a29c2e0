"""KMeans: a scikit-learn compatible Lloyd k-means on FAISS or torch, with weights and restarts."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.utils.validation import check_is_fitted

from engine import storage
from engine.cluster._device import PRECISIONS, DeviceRows, kmeans_plusplus_device, place_rows
from engine.cluster._lloyd import lloyd
from engine.cluster._seeding import (
    COARSE_ITERATIONS,
    PARALLEL_ABOVE_K,
    PARTITIONED_ABOVE_K,
    LocalRows,
    kmeans_parallel,
    kmeans_plusplus_partitioned,
)
from engine.cluster._stats import (
    HostRows,
    as_float32_matrix,
    as_weights,
    check_enough_weight,
    check_int,
    check_n_clusters,
    kmeans_plusplus_unchecked,
    nearest_on_host,
    resolve_backend,
    row_sq_norms,
    unit_rows,
)
from engine.errors import CheckpointError, ConfigError, DataError

logger = logging.getLogger(__name__)

INITS = ("auto", "k-means++", "k-means||", "partitioned", "random")
_SAVE_FORMAT = "engine.cluster.KMeans/1"
_SUBSAMPLE_KEY = 2**32 - 1


class KMeans(ClusterMixin, TransformerMixin, BaseEstimator):
    """Lloyd k-means minimising the weighted sum of squared distances (the inertia).

    Parameters
    ----------
    n_clusters : number of centroids k, >= 1 and <= the number of rows.
    init : "auto" (k-means++ up to n_clusters=256, k-means|| up to 4096, partitioned above:
        `engine.cluster._seeding.PARALLEL_ABOVE_K` and `PARTITIONED_ABOVE_K` say why), "k-means++" (greedy, as
        scikit-learn), "k-means||" (Bahmani et al. 2012: 2 rounds oversampling 2k rows by their distance to the
        candidates so far, then weighted k-means++ and Lloyd on the candidates; the same code as ShardedKMeans's),
        "partitioned" (greedy k-means++ within the cells of a coarse k-means of ~sqrt(k) cells, seeds shared out by
        the cells' potential: `kmeans_plusplus_partitioned`), "random" (k distinct rows drawn with probability
        proportional to sample_weight) or an array (k, n_features) of initial centroids; with an array only one
        run is made.
    n_init : number of runs from different seeds; the run with the lowest inertia is kept.
    max_iter : at most this many Lloyd iterations (assign, then move each centroid to its mean) per run.
    tol : a run stops after iteration t when the relative decrease of the objective,
        (objective[t-1] - objective[t]) / objective[t-1], is below tol, where objective[t] is the
        weighted SSE of the assignment made at iteration t. tol=0 runs exactly max_iter iterations.
    seed : seed of the run seeds (numpy SeedSequence(seed).spawn(n_init)); same seed, same result.
    backend : "auto", "faiss" or "torch": where the assignments are computed (see `assign`).
    verbose : log one line per iteration at INFO instead of DEBUG.
    spherical : cosine k-means: rows are L2-normalised at fit, predict, transform and score, and the
        centroids are re-normalised after each update (a row of zeros is an error). inertia_ is then the
        SSE of the unit rows, 2 - 2 cos per row.
    max_points_per_centroid : None (train on every row) or an int m >= 1: when more than n_clusters * m
        rows have weight, train on a seeded uniform subsample of n_clusters * m of them, as faiss does
        (its default is 256). This is announced by a logging warning and recorded in
        n_training_samples_; labels_ and inertia_ still cover every row.
    callback : None or a callable given each iteration's history record as soon as the iteration ends,
        as a new dict with "run" (1-based, of n_init) added, e.g. to drive a progress display.
    checkpoint : None or an .npz path: every `checkpoint_every` iterations, and after each run, the fit's
        state (current run and iteration, centroids, the best run so far) is saved there atomically; a fit
        that finds a state of the same data and settings continues from it and ends with the result of an
        uninterrupted fit. A state of other data or settings is replaced. The file is kept after fit.
    checkpoint_every : iterations between two saves of the state.
    precision : "fp32", "tf32" or "bf16": the precision of the torch backend's distance products. Rows whose two
        best centroids are within the products' rounding error are ranked again in fp32, so the labels are
        fp32's (ties aside); sums, counts and SSE are always float64. A device without that precision (tf32 or
        bf16 on a GPU older than Ampere, bf16 on a CPU without AVX512-BF16 / AMX, tf32 on a CPU) computes in
        fp32 after one warning.
    device : None (the current CUDA device when there is one, else the CPU) or a torch device string, for the
        torch backend. On CUDA the training rows are uploaded once per fit and every iteration runs there (rows
        that do not fit stream through in chunks); `holds_` says which.

    A cluster left empty by an iteration takes half of the cluster with the largest SSE (`split_empty`:
    both start at its mean, slightly apart; deterministic). History entries count the empty clusters in
    `empty` and these repairs in `empty_repaired`.

    Fitted attributes: cluster_centers_ (float32, k x d), labels_, inertia_ (weighted SSE of the final
    assignment to cluster_centers_), n_iter_, n_features_in_, history_ (one dict per iteration of the
    kept run: iter, objective, rel_change, shift = largest centroid move, empty, empty_repaired, seconds),
    n_training_samples_ (rows the centroids were trained on), holds_ (where the training rows were held).
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: str | np.ndarray = "auto",
        n_init: int = 1,
        max_iter: int = 25,
        tol: float = 1e-4,
        seed: int = 0,
        backend: str = "auto",
        verbose: bool = False,
        spherical: bool = False,
        max_points_per_centroid: int | None = None,
        callback: Callable[[dict[str, Any]], object] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 10,
        precision: str = "fp32",
        device: str | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.backend = backend
        self.verbose = verbose
        self.spherical = spherical
        self.max_points_per_centroid = max_points_per_centroid
        self.callback = callback
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.precision = precision
        self.device = device

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> KMeans:
        """Cluster X (n_samples, n_features); y is ignored; sample_weight (n_samples,) >= 0."""
        X = as_float32_matrix(X)
        w = as_weights(sample_weight, X.shape[0])
        init, n_init, backend = self._check_params(X)
        check_enough_weight(w, self.n_clusters)
        if self.spherical:
            X = unit_rows(X)
            if isinstance(init, np.ndarray):
                init = unit_rows(init, name="init")
        run_seqs = np.random.SeedSequence(self.seed).spawn(n_init)
        # The subsample draws from its own stream (a spawn key no run uses), so the runs keep their seeds.
        sample_rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_SUBSAMPLE_KEY,)))
        train_X, train_w = self._training_rows(X, w, sample_rng)
        x_sq = row_sq_norms(X)
        rows = place_rows(train_X, train_w, backend, device=self.device, precision=self.precision,
                          x_sq=x_sq if train_X is X else None)

        saved = FitState(self.checkpoint, self._fingerprint(train_X, train_w, init, n_init))
        start, best = saved.load()
        for run, child in enumerate(run_seqs, start=1):
            if run < start.get("run", 1):
                continue  # finished before the interruption: its result is in `best` if it was the best
            resume = start if run == start.get("run") and "centroids" in start else None
            centroids = resume["centroids"] if resume else self._initial_centroids(
                train_X, train_w, init, np.random.default_rng(child), rows)
            result = self._lloyd(rows, centroids, run, resume=resume,
                                 save=lambda state, best=best: saved.save(state, best))
            if best is None or result["inertia"] < best["inertia"]:  # the first of equals is kept
                best = result
            saved.save({"run": run + 1}, best)
        centroids = best["centroids"]
        if train_X is X:
            labels, inertia = best.get("labels"), best["inertia"]
            if labels is None:  # the best run was restored from the checkpoint
                labels = rows.assign(centroids)[0]
        else:
            labels, sq_distances = nearest_on_host(X, centroids, backend, x_sq)
            inertia = float(sq_distances.astype(np.float64) @ w)

        self.cluster_centers_ = centroids
        self.labels_ = labels
        self.inertia_ = inertia
        self.n_iter_ = best["n_iter"]
        self.history_ = best["history"]
        self.n_training_samples_ = train_X.shape[0]
        self.n_features_in_ = X.shape[1]
        self.holds_ = rows.holds
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Index of the nearest centroid for each row."""
        X = self._check_fitted_input(X)
        return nearest_on_host(X, self.cluster_centers_, resolve_backend(self.backend))[0]

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """Fit, then return labels_."""
        return self.fit(X, sample_weight=sample_weight).labels_

    def transform(self, X: Any) -> np.ndarray:
        """Euclidean distance (float32, n x k) from each row to each centroid."""
        X = self._check_fitted_input(X)
        return euclidean_distances(X, self.cluster_centers_)

    def fit_transform(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """Fit, then return the distances of X to the fitted centroids."""
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Minus the weighted SSE of X to its nearest centroids (higher is better, as scikit-learn)."""
        X = self._check_fitted_input(X)
        w = as_weights(sample_weight, X.shape[0])
        _, sq_distances = nearest_on_host(X, self.cluster_centers_, resolve_backend(self.backend))
        return -float(sq_distances.astype(np.float64) @ w)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fitted model to an .npz (centroids + JSON metadata), atomically, without pickle.

        labels_ of the training rows are not saved; predict them again after `load` if needed.
        """
        check_is_fitted(self)
        # Plain Python values, so numpy scalars given as settings survive JSON.
        params = {k: v.item() if isinstance(v, np.generic) else v for k, v in self.get_params().items()}
        params["callback"] = None  # code, not data: a loaded model has none
        if "checkpoint" in params:  # subclasses may not take one
            params["checkpoint"] = None  # the fit's scratch file, not part of the model
        arrays = {"cluster_centers": self.cluster_centers_}
        if not isinstance(params["init"], str):
            arrays["init"] = np.asarray(params["init"], dtype=np.float32)
            params["init"] = None
        meta = {
            "format": _SAVE_FORMAT,
            "estimator": type(self).__name__,
            "params": params,
            "inertia": self.inertia_,
            "n_iter": self.n_iter_,
            "n_training_samples": self.n_training_samples_,
            "history": self.history_,
        }
        with storage.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KMeans:
        """A fitted KMeans from a file written by `save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                centers = data["cluster_centers"].astype(np.float32)
                init = data["init"] if "init" in data.files else None
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: not a saved KMeans model ({e})") from e
        if meta.get("format") != _SAVE_FORMAT:
            raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {_SAVE_FORMAT!r}")
        if meta.get("estimator", "KMeans") != cls.__name__:
            raise CheckpointError(f"{path}: holds a {meta['estimator']}; load it with {meta['estimator']}.load")
        params = meta["params"]
        if init is not None:
            params["init"] = init
        model = cls(**params)
        model.cluster_centers_ = centers
        model.inertia_ = float(meta["inertia"])
        model.n_iter_ = int(meta["n_iter"])
        model.history_ = meta["history"]
        model.n_training_samples_ = meta.get("n_training_samples")
        model.n_features_in_ = centers.shape[1]
        return model

    def _check_params(self, X: np.ndarray) -> tuple[str | np.ndarray, int, str]:
        """Validate every setting against X; returns (init, effective n_init, concrete backend)."""
        n_samples, n_features = X.shape
        check_n_clusters(self.n_clusters, n_samples)
        n_init = check_int("n_init", self.n_init, minimum=1)
        check_int("max_iter", self.max_iter, minimum=1)
        if isinstance(self.tol, bool) or not isinstance(self.tol, int | float | np.number):
            raise ConfigError(f"tol should be a number, got {self.tol!r}.")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ConfigError(f"tol={self.tol} should be a finite number >= 0.")
        check_int("seed", self.seed, minimum=0)
        for flag in ("verbose", "spherical"):
            if not isinstance(getattr(self, flag), bool | np.bool_):
                raise ConfigError(f"{flag} should be True or False, got {getattr(self, flag)!r}.")
        if self.max_points_per_centroid is not None:
            check_int("max_points_per_centroid", self.max_points_per_centroid, minimum=1)
        if self.callback is not None and not callable(self.callback):
            raise ConfigError(f"callback should be a callable or None, got {self.callback!r}.")
        check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        backend = resolve_backend(self.backend)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} should be one of {', '.join(map(repr, PRECISIONS))}.")
        if self.precision != "fp32" and backend != "torch":
            raise ConfigError(f"precision={self.precision!r} needs backend='torch'; backend={self.backend!r} is "
                              f"{backend}, which computes in fp32.")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ConfigError(f"device={self.device!r} is not a torch device ({e}).") from e

        if isinstance(self.init, str):
            if self.init not in INITS:
                raise ConfigError(
                    f"init={self.init!r} should be 'auto', 'k-means++', 'k-means||', 'partitioned', 'random' or an "
                    "array of shape (n_clusters, n_features)."
                )
            init = self.init
            if init == "auto":
                init = ("partitioned" if self.n_clusters > PARTITIONED_ABOVE_K else
                        "k-means||" if self.n_clusters > PARALLEL_ABOVE_K else "k-means++")
            return init, n_init, backend
        try:
            init = as_float32_matrix(self.init, name="init")
        except DataError as e:
            raise ConfigError(str(e)) from e
        expected = (self.n_clusters, n_features)
        if init.shape != expected:
            raise ConfigError(
                f"init has shape {init.shape}, but should be (n_clusters, n_features)={expected}."
            )
        if n_init > 1:
            warnings.warn(
                f"init is an array of centroids: running one init instead of n_init={n_init}.",
                RuntimeWarning,
                stacklevel=3,
            )
        return init, 1, backend

    def _check_fitted_input(self, X: Any) -> np.ndarray:
        """X validated against the fit, as float32; unit rows when spherical."""
        check_is_fitted(self)
        X = as_float32_matrix(X)
        if X.shape[1] != self.n_features_in_:
            raise DataError(
                f"X has {X.shape[1]} features, but {type(self).__name__} was fitted with "
                f"{self.n_features_in_} features."
            )
        return unit_rows(X) if self.spherical else X

    def _training_rows(
        self, X: np.ndarray, w: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """X and w, or a uniform subsample of k * max_points_per_centroid weighted rows (announced)."""
        if self.max_points_per_centroid is None:
            return X, w
        limit = self.n_clusters * self.max_points_per_centroid
        weighted = np.flatnonzero(w > 0)
        if weighted.size <= limit:
            return X, w
        rows = np.sort(rng.choice(weighted, size=limit, replace=False))  # sorted: sequential reads of X
        logger.warning(
            "k-means trains on a random subsample of %d of %d rows (max_points_per_centroid=%d x n_clusters=%d);"
            " labels_ and inertia_ cover every row.",
            limit, weighted.size, self.max_points_per_centroid, self.n_clusters,
        )
        return X[rows], w[rows]

    def _initial_centroids(
        self, X: np.ndarray, w: np.ndarray, init: str | np.ndarray, rng: np.random.Generator,
        rows: HostRows | DeviceRows | None = None,
    ) -> np.ndarray:
        if isinstance(init, np.ndarray):
            return init.copy()
        if init == "k-means++":
            if isinstance(rows, DeviceRows) and not rows.streamed:
                return kmeans_plusplus_device(rows, self.n_clusters, w, rng)  # where the rows are
            return kmeans_plusplus_unchecked(X, self.n_clusters, w, rng, n_local_trials=None)
        if init == "k-means||":
            local = LocalRows(X, None if np.all(w == 1) else w, self.backend, rows)
            return kmeans_parallel(
                lambda method, *args: [getattr(local, method)(*args)], lambda idx: X[idx], X.shape[0],
                self.n_clusters, int(rng.integers(2**31)), rng, self.fit_candidates, first_weights=w)
        if init == "partitioned":
            return kmeans_plusplus_partitioned(X, w, self.n_clusters, rng, self.backend, self._fit_coarse)
        rows = rng.choice(X.shape[0], size=self.n_clusters, replace=False, p=w / w.sum())
        return X[rows].copy()

    def fit_candidates(self, C: np.ndarray, weights: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """k-means||'s last step (`kmeans_parallel`): weighted Lloyd on the candidates from their k-means++ seeds,
        with this estimator's k, iterations, tolerance, backend and spherical setting."""
        local = KMeans(self.n_clusters, init=seeds, max_iter=self.max_iter, tol=self.tol, backend=self.backend,
                       spherical=self.spherical)
        return local.fit(C, sample_weight=weights).cluster_centers_

    def _fit_coarse(self, X: np.ndarray, w: np.ndarray, cells: int, seed: int) -> np.ndarray:
        """The coarse partition of the partitioned seeding: a short k-means++ / Lloyd fit on a sample."""
        return KMeans(cells, init="k-means++", max_iter=COARSE_ITERATIONS, seed=seed, backend=self.backend,
                      max_points_per_centroid=None).fit(X, sample_weight=w).cluster_centers_

    def _fingerprint(self, X: np.ndarray, w: np.ndarray, init: str | np.ndarray, n_init: int) -> dict[str, Any]:
        """What a saved state must match to be continued: the data, its weights and every setting that
        changes the result."""
        if self.checkpoint is None:
            return {}
        return {
            "estimator": type(self).__name__, "shape": list(X.shape), "data": digest(X, w),
            "init": init if isinstance(init, str) else digest(init), "params": {
                k: getattr(self, k).item() if isinstance(getattr(self, k), np.generic) else getattr(self, k)
                for k in ("n_clusters", "max_iter", "tol", "seed", "spherical", "max_points_per_centroid",
                          "precision")},
            "n_init": n_init, "backend": resolve_backend(self.backend),
        }

    def _lloyd(
        self, rows: HostRows | DeviceRows, centroids: np.ndarray, run: int,
        resume: dict[str, Any] | None = None, save: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Lloyd iterations from `centroids`, or from a saved state (`resume`: iteration, previous objective,
        history); `save` is given the state every `checkpoint_every` iterations."""
        log = logger.info if self.verbose else logger.debug
        history = list(resume["history"]) if resume else []

        def on_iteration(record: dict[str, Any], new: np.ndarray) -> None:
            if self.callback is not None:
                self.callback({"run": run, **record})

        result = lloyd(
            rows.stats, centroids, max_iter=self.max_iter, tol=self.tol,
            spherical=self.spherical, first_iter=len(history) + 1, history=history,
            previous_objective=resume["previous_objective"] if resume else None, on_iteration=on_iteration,
            save=None if save is None else lambda state: save({"run": run, **state}),
            checkpoint_every=self.checkpoint_every, log=log,
        )
        labels, sq_distances = rows.assign(result.centroids)
        inertia = float(np.sum(sq_distances, dtype=np.float64) if rows.w is None
                        else sq_distances.astype(np.float64) @ rows.w)
        log("run done: inertia %.6g after %d iterations", inertia, result.n_iter)
        return {
            "centroids": result.centroids,
            "labels": labels,
            "inertia": inertia,
            "n_iter": result.n_iter,
            "history": result.history,
        }


_STATE_FORMAT = "engine.cluster.fit-state/1"


class FitState:
    """The resumable state of a k-means fit in an .npz (arrays + JSON, no pickle), written atomically.

    A state is a dict: "run" (the run to do next, or being done), and while inside a run its "centroids",
    "previous_objective" and "history"; beside it the best finished run so far (centroids, inertia,
    n_iter, history). Without a path nothing is saved or loaded.
    """

    def __init__(self, path: str | os.PathLike[str] | None, fingerprint: dict[str, Any]):
        self.path = None if path is None else Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=float))

    def load(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(state, best) to continue from; ({}, None) when there is no usable state."""
        if self.path is None or not self.path.is_file():
            return {}, None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in data.files if k != "meta"}
        except (OSError, ValueError, KeyError) as e:
            logger.warning("%s: unreadable k-means state (%s); starting afresh", self.path, e)
            return {}, None
        if meta.get("format") != _STATE_FORMAT or meta.get("fingerprint") != self.fingerprint:
            logger.warning("%s: k-means state of other data or settings; starting afresh", self.path)
            return {}, None
        state, best = meta["state"], meta["best"]
        if "centroids" in arrays:
            state["centroids"] = arrays["centroids"]
        if best is not None:
            best["centroids"] = arrays["best_centroids"]
        logger.info("%s: continuing k-means at run %s, iteration %d", self.path, state.get("run"),
                    len(state.get("history", [])) + 1)
        return state, best

    def save(self, state: dict[str, Any], best: dict[str, Any] | None) -> None:
        if self.path is None:
            return
        arrays = {}
        if "centroids" in state:
            arrays["centroids"] = state["centroids"]
        if best is not None:
            arrays["best_centroids"] = best["centroids"]
        meta = {
            "format": _STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "state": {k: v for k, v in state.items() if k != "centroids"},
            "best": None if best is None else {k: best[k] for k in ("inertia", "n_iter", "history")},
        }
        with storage.atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta, default=float)), **arrays)


def digest(*arrays: np.ndarray) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()
