"""Cluster labels from a trained model's own posterior q(c|x) (`cluster.method: posterior`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.errors import ConfigError

# Rows per posterior batch: (rows x components x latent) floats are made at once.
_BATCH = 4096


def posterior_labels(state: dict[str, Any], z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels int32, distances float32, component means) of the embeddings `z` under the checkpoint's model.

    `z` are the model's embeddings (for VaDE the posterior means), so the label of a row is argmax_c q(c|x) at
    z = mu, the model's own `predict`. A component that wins no row keeps its number (labels are the model's
    components, not renumbered); `distance` is a row's Euclidean distance to its component's mean.
    """

    from engine.train.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(state).eval()
    name = state["model"].get("name")
    if not hasattr(model, "cluster_posterior"):
        raise ConfigError(f"cluster.method=posterior needs a model with a cluster posterior q(c|x); "
                          f"model.name={name} has none")
    if hasattr(model, "prior_ready") and not bool(model.prior_ready):
        raise ConfigError(f"cluster.method=posterior: the {name} model is still in its pretraining (its prior is "
                          f"not fitted yet); train it past model.pretrain_epochs or choose another cluster.method")
    labels, distances = label_by_posterior(model, z)
    return labels, distances, model.mu_c.detach().float().cpu().numpy()


def label_by_posterior(model: Any, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32, distances float32) of the embeddings `z` under a built model with a cluster posterior: the
    most probable component of q(c|x) at z, and the Euclidean distance to that component's mean. The cluster stage
    (`posterior_labels`) and new rows (`engine.predict`) both label through it, so they agree."""
    import torch

    z = np.ascontiguousarray(z, dtype=np.float32)
    means = model.mu_c.detach()
    labels = np.empty(len(z), dtype=np.int32)
    with torch.no_grad():
        for start in range(0, len(z), _BATCH):
            block = torch.tensor(z[start:start + _BATCH], device=means.device)  # a copy: z may be a read-only view
            labels[start:start + len(block)] = model.cluster_posterior(block).argmax(1).cpu().numpy()
    centres = means.float().cpu().numpy()
    distances = np.linalg.norm(z - centres[labels], axis=1).astype(np.float32)
    return labels, distances
