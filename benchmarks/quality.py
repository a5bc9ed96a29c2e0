"""Clustering quality of whole `dce run` pipelines over seeds, beside k-means on the raw pixels, in one Ray session.

    python benchmarks/quality.py --configs digits digits_conv digits_vae digits_vade digits_idec digits_gan --record
    python benchmarks/quality.py --configs mnist_ae mnist_n2d mnist_idec mnist_vae mnist_vade mnist_gan --record

One JSON line per (config, seed), and one for the peer (scikit-learn KMeans on the pixels, same k; as many
restarts as the most any config uses, and at least 10, so that the peer does not depend on the configs' order)
per data set and seed. With --record, one table per data set is appended to RESULTS.md, with
the published accuracy of each method where the literature has one for that data set.

Configs whose train stage is the same (data, train section, seed and the model it pretrains: mnist_ae,
mnist_n2d and mnist_idec) train once per seed: the later ones start from the first one's model
(`dce run --pretrained`), and their reported seconds include that run's train stage, so every row's time is
what the method costs alone. --no-share trains each config anew.

--perturb float16 and/or --perturb drop1 run every config and seed again on a perturbed copy of its input (the
rows as the model sees them, after the config's normalisation, rounded to float16 and back; 1% of the rows, a
seeded draw, left out) written as .npy beside the runs, so that a recipe's accuracy on slightly different input can
be compared with its own:

    python benchmarks/quality.py --configs digits --seeds 3 --perturb drop1 --record

float16 is skipped, with a line on stderr, where float16 holds every normalised value exactly (the digits' 0..16
divided by 16 under `normalize: max`): the perturbed input would be the input itself.

--variant invert|rescale16|rotate90|heldout (repeatable) runs every config and seed, unchanged but for its data
source, on a data set made from its input (see VARIANTS), with its own table and its own k-means on the pixels:
the evidence that a recipe is not tuned to one data set. --no-own leaves out the runs on the input as it is.

    python benchmarks/quality.py --configs digits --seeds 3 --variant invert --variant heldout --record

--runs DIR keeps the run directories there, and a later invocation with the same DIR reads back every
(config, seed) that already finished with the same config (its metrics.json and run.json: wall time, stage
times, the run it was pretrained by) instead of running it again, so a long table can be built in parts:

    python benchmarks/quality.py --configs mnist_ae mnist_n2d --runs /data/q --seeds 3
    python benchmarks/quality.py --configs mnist_ae mnist_n2d mnist_idec --runs /data/q --seeds 3 --record
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import append_section  # noqa: E402

# ACC on all 70,000 MNIST digits as the papers report it (../shared/data/README.md gathers them).
PUBLISHED_ACC = {
    "mnist": {"kmeans_pixels": "0.53", "mlp_ae + kmeans": "0.82-0.88 (AE + k-means)", "dec": "0.84-0.87 (DEC)",
              "idec": "0.88 (IDEC)", "conv_ae + kmeans": "0.85 (DCEC's CAE + k-means)",
              "vae + kmeans": "0.94 (VaDE, a VAE with a GMM prior)",
              "vae + umap + gmm": "0.945 (VaDE, a VAE with a GMM prior)", "gan + kmeans": "0.91-0.95 (ClusterGAN)",
              "gan + umap + gmm": "0.91-0.95 (ClusterGAN)", "conv_ae + umap + gmm": "0.85 (DCEC's CAE + k-means)",
              "mlp_ae + umap + gmm": "0.979 (N2D)", "vade + gmm": "0.945 (VaDE)",
              "vade + posterior": "0.945 (VaDE)"},
    # The 10,000 test digits alone (`--set data.images=[...t10k...]`, lines renamed by hand to mnist-test).
    "mnist-test": {"mlp_ae + umap + gmm": "0.948 (N2D)"},
}


def _pixels(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The configured data set's raw rows and labels, shard by shard, for the pixel peer.

    Unscaled: the sources' `normalize: max` is one global factor, which k-means is invariant to.
    """
    import pyarrow as pa

    from engine.data.schema import vectors_to_numpy
    from engine.data.sources import open_source, read_shard

    source = open_source(cfg.data)
    table = pa.concat_tables([read_shard(cfg.data, spec) for spec in source.specs])
    return vectors_to_numpy(table.column("x"), name="x"), table.column("label").to_numpy()


