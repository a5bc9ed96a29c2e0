"""ClusterGAN schedules on MNIST in one process, for a fixed wall-clock budget: how fast the encoder's own clusters
(argmax of the code it reads from real images) line up with the digits. A cheap probe for choosing `mnist_gan`'s
settings before a 20-minute `dce run`; it trains engine.models.gan's ClusterGAN with its own losses, on one process
with both cores in bf16 (as `mnist_gan` does), and scores ACC on 10,000 fixed random images every minute.

    python benchmarks/gan_probe.py --budget 250                        # batch 256, lr 2e-4, 5 critic steps
    python benchmarks/gan_probe.py --budget 250 --critic-steps 2 --lr 5e-4
    python benchmarks/gan_probe.py --budget 250 --cycle 0.1            # + a reconstruction term on real images

--cycle W adds W * |x - G(E(x))|^2 (summed over pixels, mean over the batch) on the real batch to the
generator+encoder objective, with the encoder's code as softmax probabilities, or a straight-through hard Gumbel
sample with --hard-code. One JSON line per minute and one for the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.sources import _idx_array  # the idx source's reader: header and size checked
from engine.metrics import clustering_accuracy
from engine.models.gan import build_cluster_gan
from engine.train.loop import native_precision

MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=250.0, help="seconds of training")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--critic-steps", type=int, default=5)
    p.add_argument("--noise-sigma", type=float, default=0.1)
    p.add_argument("--beta-c", type=float, default=10.0)
    p.add_argument("--beta-n", type=float, default=10.0)
    p.add_argument("--cycle", type=float, default=0.0)
    p.add_argument("--hard-code", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16 falls back to fp32 on a CPU without native bfloat16, as training does")
    p.add_argument("--data", type=Path, default=MNIST)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(2)
    x = np.concatenate([_idx_array(str(a.data / f"{s}-images-idx3-ubyte.gz")) for s in ("train", "t10k")])
    x = x.reshape(len(x), -1)
    y = np.concatenate([_idx_array(str(a.data / f"{s}-labels-idx1-ubyte.gz")) for s in ("train", "t10k")])
    x = torch.tensor(x, dtype=torch.float32) / 255
    model = build_cluster_gan(in_dim=784, n_clusters=10, latent_dim=30, hidden=[512, 256],
                              critic_steps=a.critic_steps, noise_sigma=a.noise_sigma, beta_c=a.beta_c,
                              beta_n=a.beta_n, output_activation="sigmoid")
    opt = model.configure_optimizers(a.lr, 0.0)
    rng = torch.Generator().manual_seed(a.seed)
    held = torch.randperm(len(x), generator=rng)[:10_000]
    a.precision = native_precision(a.precision, "cpu")  # emulated bf16 ran ~17x slower on an AVX2-only EPYC
    settings = {k: v for k, v in vars(a).items() if k != "data"}

    def report(t: float, steps: int, final: bool = False) -> None:
        model.eval()
        with torch.no_grad():
            pred = model.predict(x[held]).numpy()
        model.train()
        print(json.dumps({"bench": "gan_probe", **settings, "seconds": round(t), "steps": steps, "final": final,
                          "acc": round(clustering_accuracy(y[held.numpy()], pred), 4),
                          "codes_used": int(len(np.unique(pred)))}), flush=True)

    t0, steps, next_report = time.perf_counter(), 0, 60.0
    while time.perf_counter() - t0 < a.budget:
        order = torch.randperm(len(x), generator=rng)
        for i in range(0, len(x) - a.batch_size + 1, a.batch_size):
            batch = x[order[i:i + a.batch_size]]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                for _ in range(a.critic_steps):
                    opt["critic"].zero_grad(set_to_none=True)
                    model(batch, mode="critic")[0].backward()
                    opt["critic"].step()
                opt["generator"].zero_grad(set_to_none=True)
                loss, _ = model(batch, mode="generator")
                if a.cycle > 0:
                    noise, logits = model.encode_parts(batch)
                    code = F.gumbel_softmax(logits, tau=0.5, hard=True) if a.hard_code else logits.softmax(dim=1)
                    back = model.generator(torch.cat([noise, code], dim=1)).float()
                    loss = loss + a.cycle * F.mse_loss(back, batch, reduction="sum") / len(batch)
                loss.backward()
                opt["generator"].step()
            steps += 1
            elapsed = time.perf_counter() - t0
            if elapsed > next_report:
                report(elapsed, steps)
                next_report += 60.0
            if elapsed > a.budget:
                break
    report(time.perf_counter() - t0, steps, final=True)


if __name__ == "__main__":
    main()
