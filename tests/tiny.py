"""The tiny `dce run` shared by test_pipeline.py and test_tracking.py (conftest's `tracked_tiny_run`): four blobs,
a small autoencoder on 2 Ray Train workers for 3 epochs, k-means; one Ray Train run costs ~25 s on a 2-core CPU."""

from __future__ import annotations

TINY_RUN = [
    "data.source=blobs", "data.n_samples=400", "data.n_features=6", "data.centers=4", "data.rows_per_shard=100",
    "data.normalize=standard", "model.hidden=[32]", "model.latent_dim=3", "train.epochs=3", "train.batch_size=64",
    "train.num_workers=2", "cluster.k=4", "cluster.n_init=2", "cluster.method=kmeans", "cluster.manifold=none",
]


def as_args(settings: list[str]) -> list[str]:
    """`dce` command-line overrides: ["--set", s, ...]."""
    return [arg for setting in settings for arg in ("--set", setting)]