PERTURBATIONS = ("float16", "drop1")
# Other data sets made from the configured one, for the evidence that a recipe is not tuned to it (issue 26 item 3):
# the pixels inverted (max - x), every image rescaled to 16x16, every image rotated by 90 degrees, or only the
# first half of the classes (k halved).
VARIANTS = ("invert", "rescale16", "rotate90", "heldout")


class SameInput(ValueError):
    """The perturbation would leave the input as it is."""


def perturbed_input(cfg, kind: str, folder: Path, seed: int = 0) -> list[str]:
    """`--set` overrides that make `cfg` read a perturbed copy (PERTURBATIONS) or a variant (VARIANTS) of its input,
    written to `folder` as .npy: `float16` rounds the rows as the model sees them (normalised) to float16 and back,
    `drop1` leaves out 1% of the rows (a draw seeded by `seed`); the variants are described at VARIANTS. Images keep
    their shape (but `rescale16`'s), and the input normalisation is the config's."""
    from engine.data.describe import normalisation
    from engine.data.sources import open_source

    x, y = _pixels(cfg)
    shape = open_source(cfg.data).image_shape
    extra: list[str] = []
    if kind == "float16":
        # The rows as the model sees them (the config's normalisation applied) rounded to half precision, as in a
        # user's file of scaled images in float16 (rounding the raw rows changes nothing on 8-bit images), then
        # scaled back: the config's own normalisation makes of them the rounded rows, and the settings that
        # depend on the raw scale stay as they are (augmentation fills with 0, the background; sigmoid outputs).
        shift, scale = normalisation(cfg.data.normalize, n=len(x), s=x.sum(0, dtype=np.float64),
                                     sq=np.square(x, dtype=np.float64).sum(0), lo=x.min(0), hi=x.max(0))
        seen = ((x - shift) * scale).astype(np.float32)
        rounded = seen.astype(np.float16).astype(np.float32)
        if np.array_equal(rounded, seen):
            raise SameInput(f"--perturb float16 on {cfg.name}: float16 holds every value of its input exactly as "
                            f"the model sees it (normalize: {cfg.data.normalize}); the perturbed input would be the "
                            "input itself")
        x = (rounded / scale + shift).astype(np.float32)
    elif kind == "drop1":
        keep = np.sort(np.random.default_rng(seed).permutation(len(x))[: len(x) - len(x) // 100])
        x, y = x[keep], y[keep]
    elif kind == "invert":
        x = x.max() - x
    elif kind in ("rescale16", "rotate90"):
        if not shape:
            raise ValueError(f"--variant {kind} needs images; {cfg.data.source!r} rows have no image shape")
        images = x.reshape(len(x), -1, *shape[-2:])  # (n, channels, h, w)
        if kind == "rotate90":
            images = np.rot90(images, axes=(2, 3))
        else:
            import torch

            images = torch.nn.functional.interpolate(torch.tensor(images, dtype=torch.float32),
                                                     size=(16, 16), mode="bilinear", antialias=True).numpy()
            shape = (*shape[:-2], 16, 16)
        x = np.ascontiguousarray(images).reshape(len(x), -1)
    elif kind == "heldout":
        classes = np.unique(y)[: max(2, len(np.unique(y)) // 2)]
        keep = np.isin(y, classes)
        x, y = x[keep], y[keep]
        extra = [f"cluster.k={len(classes)}"]
        if getattr(cfg.model, "n_clusters", None) is not None:
            extra.append(f"model.n_clusters={len(classes)}")
    else:
        raise ValueError(f"{kind!r} should be one of {list(PERTURBATIONS + VARIANTS)}")
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "x.npy", x.reshape(len(x), *shape) if shape else x)
    np.save(folder / "y.npy", y.astype(np.int64))
    return [f"data={{source: npy, path: {folder / 'x.npy'}, labels_path: {folder / 'y.npy'}, "
            f"normalize: {cfg.data.normalize}}}", *extra]


def input_folder(root: Path, cfg, kind: str) -> Path:
    """Where `perturbed_input` writes `kind` of `cfg`'s input: one folder per raw input (the data section less its
    normalisation, which the configs apply themselves) and kind, so that configs reading the same data, mnist_ae and
    mnist_n2d say, read the same perturbed file and can share a train stage."""
    raw = cfg.data.model_dump(mode="json", exclude={"normalize"})
    digest = hashlib.blake2b(json.dumps(raw, sort_keys=True).encode(), digest_size=4).hexdigest()
    return root / f"input-{dataset_name(cfg.data)}-{kind}-{digest}"


PEER_MIN_RESTARTS = 10  # scikit-learn's n_init before 1.4, the usual k-means baseline in the literature


def peer_restarts(configs) -> int:
    """Restarts of the pixel peer: the most any of `configs` uses for its own clustering, at least 10.

    The same whatever the order of the configs (it was the first config's `cluster.n_init`, so listing a
    recipe with one restart first gave the peer one restart too)."""
    return max(PEER_MIN_RESTARTS, *(cfg.cluster.n_init for cfg in configs))


def dataset_name(data) -> str:
    """A data section's name in the tables: its source, or for idx files the folder they are in (`mnist`); with a
    `--set data...` override, the data set it reads then (a recipe run on another data set)."""
    return data.source if data.source != "idx" else Path(data.images[0]).parent.name


def _steps(cfg) -> str:
    """The method's name, as PUBLISHED_ACC knows it; trained on augmented images is said after it."""
    model = cfg.model.name
    if model in ("dec", "idec"):
        steps = model
    else:
        steps = " + ".join([model, *([cfg.cluster.manifold] if cfg.cluster.manifold != "none" else []),
                            cfg.cluster.method])
    return steps + (" (augmented)" if cfg.train.augment.enabled else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["digits"], help="config names or files")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every config")
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--no-share", action="store_true", help="train every config anew, even with the same "
                                                                "train stage as an earlier one")
    parser.add_argument("--runs", metavar="DIR", help="keep the run directories in DIR and read back the runs "
                                                     "that finished there before, instead of redoing them")
    parser.add_argument("--perturb", action="append", default=[], choices=PERTURBATIONS,
                        help="also run every config and seed on a perturbed copy of its input (repeatable)")
    parser.add_argument("--variant", action="append", default=[], choices=VARIANTS,
                        help="also run every config and seed on a data set made from its input (repeatable): its "
                             "own table, with k-means on its pixels")
    parser.add_argument("--no-own", action="store_true", help="with --perturb / --variant: run only those, not "
                        "the input as it is (e.g. more seeds of a variant alone)")
    parser.add_argument("--replay", metavar="JSONL", help="record the result lines of an earlier run (its stdout) "
                                                         "instead of running anything")
    args = parser.parse_args()
    if args.replay:
        rows: dict[str, list[dict]] = {}
        for text in Path(args.replay).read_text().splitlines():
            if text.startswith("{"):
                line = json.loads(text)
                rows.setdefault(line["data"], []).append(line)
        _record_all(rows, args)
        return

    from sklearn.cluster import KMeans as SKKMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from engine.config import load_config
    from engine.metrics import clustering_accuracy
    from engine.pipeline import model_args, run_pipeline
    from engine.runtime import init_ray

    init_ray()
    rows = {}  # data set -> result lines
    peers_done: set[tuple[str, int]] = set()
    runs_root = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="dce-quality-"))
    runs_root.mkdir(parents=True, exist_ok=True)
    trained: dict[str, tuple[Path, str, float]] = {}  # train-stage key -> (run dir, config, train seconds)
    kinds = [*([] if args.no_own else [None]), *args.perturb, *args.variant]
    restarts = peer_restarts([load_config(name, args.overrides) for name in args.configs])
    jobs = [(name, seed, kind) for name in args.configs for kind in kinds for seed in range(args.seeds)]
    for name, seed, kind in jobs:
        cfg = load_config(name, [*args.overrides, f"seed={seed}"])
        label = name if kind is None else f"{name} [{kind}]"
        if kind is not None:
            folder = input_folder(runs_root, cfg, kind)
            try:
                cfg = load_config(name, [*args.overrides, f"seed={seed}", *perturbed_input(cfg, kind, folder)])
            except SameInput as e:
                if seed == 0:
                    print(f"skipped: {e}", file=sys.stderr, flush=True)
                continue
        dataset = dataset_name(load_config(name, args.overrides).data)  # the input before any perturbation
        if kind in VARIANTS:  # another data set: its own table and its own pixel peer
            dataset = f"{dataset}-{kind}"
        peer_file = runs_root / f"kmeans_pixels-{dataset}-{seed}-r{restarts}.json"
        if (dataset, seed) not in peers_done:
            if peer_file.is_file():  # measured by an earlier invocation with the same --runs
                peer = json.loads(peer_file.read_text())
            else:
                x, y = _pixels(cfg)
                t0 = time.perf_counter()
                pred = SKKMeans(cfg.cluster.k, n_init=restarts, random_state=seed).fit_predict(x)
                peer = {"bench": "quality", "data": dataset, "impl": "kmeans_pixels", "config": "scikit-learn",
                        "seed": seed, "restarts": restarts, "acc": clustering_accuracy(y, pred),
                        "nmi": normalized_mutual_info_score(y, pred), "ari": adjusted_rand_score(y, pred),
                        "seconds": time.perf_counter() - t0}
                peer_file.write_text(json.dumps(peer))
            print(json.dumps(peer), flush=True)
            rows.setdefault(dataset, []).append(peer)
            peers_done.add((dataset, seed))
        key = json.dumps([cfg.data.model_dump(mode="json"), model_args(cfg), cfg.train.model_dump(mode="json"),
                          cfg.seed], sort_keys=True)
        base = None if args.no_share else trained.get(key)
        out = runs_root / (f"{Path(name).stem}-{seed}" + (f"-{kind}" if kind else ""))
        earlier = _finished_run(out, cfg)
        if earlier is not None:  # finished in an earlier invocation with the same --runs
            seconds, stage_seconds, metrics = earlier
        else:
            t0 = time.perf_counter()
            result = run_pipeline(cfg, out, pretrained=base[0] if base else None)
            seconds, stage_seconds, metrics = time.perf_counter() - t0, result.seconds, result.metrics
        if base is None:
            trained.setdefault(key, (out, name, stage_seconds["train"]))
        line = {"bench": "quality", "data": dataset, "impl": _steps(cfg), "config": label, "seed": seed,
                "epochs": _epochs(out, cfg), "workers": cfg.train.num_workers,
                # A shared pretraining counts in full against every method that uses it.
                "seconds": seconds + (base[2] if base else 0.0), "pretrained_by": base[1] if base else None,
                "stage_seconds": stage_seconds, **{k: metrics[k] for k in ("acc", "nmi", "ari")},
                **({"read_back": True} if earlier is not None else {})}
        print(json.dumps(line), flush=True)
        rows.setdefault(dataset, []).append(line)

    if not args.runs:
        shutil.rmtree(runs_root, ignore_errors=True)
    if args.record:
        _record_all(rows, args)


