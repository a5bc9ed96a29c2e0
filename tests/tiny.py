"""The tiny `dce run`s the modules share (one Ray Train run costs ~25 s on a 2-core CPU).

TINY_RUN (conftest's `tracked_tiny_run`, for test_pipeline.py, test_tracking.py and test_train.py): four blobs, a
small autoencoder on 2 Ray Train workers for 3 epochs, k-means.
TINY_DIGITS (conftest's `digits_run`, for test_report.py and test_augment.py): scikit-learn's 1797 8x8 digits, a
small autoencoder on 2 workers for 35 optimizer steps (`train.steps`: 3 epochs of 15 batches) on randomly rotated and
shifted images in bf16 (fp32 on a CPU without native bfloat16), k-means (assignable, unlike N2D's gmm)."""

from __future__ import annotations

TINY_RUN = [
    "data.source=blobs", "data.n_samples=400", "data.n_features=6", "data.centers=4", "data.rows_per_shard=100",
    "data.normalize=standard", "model.hidden=[32]", "model.latent_dim=3", "train.epochs=3", "train.batch_size=64",
    "train.num_workers=2", "cluster.k=4", "cluster.n_init=2", "cluster.method=kmeans", "cluster.manifold=none",
]

TINY_DIGITS = [
    "model.hidden=[32]", "model.latent_dim=4", "train.steps=35", "train.num_workers=2", "train.batch_size=128",
    "train.checkpoint_every=3", "train.precision=bf16", "train.augment.rotation=20", "train.augment.shift=0.1",
    "cluster.method=kmeans", "cluster.manifold=none", "cluster.n_init=2", "embed.concurrency=1",
]


def as_args(settings: list[str]) -> list[str]:
    """`dce` command-line overrides: ["--set", s, ...]."""
    return [arg for setting in settings for arg in ("--set", setting)]
