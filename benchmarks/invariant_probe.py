"""Probe: an autoencoder that reconstructs the clean image from an augmented one, against one that reconstructs the
augmented image itself (the engine's `train.augment`, as DEC-DA), then N2D's clustering of the codes.

Issue 26 item 2 (MNIST ACC 0.985): `benchmarks/codes_ceiling.py` put N2D's MNIST-test partition within a few tenths
of what classifiers given the labels reach on the same codes, so the codes, not the clustering, are what to improve.
Asked to undo a rotation and a shift, the encoder has to drop them from its 10 numbers: codes that keep less of the
pose and more of the digit. The same network, optimizer, steps, batch, bf16 and centred inputs as
`configs/mnist_n2d.yaml`; one process, no Ray; then `mnist_n2d`'s cluster section (UMAP, 4 layouts, GMM).

    python benchmarks/invariant_probe.py --data mnist-test --target clean
    python benchmarks/invariant_probe.py --data mnist-test --target augmented

Two more ways to codes that hold less of the pose, beside the reconstruction of the augmented input: SimCLR's NT-Xent
between the codes of two augmented views of each image, through a projection head (`--contrast W --head 64`), or
the squared distance between those two codes over their variance in the batch (`--consistency W`).

A line every 1,000 steps, then one JSON line: ACC, NMI, kNN-5 leave-one-out accuracy on the codes, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from codes_ceiling import knn_accuracy  # noqa: E402
from selflabel_probe import MNIST, read_idx  # noqa: E402

from engine.cluster._in_memory import fit_labels  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.data.describe import normalisation  # noqa: E402
from engine.metrics import clustering_accuracy  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.train.augment import random_affine  # noqa: E402


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (n, 784) float32 0..255 and labels: MNIST's t10k, or train then t10k."""
    parts = ["t10k"] if name == "mnist-test" else ["train", "t10k"]
    x = np.concatenate([read_idx(MNIST / f"{p}-images-idx3-ubyte.gz") for p in parts]).reshape(-1, 784)
    y = np.concatenate([read_idx(MNIST / f"{p}-labels-idx1-ubyte.gz") for p in parts])
    return x.astype(np.float32), y.astype(np.int64)


def nt_xent(pair: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's loss on 2B unit rows, row i and row i + B two views of one image: each row's partner against the
    2B - 2 other rows."""
    n = len(pair) // 2
    sim = pair @ pair.T / tau
    sim.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, partner)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["mnist-test", "mnist"], default="mnist-test")
    p.add_argument("--target", choices=["clean", "augmented"], default="clean")
    p.add_argument("--steps", type=int, default=11000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rotation", type=float, default=10.0)
    p.add_argument("--shift", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contrast", type=float, default=0.0,
                   help="weight of a SimCLR (NT-Xent) term between the codes of two augmented views of each image")
    p.add_argument("--tau", type=float, default=0.5, help="the NT-Xent temperature")
    p.add_argument("--consistency", type=float, default=0.0,
                   help="weight of the squared distance between the codes of two views of an image, over the codes' "
                        "variance in the batch (no negatives: the reconstruction keeps the codes from collapsing)")
    p.add_argument("--head", type=int, default=0, help="width of a projection head before NT-Xent (0: the codes)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    raw, y = load(a.data)
    wide = raw.astype(np.float64)
    mean, scale = normalisation("center", n=len(raw), s=wide.sum(0), sq=(wide * wide).sum(0), lo=raw.min(0),
                                hi=raw.max(0))  # the engine's `normalize: center`
    flat, shift, scale = torch.from_numpy(raw), torch.from_numpy(mean), torch.from_numpy(scale)
    model = build_model("mlp_ae", in_dim=784, latent_dim=10, hidden=[500, 500, 2000])
    head = (torch.nn.Sequential(torch.nn.Linear(10, a.head), torch.nn.ReLU(), torch.nn.Linear(a.head, a.head))
            if a.head else torch.nn.Identity())
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=a.lr)
    generator, rng = torch.Generator().manual_seed(a.seed), np.random.default_rng(a.seed)
    started, order, at = time.perf_counter(), rng.permutation(len(raw)), 0
    model.train()
    for step in range(1, a.steps + 1):
        if at + a.batch > len(order):
            order, at = rng.permutation(len(raw)), 0
        batch = flat[order[at:at + a.batch]]
        at += a.batch
        moved = random_affine(batch, (28, 28), rotation=a.rotation, shift=a.shift, generator=generator)
        x = (moved - shift) * scale
        target = x if a.target == "augmented" else (batch - shift) * scale
        with torch.autocast("cpu", dtype=torch.bfloat16):
            recon, z1 = model(x)
            if a.contrast or a.consistency:
                other = random_affine(batch, (28, 28), rotation=a.rotation, shift=a.shift, generator=generator)
                z2 = model.encode((other - shift) * scale)
                pair = torch.cat([z1, z2]).float()
        loss = F.mse_loss(recon.float(), target)
        if a.contrast:
            loss = loss + a.contrast * nt_xent(F.normalize(head(pair), dim=1), a.tau)
        if a.consistency:
            half = len(pair) // 2
            loss = loss + a.consistency * F.mse_loss(pair[:half], pair[half:]) / pair.var(0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 1000 == 0:
            print(f"step {step}: loss {float(loss.detach()):.5f}, {time.perf_counter() - started:.0f} s", flush=True)
    train_s = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        z = torch.cat([model.encode((flat[i:i + 4096] - shift) * scale) for i in range(0, len(flat), 4096)]).numpy()
    labels, _ = fit_labels(z, load_config("mnist_n2d").cluster, seed=a.seed)
    from sklearn.metrics import normalized_mutual_info_score

    print(json.dumps({"probe": "invariant", **vars(a), "acc": round(clustering_accuracy(y, labels), 4),
                      "nmi": round(float(normalized_mutual_info_score(y, labels)), 4),
                      "knn5": round(knn_accuracy(z, y, [5])[5], 4), "train_s": round(train_s),
                      "seconds": round(time.perf_counter() - started)}), flush=True)


if __name__ == "__main__":
    main()