def _epochs(out: Path, cfg) -> int:
    """The epochs the run's model trained (its train manifest: what `train.steps` came to over these rows)."""
    from engine.data import read_manifest
    from engine.errors import EngineError

    try:
        return int(read_manifest(out / "model", stage="train")["epochs"])
    except (EngineError, KeyError):
        return cfg.train.epochs


def _finished_run(out: Path, cfg) -> tuple[float, dict, dict] | None:
    """(wall seconds, stage seconds, metrics) of a run of exactly this config that finished in `out`; else None.

    A run without its finish time (or begun again after it) or metrics, or of another config, is run again (and
    overwritten). The config saved in the run is read with today's schema and compared by its hash (of the settings
    that differ from their defaults), so a setting added since with its default does not count as another config.
    """
    from engine.config import load_config
    from engine.errors import ConfigError

    try:
        run = json.loads((out / "run.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        saved = load_config(out / "config.yaml")
    except (OSError, ValueError, ConfigError):
        return None
    if not run.get("finished", 0) > run.get("started", 0) or saved.hash() != cfg.hash():
        return None
    return run["finished"] - run["started"], run["seconds"], metrics


def generalisation_table(rows: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]] | None:
    """Issue 26 item 3's table from the result lines of every data set (`rows`: data set -> lines): one row per
    recipe (its config, perturbations and variants together), one column per input it ran on (the data set, with
    the perturbation after it), each cell the mean ACC (± std over the seeds, and how many), and the largest loss of
    mean ACC, in points, from the recipe's own input to a perturbed or varied copy of it. None when no line ran on a
    perturbed or varied input."""
    cells: dict[str, dict[str, list[float]]] = {}
    columns: dict[str, None] = {}
    own: dict[str, str] = {}  # recipe -> the input it ran on as is
    for dataset, lines in rows.items():
        for line in lines:
            recipe, _, kind = line["config"].partition(" [")  # "name [kind]"
            recipe = "k-means on the pixels" if line["impl"] == "kmeans_pixels" else f"`{recipe}`"
            # A perturbation keeps the data set's name (kind keeps its "]"); a variant is a data set of its own.
            column = dataset + (f" [{kind}" if kind.removesuffix("]") in PERTURBATIONS else "")
            if not kind and not any(dataset.endswith(f"-{v}") for v in VARIANTS):
                own.setdefault(recipe, dataset)
            columns[column] = None
            cells.setdefault(recipe, {}).setdefault(column, []).append(float(line["acc"]))
    if len(columns) == len(set(own.values())):
        return None

    def cell(accs: list[float] | None) -> str:
        if not accs:
            return "-"
        return f"{np.mean(accs):.3f}" + (f" ± {np.std(accs):.3f} ({len(accs)})" if len(accs) > 1 else " (1)")

    table = []
    for recipe, by_column in cells.items():
        base = by_column.get(own.get(recipe, ""))
        made_from = {f"{own.get(recipe)} [{kind}]" for kind in PERTURBATIONS} | {
            f"{own.get(recipe)}-{variant}" for variant in VARIANTS}
        drops = [100 * (np.mean(base) - np.mean(accs)) for column, accs in by_column.items()
                 if base and column in made_from]
        table.append([recipe, *(cell(by_column.get(c)) for c in columns),
                      f"{max(drops):+.1f}" if drops else "-"])
    return ["recipe", *columns, "largest ACC loss (points)"], table


def _record_all(rows: dict[str, list[dict]], args) -> None:
    """One table per data set, then the generalisation table when there are perturbed or varied inputs."""
    for dataset, lines in rows.items():
        _record(dataset, lines, args)
    made = generalisation_table(rows)
    if made is None:
        return
    header, table = made
    append_section("Generalisation of the recipes (`benchmarks/quality.py`, issue 26 item 3)", header, table,
                   notes="Each recipe unchanged but for its input: its own data set, a perturbed copy ([float16], "
                         "[drop1]) or a data set made from it (-invert, -rescale16, -rotate90, -heldout: see "
                         "benchmarks/quality.py VARIANTS). Mean ACC ± std (seeds); the last column is the recipe's "
                         "largest loss of mean ACC from its own input to another made from it (negative: a gain). "
                         "Overrides: " + (" ".join(args.overrides) or "none") + ".")


def _record(dataset: str, lines: list[dict], args) -> None:
    def stat(group: list[dict], key: str) -> str:
        v = np.array([r[key] for r in group])
        return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    table = []
    for config in dict.fromkeys(r["config"] for r in lines):
        group = [r for r in lines if r["config"] == config]
        impl = group[0]["impl"].removesuffix(" (augmented)")
        restarts = f", {group[0]['restarts']} restarts" if "restarts" in group[0] else ""
        label = (f"k-means on the pixels (scikit-learn{restarts})" if impl == "kmeans_pixels"
                 else f"`{config}`: {group[0]['impl']}")
        seconds = [r["seconds"] for r in group]
        table.append([label, stat(group, "acc"), " / ".join(f"{r['acc']:.3f}" for r in group), stat(group, "nmi"),
                      stat(group, "ari"), group[0].get("epochs", "-"), f"{np.mean(seconds):.0f} / {max(seconds):.0f}",
                      PUBLISHED_ACC.get(dataset, {}).get(impl, "-")])
    seeds = sorted({r["seed"] for r in lines})
    append_section(f"Clustering quality on {dataset} (`benchmarks/quality.py`), seeds {seeds[0]}..{seeds[-1]}",
                   ["method", "ACC", "ACC per seed", "NMI", "ARI", "epochs", "seconds per seed (mean / max)",
                    "published ACC"], table,
                   notes="Seconds are a whole `dce run`: Ray Train start-up, training, embedding and clustering "
                         "through Ray Data, evaluation and the report; one Ray session for the whole benchmark. "
                         + ("" if args.no_share else "Configs with the same train stage trained once per seed; "
                            "the others started from that model and their seconds include its train stage. ")
                         + "Overrides: " + (" ".join(args.overrides) or "none") + ".")


if __name__ == "__main__":
    main()
