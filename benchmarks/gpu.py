"""The prepared check for a lent GPU (issue 22, item 6): k-means beside the GPU k-means packages, the fused
assignment kernel against plain torch, and the training loop, in one run that imports no Ray, faiss or pydantic.

1. k-means, from one shared init (k rows of X), on (a) 1M x 256, k = 20,000, 25 iterations (the FAISS wiki's
   case) and (b) 10M x 16, k = 1,024, 20 iterations (the engine's own regime): engine.cluster.KMeans
   (backend="torch", at each `precision` when its KMeans takes one), flash-kmeans 0.3.1 and fastkmeans 0.5.0.
   Seconds include the upload (X starts in host memory, as a user's array does); each implementation first
   runs once on a slice so compilation stays out of the time. TFLOP/s = 2 n d k iterations / seconds. Inertia
   is recomputed the same way for all (exact nearest centroid, float32, float64 sum) and divided by the
   engine's fp32 inertia. Memory: torch.cuda.max_memory_allocated on CUDA; on a CPU only the process's peak RSS.
   fastkmeans takes no init: it draws `torch.randperm(n)[:k]` after seeding torch, so the shared init is drawn
   that way, and its niter=0 fit checks that it starts from the same rows (`same_init`).
2. engine/cluster/_fused.py on CUDA (in Triton's interpreter on a CPU) against the plain torch path: labels,
   best / second-best values, and the time of one assignment (fused vs addmm + min over row blocks), with a
   sweep of block sizes.
3. engine/train/loop.py on the device: seconds per epoch of configs/mnist_ae.yaml's autoencoder in fp32 and
   bf16, then configs/mnist_gan.yaml's ClusterGAN for as many epochs as fit in --gan-seconds, and its ACC.
   MNIST from --data (a folder with the four idx files, gzipped or not), else synthetic digits (said so).

Every result is one JSON line on stdout (and in --out); --record appends tables to benchmarks/RESULTS.md, and
--replay FILE records the lines of an earlier run (the device's) without measuring anything.

    bash benchmarks/gpu_check.sh prepare     # then the device call its header gives; then --replay its output
    python benchmarks/gpu.py --tiny          # seconds on a CPU (tests/test_gpu_script.py)
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.metadata
import inspect
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from kmeans_inmemory import make_data  # noqa: E402
from record import append_section, machine  # noqa: E402

UNWANTED = ("ray", "faiss", "pydantic")
CASES = {"a": {"n": 1_000_000, "d": 256, "k": 20_000, "iters": 25},
         "b": {"n": 10_000_000, "d": 16, "k": 1024, "iters": 20}}
TINY_CASES = {"a": {"n": 3000, "d": 32, "k": 40, "iters": 4}, "b": {"n": 6000, "d": 16, "k": 32, "iters": 4}}
FUSED_SHAPES = [(10_000_000, 16, 1024), (2_000_000, 64, 1024)]
TINY_FUSED_SHAPES = [(700, 16, 40), (300, 64, 24)]
BLOCKS = [(128, 64, 4), (128, 64, 8), (64, 64, 4), (256, 64, 8), (128, 128, 8), (128, 32, 4)]
PRECISIONS = ("fp32", "tf32", "bf16")


def unwanted_imports() -> list[str]:
    return sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in UNWANTED and mod is not None)


# ---- measuring ---------------------------------------------------------------------------------------------

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "device (torch.cuda.max_memory_allocated)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host (peak RSS of the process so far)"


def attempt(row: dict, fn: Callable[[], dict]) -> dict:
    """`row` updated by fn()'s fields, or marked failed with the error: one failure never stops the run."""
    import torch

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row.update(fn())
        row.setdefault("status", "ok")
        if caught:
            row["warnings"] = sorted({str(w.message)[:300] for w in caught})
    except Exception as e:  # noqa: BLE001 - recorded, and the run goes on to the next measurement
        row.update(status="failed", error=f"{type(e).__name__}: {e}"[:800])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def inertia(X, centroids: np.ndarray, device) -> float:
    """Sum of squared distances to the nearest centroid: float32 products (no tf32), float64 sum."""
    import torch

    C = torch.as_tensor(np.asarray(centroids, dtype=np.float32), device=device)
    c_sq = (C * C).sum(dim=1)
    block = max(1024, (1 << 28) // C.shape[0])
    total = torch.zeros((), dtype=torch.float64, device=device)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for start in range(0, X.shape[0], block):
            x = X[start:start + block]
            best = torch.addmm(c_sq, x, C.T, alpha=-2.0).min(dim=1).values + (x * x).sum(dim=1)
            total += best.clamp_min(0).double().sum()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    return float(total)


# ---- 1. k-means ---------------------------------------------------------------------------------------------

def shared_init(X: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The k rows fastkmeans starts from: torch.randperm(n)[:k] right after torch.manual_seed(seed)."""
    import torch

    return X[torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))[:k].numpy()].copy()


def fit_engine(KMeans: type, precision: str | None) -> Callable:
    def fit(X, init, iters, device):
        options = {} if precision is None else {"precision": precision}
        model = KMeans(init.shape[0], init=init, n_init=1, max_iter=iters, tol=0, backend="torch", **options)
        model.fit(X)
        return model.cluster_centers_, int(getattr(model, "n_iter_", iters)), "torch"
    return fit


def fit_flash(precision: str) -> Callable:
    def fit(X, init, iters, device):
        import torch

        if device.type == "cuda":
            # Imported from the Triton module itself: the package's __init__ falls back to torch silently.
            from flash_kmeans.kmeans_triton_impl import batch_kmeans_Euclid as kmeans
            path = "triton"
        else:
            from flash_kmeans.torch_fallback import batch_kmeans_Euclid_torch_native as kmeans
            path = "torch fallback (no CUDA)"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        x = torch.from_numpy(X).to(device).to(dtype)[None]
        c0 = torch.from_numpy(init).to(device).to(dtype)[None]
        _, centroids, n_iter = kmeans(x, init.shape[0], max_iters=iters, tol=-1.0, init_centroids=c0)
        return centroids[0].float().cpu().numpy(), int(n_iter), path
    return fit


def fit_fastkmeans(precision: str, seed: int) -> Callable:
    def fit(X, init, iters, device):
        import torch
        from fastkmeans import FastKMeans

        dtype = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        model = FastKMeans(X.shape[1], init.shape[0], niter=iters, tol=-1.0, seed=seed, gpu=device.type != "cpu",
                           device=str(device), dtype=dtype)
        model.train(X)
        return model.centroids, iters, "triton" if model.use_triton else "torch"
    return fit


def fastkmeans_starts_at(X: np.ndarray, init: np.ndarray, seed: int) -> bool:
    import torch
    from fastkmeans import FastKMeans

    model = FastKMeans(X.shape[1], init.shape[0], niter=0, seed=seed, gpu=False, dtype=torch.float32)
    model.train(X)
    return bool(np.array_equal(model.centroids, init))


def kmeans_plan(KMeans: type, seed: int) -> list[tuple[str, str, Callable | str]]:
    """(implementation, precision, fit or the reason it is skipped)."""
    takes_precision = "precision" in inspect.signature(KMeans).parameters
    plan: list[tuple[str, str, Callable | str]] = [
        ("engine", p, fit_engine(KMeans, p)) for p in PRECISIONS
    ] if takes_precision else [("engine", "fp32 (KMeans takes no precision yet)", fit_engine(KMeans, None))]
    for name, fits in (("flash-kmeans", [("fp32", fit_flash("fp32")), ("bf16", fit_flash("bf16"))]),
                       ("fastkmeans", [("default", fit_fastkmeans("default", seed))])):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            plan += [(name, p, f"{name} is not installed (carry its wheel)") for p, _ in fits]
            continue
        plan += [(f"{name} {version}", p, fit) for p, fit in fits]
    return plan


def run_case(case: str, spec: dict, KMeans: type, device, args, emit: Callable[[dict], None]) -> None:
    import torch

    n, d, k, iters = spec["n"], spec["d"], spec["k"], spec["iters"]
    X, _ = make_data(n, d, k, args.seed)
    init = shared_init(X, k, args.seed)
    warm = np.ascontiguousarray(X[: min(n, max(4 * k, 65536))])
    base = {"bench": "gpu", "section": "kmeans", "case": case, "n": n, "d": d, "k": k, "iters": iters}
    rows, centroids = [], {}
    for impl, precision, fit in kmeans_plan(KMeans, args.seed):
        row = dict(base, impl=impl, precision=precision)
        if isinstance(fit, str):
            rows.append(dict(row, status="skipped", reason=fit))
            continue

        def measure(fit=fit, impl=impl, precision=precision) -> dict:
            fit(warm, init, 1, device)  # burn-in: Triton compilation, cuBLAS handles, allocator
            sync(device)
            reset_peak(device)
            start = time.perf_counter()
            result, n_iter, path = fit(X, init, iters, device)
            sync(device)
            seconds = time.perf_counter() - start
            memory, kind = peak_mb(device)
            centroids[(impl, precision)] = np.asarray(result, dtype=np.float32)
            out = {"path": path, "seconds": seconds, "n_iter": n_iter,
                   "tflops": 2 * n * d * k * n_iter / seconds / 1e12, "peak_memory_mb": memory, "memory": kind}
            if impl.startswith("fastkmeans"):
                out["same_init"] = fastkmeans_starts_at(X, init, args.seed)
            return out

        rows.append(attempt(row, measure))
    # Inertia last, with X on the device once, so that no implementation's memory peak holds a second copy.
    X_dev = torch.from_numpy(X).to(device)
    values = {key: inertia(X_dev, c, device) for key, c in centroids.items()}
    del X_dev
    reference = next((v for (impl, p), v in values.items() if impl == "engine" and p.startswith("fp32")), None)
    for row in rows:
        value = values.get((row["impl"], row["precision"]))
        if value is not None:
            row["inertia"] = value
            row["inertia_ratio_to_fp32"] = value / reference if reference else None
        emit(row)


# ---- 2. the fused assignment ------------------------------------------------------------------------------

def plain_assign(X, C, c_sq):
    """The unfused path: addmm + min over row blocks, writing each block's n x k distances."""
    import torch

    block = max(1024, (1 << 28) // C.shape[0])
    labels = torch.empty(X.shape[0], dtype=torch.int64, device=X.device)
    for start in range(0, X.shape[0], block):
        labels[start:start + block] = torch.addmm(c_sq, X[start:start + block], C.T, alpha=-2.0).argmin(dim=1)
    return labels


def median_seconds(fn: Callable[[], object], device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_fused(device, args, emit: Callable[[dict], None]) -> None:
    from engine.cluster import _fused

    interpreted = device.type == "cpu" and _fused.interpreting()
    shapes = TINY_FUSED_SHAPES if args.tiny else FUSED_SHAPES
    base = {"bench": "gpu", "section": "fused", "path": "triton interpreter" if interpreted else "triton"}
    if not (_fused.available(device) or interpreted):
        for n, d, k in shapes:
            emit(dict(base, n=n, d=d, k=k, status="skipped",
                      reason=f"no CUDA device with triton here ({device}); on a CPU run with TRITON_INTERPRET=1"))
        return
    for index, (n, d, k) in enumerate(shapes):
        fused_shape(n, d, k, device, args, dict(base, n=n, d=d, k=k), sweep=index == 0, emit=emit)


def fused_shape(n: int, d: int, k: int, device, args, base: dict, sweep: bool, emit: Callable[[dict], None]) -> None:
    """fused_assign against the plain path on blobs of one shape, each precision; with `sweep`, block sizes too."""
    import torch

    from engine.cluster import _fused

    interpreted = base["path"] == "triton interpreter"
    repeats = 1 if interpreted else 5
    g = torch.Generator(device=device).manual_seed(args.seed)
    centers = torch.randn(k, d, device=device, generator=g) * 2
    X = centers[torch.randint(0, k, (n,), device=device, generator=g)]
    X += torch.randn(n, d, device=device, generator=g)
    C = X[torch.randperm(n, device=device, generator=g)[:k]].contiguous()
    c_sq = (C * C).sum(dim=1)
    plain = median_seconds(lambda: plain_assign(X, C, c_sq), device, repeats)

    def compare(precision: str) -> dict:
        labels, best, second = _fused.fused_assign(X, C, c_sq, precision=precision)
        # tf32 is checked against fp32: cuBLAS and Triton need not round the operands alike.
        ref_labels, ref_best, ref_second = _fused.reference_assign(
            X, C, c_sq, precision="fp32" if precision == "tf32" else precision)
        scale = float(ref_best.abs().max()) + 1.0
        differ = labels != ref_labels
        gaps = (ref_second - ref_best)[differ] / scale
        seconds = median_seconds(lambda: _fused.fused_assign(X, C, c_sq, precision=precision), device, repeats)
        return {"label_agreement": float((~differ).float().mean()),
                "max_relative_gap_where_labels_differ": float(gaps.max()) if gaps.numel() else 0.0,
                "best_max_relative_error": float((best - ref_best).abs().max()) / scale,
                "second_max_relative_error": float((second - ref_second).abs().max()) / scale,
                "fused_seconds": seconds, "plain_fp32_seconds": plain, "speedup": plain / seconds}

    def blocks(rows: int, cols: int, num_warps: int) -> dict:
        return {"fused_seconds": median_seconds(lambda: _fused.fused_assign(
            X, C, c_sq, block_rows=rows, block_centroids=cols, num_warps=num_warps), device, repeats)}

    for precision in PRECISIONS:
        emit(attempt(dict(base, precision=precision), lambda precision=precision: compare(precision)))
    for rows, cols, num_warps in (BLOCKS[: 1 if interpreted else None] if sweep else []):
        emit(attempt(dict(base, precision="fp32", block_rows=rows, block_centroids=cols, num_warps=num_warps),
                     lambda rows=rows, cols=cols, num_warps=num_warps: blocks(rows, cols, num_warps)))


# ---- 3. training --------------------------------------------------------------------------------------------

MNIST = {"images": ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"],
         "labels": ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"]}


def read_idx(path: Path) -> np.ndarray:
    if not path.exists():
        path = path.with_name(path.name + ".gz")
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def digits(args) -> tuple[np.ndarray, np.ndarray, str]:
    """(rows in [0, 1] of 784 pixels, labels, where they came from)."""
    rows = 128 if args.tiny else None
    if args.data and all((Path(args.data) / f).exists() or (Path(args.data) / f"{f}.gz").exists()
                         for f in MNIST["images"] + MNIST["labels"]):
        x = np.concatenate([read_idx(Path(args.data) / f).reshape(-1, 784) for f in MNIST["images"]])
        y = np.concatenate([read_idx(Path(args.data) / f) for f in MNIST["labels"]]).astype(np.int64)
        return (x[:rows] / np.float32(255)).astype(np.float32), y[:rows], f"MNIST ({args.data})"
    # Ten smooth random 28 x 28 prototypes with noise: a stand-in with the shape of MNIST, not its difficulty.
    rng = np.random.default_rng(args.seed)
    n = rows or 70_000
    protos = rng.random((10, 7, 7)).repeat(4, axis=1).repeat(4, axis=2).reshape(10, 784).astype(np.float32)
    y = rng.integers(0, 10, n)
    x = np.clip(protos[y] + rng.normal(0, 0.2, (n, 784)).astype(np.float32), 0, 1)
    return x.astype(np.float32), y, "synthetic (10 noisy prototypes; --data names no MNIST folder)"


def run_training(device, args, deadline: float, emit: Callable[[dict], None]) -> None:
    import torch
    import yaml

    from engine.metrics import clustering_accuracy
    from engine.models import build_model
    from engine.train.loop import configure_optimizers, native_precision, train

    x, y, source = digits(args)
    X = torch.from_numpy(x).to(device)

    def epoch_batches(batch_size: int) -> Callable:
        def batches(epoch: int):
            g = torch.Generator(device=device).manual_seed(args.seed * 1000 + epoch)
            order = torch.randperm(X.shape[0], device=device, generator=g)
            for start in range(0, X.shape[0], batch_size):
                yield X[order[start:start + batch_size]]
        return batches

    def build(cfg: dict, **extra):
        torch.manual_seed(args.seed)
        options = {key: value for key, value in cfg["model"].items() if key != "name"}
        model = build_model(cfg["model"]["name"], in_dim=X.shape[1], **options, **extra).to(device)
        return model, configure_optimizers(model, cfg["train"]["lr"], cfg["train"].get("weight_decay", 0.0))

    base = {"bench": "gpu", "section": "train", "data": source, "rows": int(X.shape[0])}
    ae = yaml.safe_load((ROOT / "configs" / "mnist_ae.yaml").read_text())
    for precision in ("fp32", "bf16"):
        def autoencoder(precision=precision) -> dict:
            model, optimizers = build(ae)
            used = native_precision(precision, device.type)
            history = train(model, optimizers, epoch_batches(ae["train"]["batch_size"]), epochs=args.ae_epochs,
                            precision=used)
            seconds = [h["seconds"] for h in history]
            return {"precision_used": used, "epochs": len(history), "epoch_seconds": seconds,
                    "seconds_per_epoch": statistics.median(seconds[1:] or seconds),
                    "final_loss": history[-1]["loss"]}
        emit(attempt(dict(base, model="mnist_ae (configs/mnist_ae.yaml's model, no augmentation)",
                          precision=precision), autoencoder))

    gan = yaml.safe_load((ROOT / "configs" / "mnist_gan.yaml").read_text())

    def cluster_gan() -> dict:
        model, optimizers = build(gan, n_clusters=gan["cluster"]["k"])
        used = native_precision(gan["train"]["precision"], device.type)
        budget = max(0.0, min(args.gan_seconds, deadline - time.monotonic()))
        batches, history, start = epoch_batches(gan["train"]["batch_size"]), [], time.monotonic()
        # Another epoch only when it should end inside the budget (epochs take about as long as the last one).
        while not history or time.monotonic() - start + history[-1]["seconds"] <= budget:
            history += train(model, optimizers, batches, epochs=len(history) + 1, start_epoch=len(history),
                             precision=used)
        model.eval()
        with torch.no_grad():
            codes = torch.cat([model.predict(X[i:i + 8192]) for i in range(0, X.shape[0], 8192)]).cpu().numpy()
        return {"precision_used": used, "budget_seconds": budget, "epochs": len(history),
                "seconds": time.monotonic() - start,
                "seconds_per_epoch": statistics.median(h["seconds"] for h in history),
                "acc": clustering_accuracy(y, codes), "acc_of": "the argmax of the encoder's code (ClusterGAN's own)"}
    emit(attempt(dict(base, model="ClusterGAN (configs/mnist_gan.yaml's model)",
                      precision=gan["train"]["precision"]), cluster_gan))


# ---- recording ---------------------------------------------------------------------------------------------

def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def status(row: dict) -> str:
    return row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('reason') or row.get('error')}"


def ms(row: dict, key: str) -> str:
    return fmt(1e3 * row[key] if key in row else None, ".2f")


def blocks(row: dict) -> str:
    keys = ("block_rows", "block_centroids", "num_warps")
    return ", ".join(str(row[key]) for key in keys) if "block_rows" in row else "default"


# section -> (title, [(column, cell of a row)], notes)
TABLES = {
    "kmeans": (
        "GPU k-means: engine vs flash-kmeans vs fastkmeans (benchmarks/gpu.py)",
        [("case", lambda r: r["case"]), ("n x d, k, iters", lambda r: f"{r['n']} x {r['d']}, {r['k']}, {r['iters']}"),
         ("impl", lambda r: r["impl"]), ("precision", lambda r: r["precision"]),
         ("path", lambda r: r.get("path", "")), ("seconds", lambda r: fmt(r.get("seconds"), ".3f")),
         ("TFLOP/s", lambda r: fmt(r.get("tflops"), ".1f")),
         ("inertia / engine fp32", lambda r: fmt(r.get("inertia_ratio_to_fp32"), ".5f")),
         ("peak MB", lambda r: fmt(r.get("peak_memory_mb"), ".0f")), ("status", status)],
        "Seconds include the upload from host memory; one burn-in fit on a slice first. TFLOP/s = 2 n d k "
        "iterations / seconds. Inertia recomputed alike for all (float32, exact nearest centroid). All from one "
        "init: k rows drawn as fastkmeans draws them (same_init checks it)."),
    "fused": (
        "Fused distance + argmin (engine/cluster/_fused.py) vs plain torch",
        [("n x d, k", lambda r: f"{r['n']} x {r['d']}, {r['k']}"), ("precision", lambda r: r.get("precision", "")),
         ("path", lambda r: r["path"]), ("blocks (rows, centroids, warps)", blocks),
         ("fused ms", lambda r: ms(r, "fused_seconds")), ("plain fp32 ms", lambda r: ms(r, "plain_fp32_seconds")),
         ("speedup", lambda r: fmt(r.get("speedup"), ".2f")),
         ("label agreement", lambda r: fmt(r.get("label_agreement"), ".6f")), ("status", status)],
        "Plain = addmm + argmin over row blocks (n x k written); median of 5 after one warm-up. Labels may differ "
        "only at near ties (the JSON lines' max_relative_gap_where_labels_differ)."),
    "train": (
        "Training with engine/train/loop.py (benchmarks/gpu.py)",
        [("model", lambda r: r["model"]),
         ("precision (used)", lambda r: f"{r['precision']} ({r.get('precision_used', 'n/a')})"),
         ("epochs", lambda r: r.get("epochs", "n/a")), ("s / epoch", lambda r: fmt(r.get("seconds_per_epoch"), ".2f")),
         ("ACC", lambda r: fmt(r.get("acc"), ".3f")), ("data", lambda r: r["data"]), ("status", status)],
        "Batches are slices of the data held on the device (no Ray Data, no augmentation); seconds per epoch are "
        "the median of the epochs after the first. ClusterGAN: as many epochs as fit in the budget."),
}


def record(lines: list[dict]) -> None:
    env = next(line for line in lines if line.get("section") == "env")
    where = (f"{env['device_name']}; torch {env['torch']}, triton {env['triton']}, Python {env['python']}; "
             f"`python benchmarks/gpu.py {' '.join(env['argv'])}`{' (tiny sizes)' if env['tiny'] else ''}.")
    for section, (title, columns, notes) in TABLES.items():
        rows = [line for line in lines if line.get("section") == section]
        if rows:
            append_section(title, [name for name, _ in columns], [[cell(r) for _, cell in columns] for r in rows],
                           f"{where} {notes}", measured=f"{env['date']} · {env['device_name']} on {env['host']}")


# ---- main ---------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="every size shrunk to seconds on a CPU")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    parser.add_argument("--cases", default="b,a", help="k-means cases to run, in order: a, b")
    parser.add_argument("--skip", action="append", default=[], choices=["kmeans", "fused", "train"])
    parser.add_argument("--data", default=None, help="folder with MNIST's four idx files (else synthetic digits)")
    parser.add_argument("--ae-epochs", type=int, default=None, help="autoencoder epochs per precision (4; tiny: 2)")
    parser.add_argument("--gan-seconds", type=float, default=None, help="ClusterGAN's time budget (240; tiny: 2)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the start after which ClusterGAN starts no further epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--replay", default=None, help="record the JSON lines of this file; measure nothing")
    args = parser.parse_args()
    if args.replay:
        record([json.loads(line) for line in Path(args.replay).read_text().splitlines() if line.strip()])
        return
    started = time.monotonic()
    args.ae_epochs = args.ae_epochs or (2 if args.tiny else 4)
    args.gan_seconds = args.gan_seconds if args.gan_seconds is not None else (2.0 if args.tiny else 240.0)
    deadline = started + (args.deadline if args.deadline is not None else 1e9)

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and "triton" not in sys.modules:
        # The fused kernel can only be interpreted here; Triton reads this when it is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    lines: list[dict] = []
    out = open(args.out, "a") if args.out else None  # noqa: SIM115 - appended to line by line, closed at the end

    def emit(line: dict) -> None:
        lines.append(line)
        text = json.dumps(line, default=str)
        print(text, flush=True)
        if out:
            out.write(text + "\n")
            out.flush()

    from engine.cluster import KMeans
    versions = {}
    for name in ("triton", "flash-kmeans", "fastkmeans", "numpy", "scikit-learn"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    emit({"bench": "gpu", "section": "env", "device": str(device), "tiny": args.tiny, "argv": sys.argv[1:],
          "date": datetime.date.today().isoformat(), "host": machine(),
          "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no CUDA device)",
          "torch": torch.__version__, "cuda": torch.version.cuda, "python":
          platform.python_version(), **versions,
          "kmeans_takes_precision": "precision" in inspect.signature(KMeans).parameters})
    cases = TINY_CASES if args.tiny else CASES
    if "kmeans" not in args.skip:
        for case in args.cases.split(","):
            run_case(case, cases[case], KMeans, device, args, emit)
    if "fused" not in args.skip:
        check_fused(device, args, emit)
    if "train" not in args.skip:
        run_training(device, args, deadline, emit)
    emit({"bench": "gpu", "section": "imports", "unwanted_imported": unwanted_imports(),
          "seconds": time.monotonic() - started})
    if out:
        out.close()
    if args.record:
        record(lines)


if __name__ == "__main__":
    main()
