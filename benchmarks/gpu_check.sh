#!/usr/bin/env bash
# The GPU check of issue 22 (benchmarks/gpu.py) on a lent H200: prepare here, one device call, record here.
#
# 1. Here, in the checkout the session was started in (the device tool sends that one):
#        bash benchmarks/gpu_check.sh prepare
#    It fills .gpu-check/ (made ignored through .git/info/exclude, ~12 MB): wheels/ holds flash-kmeans 0.3.1
#    and fastkmeans 0.5.0 (pure Python, 56 KB; the H200's image has torch 2.11, triton, numpy, tqdm, pyyaml,
#    scikit-learn; gpu.py imports no ray, faiss or pydantic, so none of them travels) and mnist/ the four idx
#    files of MNIST (11 MB; without them gpu.py trains on synthetic digits and says so).
# 2. The device tool's run, with exactly:
#        command:   bash benchmarks/gpu_check.sh device
#        carry:     [".gpu-check"]
#        timeout_s: 480
#    Expected device time: 1-2 minutes to start the machine, then about 6.5 minutes of script: k-means
#    case (b) then (a) (every implementation also runs once on a slice first, to compile), the fused kernel
#    check and block sweep, the autoencoder's epochs, and ClusterGAN until 360 s after the start (at most 240 s
#    of it; it starts no epoch that would end later); inertia and ACC after. About 9 minutes in all, which
#    leaves no second machine start in a 15-minute lease: give the machine back after the call.
#    Every line is flushed to $OUT/gpu.jsonl as it is measured, so a run stopped at its limit still returns
#    what it measured.
# 3. Here, after the call (the reply's files_at holds gpu.jsonl, gpu.log and nvidia-smi.csv):
#        python benchmarks/gpu.py --replay <files_at>/gpu.jsonl    # appends the tables to benchmarks/RESULTS.md
# Rehearsal on a CPU: `OUT=$(mktemp -d) bash benchmarks/gpu_check.sh device --tiny` (extra arguments go to gpu.py).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.gpu-check/' "$exclude" 2>/dev/null || echo '/.gpu-check/' >>"$exclude"
    mkdir -p .gpu-check/wheels .gpu-check/mnist
    python -m pip download -q --no-deps -d .gpu-check/wheels flash-kmeans==0.3.1 fastkmeans==0.5.0
    cp -f "${MNIST:-../shared/data/mnist}"/*-ubyte.gz .gpu-check/mnist/
    git status --short --ignored .gpu-check | head -3
    du -sh .gpu-check
    ;;
device)
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
        >"$OUT/nvidia-smi.csv" 2>&1 || true
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu-check/wheels/*.whl
    export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
    # The full lines go to $OUT; the reply's tail shows their start.
    python3 benchmarks/gpu.py --data .gpu-check/mnist --deadline 360 --out "$OUT/gpu.jsonl" "${@:2}" \
        2>"$OUT/gpu.log" | cut -c1-330
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh prepare|device (see the comment at the top)" >&2
    exit 2
    ;;
esac
