"""DEC-DA probe: refine a finished run's autoencoder with DEC's clustering loss on augmented images (issue 26, item 2).

DEC-DA (Guo et al. 2018) reaches 0.985 on MNIST by training on augmented images in both phases: pretraining (which
the engine's `train.augment` does) and the clustering fine-tuning, where Q is computed on an augmented batch against
the target P of the clean images. Here the centres start from the run's own partition (N2D's UMAP + GMM labels: the
mean code of each cluster) or from k-means on the codes, and the loss is DEC's KL (gamma 0) or IDEC's MSE + gamma KL
on the augmented batch. In one process, no Ray; prototype first, pipeline only if it reaches the target.

    python benchmarks/decda_probe.py --run RUN_DIR --data mnist --passes 10 --init partition

One line per target update (ACC against the labels, agreement with the run's partition) and a JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from selflabel_probe import images

from engine.data import read_table
from engine.metrics import clustering_accuracy
from engine.models.dec import kl_divergence, log_soft_assignment, target_distribution
from engine.train.augment import random_affine
from engine.train.checkpoint import load_checkpoint, model_from_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished run directory (model/, assignments/)")
    p.add_argument("--data", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--init", default="partition", choices=["partition", "kmeans"])
    p.add_argument("--gamma", type=float, default=0.0, help="0: DEC's loss alone; > 0: MSE + gamma * KL (IDEC)")
    p.add_argument("--rotation", type=float, default=10.0)
    p.add_argument("--shift", type=float, default=0.1)
    p.add_argument("--passes", type=float, default=10.0)
    p.add_argument("--update", type=int, default=140, help="steps between two target updates")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    table = read_table(Path(a.run) / "assignments", stage="assign").sort_by("id")
    ids = table.column("id").to_numpy()
    run_labels = table.column("cluster").to_numpy()
    x_all, y_all = images(a.data)
    x, y = x_all[ids], y_all[ids]
    shape = x.shape[1:]
    state = load_checkpoint(Path(a.run) / "model")
    ae = model_from_checkpoint(state)
    shift = torch.as_tensor(np.asarray(state["input"]["shift"], dtype=np.float32))
    scale = torch.as_tensor(np.asarray(state["input"]["scale"], dtype=np.float32))
    # images() scales to [0, 1]; the run's checkpoint normalises the raw pixels itself (shift, scale)
    raw = torch.from_numpy(x.reshape(len(x), -1) * (255.0 if a.data == "mnist" else 16.0))
    xn = (raw - shift) * scale
    k = int(run_labels.max()) + 1

    @torch.no_grad()
    def codes(rows: torch.Tensor) -> torch.Tensor:
        ae.eval()
        out = torch.cat([ae.encode(c) for c in rows.split(8192)])
        ae.train()
        return out

    z = codes(xn)
    if a.init == "partition":
        labels = torch.from_numpy(run_labels.astype(np.int64))
        centers = torch.stack([z[labels == c].mean(0) for c in range(k)])
    else:
        from sklearn.cluster import KMeans

        centers = torch.from_numpy(KMeans(k, n_init=20, random_state=a.seed).fit(z.numpy()).cluster_centers_)
    centers = torch.nn.Parameter(centers.float().clone())
    params = [*ae.parameters(), centers] if a.gamma > 0 else [*ae.encoder.parameters(), centers]
    optimizer = torch.optim.Adam(params, lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    steps = int(a.passes * len(xn) / a.batch)
    print(json.dumps({"start_acc": clustering_accuracy(y, run_labels), "k": k, "steps": steps}), flush=True)
    t0, step, target, history = time.perf_counter(), 0, None, []
    order, pos = torch.randperm(len(xn), generator=gen), 0
    while True:
        if step % a.update == 0 or step >= steps:
            with torch.no_grad():
                q = log_soft_assignment(codes(xn), centers).exp()
                target = target_distribution(q, q.sum(0))
                pred = q.argmax(1).numpy()
            rec = {"step": step, "acc": round(clustering_accuracy(y, pred), 5),
                   "agree_run": round(clustering_accuracy(run_labels, pred), 5),
                   "seconds": round(time.perf_counter() - t0, 1)}
            history.append(rec)
            print(json.dumps(rec), flush=True)
            if step >= steps:
                break
        if pos + a.batch > len(xn):
            order, pos = torch.randperm(len(xn), generator=gen), 0
        idx = order[pos:pos + a.batch]
        pos += a.batch
        xa = random_affine(raw[idx], shape, rotation=a.rotation, shift=a.shift, generator=gen) if a.rotation or \
            a.shift else raw[idx]
        xa = (xa - shift) * scale
        za = ae.encode(xa)
        loss = kl_divergence(target[idx], log_soft_assignment(za, centers))
        if a.gamma > 0:
            loss = torch.nn.functional.mse_loss(ae.decode(za), xa) + a.gamma * loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    print(json.dumps({"final": history[-1], "best": max(history, key=lambda r: r["acc"]), **vars(a)}), flush=True)


if __name__ == "__main__":
    main()
