"""Self-labelling probe: a small CNN trained on the rows nearest their centroid, then every row labelled by it.

The step SCAN (Van Gansbeke et al. 2020) and DEC-DA (Guo et al. 2018) add after a clustering, tried here by hand on
a `dce run` of N2D (issue 26, item 2) before building it into the pipeline: take each cluster's `--keep` fraction of
rows nearest their centroid in the run's latent space (the assignments' `distance`; the UMAP + GMM posterior is ~1 on
every row, so it selects nothing), train a two-conv-layer CNN on their images with DEC-DA's published augmentation
(rotation +-10 degrees, shift +-0.1), one-cycle Adam, then label every row by its argmax. In one process, no Ray.

    python benchmarks/selflabel_probe.py --run RUN_DIR --data mnist --keep 0.9 --epochs 4 --width 16
    python benchmarks/selflabel_probe.py --run RUN_DIR --data digits --keep 0.9 --epochs 30 --batch 64

One line per epoch (ACC against the labels, agreement with the run) and a JSON line at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.data import read_table
from engine.metrics import clustering_accuracy
from engine.train.augment import random_affine

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip) as a numpy array of its declared shape."""
    with gzip.open(path) as f:
        data = f.read()
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images in [0, 1], labels) in the order of the run's ids: MNIST train then t10k, or scikit-learn's digits."""
    if name == "mnist":
        x = np.concatenate([read_idx(MNIST / f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")])
        y = np.concatenate([read_idx(MNIST / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")])
        return x.astype(np.float32) / 255, y.astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16, d.target.astype(np.int64)


class SmallCNN(nn.Module):
    """Two 3x3 conv + max-pool blocks (width, 2 x width channels), a 128-unit layer, k outputs."""

    def __init__(self, height: int, width: int, k: int, channels: int):
        super().__init__()
        self.shape = (height, width)
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * channels * (height // 4) * (width // 4), 128), nn.ReLU(), nn.Linear(128, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, 1, *self.shape))


def central_rows(labels: np.ndarray, distance: np.ndarray, keep: float) -> np.ndarray:
    """Mask of each cluster's `keep` fraction of rows nearest its centroid."""
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        mask[rows[np.argsort(distance[rows], kind="stable")[:int(round(keep * len(rows)))]]] = True
    return mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished run directory (assignments/, embeddings/)")
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--keep", type=float, default=0.9)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=16, help="channels of the first conv layer")
    p.add_argument("--rotation", type=float, default=10.0, help="DEC-DA's published 10 degrees")
    p.add_argument("--shift", type=float, default=0.1, help="DEC-DA's published 0.1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    x, y = images(a.data)
    table = read_table(Path(a.run) / "assignments", stage="assign").sort_by("id")
    ids = table.column("id").to_numpy()
    run_labels = table.column("cluster").to_numpy().astype(np.int64)
    truth = read_table(Path(a.run) / "embeddings", stage="embed", columns=["id", "label"]).sort_by("id")
    if not (np.array_equal(truth.column("id").to_numpy(), ids) and np.array_equal(truth.column("label"), y[ids])):
        raise SystemExit(f"error: {a.run}: its rows are not {a.data}'s in id order")
    x, y = x[ids], y[ids]
    keep = central_rows(run_labels, table.column("distance").to_numpy(), a.keep)
    print(f"run ACC {clustering_accuracy(y, run_labels):.4f}; kept {keep.sum()} rows, their ACC "
          f"{clustering_accuracy(y[keep], run_labels[keep]):.4f}", flush=True)
    height, width = x.shape[1:]
    k = int(run_labels.max()) + 1
    net = SmallCNN(height, width, k, a.width)
    rows, targets, flat = np.flatnonzero(keep), torch.tensor(run_labels), torch.tensor(x.reshape(len(x), -1))
    steps = max(1, len(rows) // a.batch)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=a.epochs * steps)
    generator = torch.Generator().manual_seed(a.seed)
    started = time.perf_counter()
    for epoch in range(a.epochs):
        order = rows[np.random.default_rng(a.seed * 1000 + epoch).permutation(len(rows))]
        net.train()
        for i in range(steps):
            batch = order[i * a.batch:(i + 1) * a.batch]
            xb = random_affine(flat[batch], (height, width), rotation=a.rotation, shift=a.shift, generator=generator)
            loss = F.cross_entropy(net(xb), targets[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(flat[i:i + 4096]).argmax(1) for i in range(0, len(flat), 4096)]).numpy()
        print(f"epoch {epoch + 1}: ACC {clustering_accuracy(y, pred):.4f}, agrees with the run on "
              f"{np.mean(pred == run_labels):.4f}, {time.perf_counter() - started:.0f} s", flush=True)
    print(json.dumps({"run": a.run, "run_acc": clustering_accuracy(y, run_labels), "acc": clustering_accuracy(y, pred),
                      "seconds": round(time.perf_counter() - started, 1), **{k: v for k, v in vars(a).items()
                                                                              if k != "run"}}))


if __name__ == "__main__":
    main()
