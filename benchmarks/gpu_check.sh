#!/usr/bin/env bash
# The GPU check of issue #19, in one go, on one GPU machine without network (one H200, 16 cores), in at most
# about 9 minutes of wall time. Run from the repository root:
#
#     python benchmarks/pack_gpu_data.py          # beforehand, where ../shared/data is: fills .gpudata/ (57 MiB)
#     OUT=/some/folder PYTHONPATH=. bash benchmarks/gpu_check.sh
#
# What it does (each part under its own `timeout`, everything inside GPU_CHECK_TOTAL seconds, default 525):
#   (a) the fashion-gpu grid of benchmarks/reproduce.py: 1-, 4- and 10-LruNet-1x on all of Fashion-MNIST,
#       --recipe fast, 30 epochs, seeds 0 and 1: six runs as six processes on the one GPU (--jobs 6);
#   (b) at the same time, 14-LruNet-1x on the CIFAR-10 subset with --compile and bf16 autocast for 15 epochs,
#       whose log lines give images/s (measured beside the grid) and test accuracy per epoch;
#   (c) at the same time, a tiny run under `torchrun --nproc_per_node 1`: the DDP code path starts and trains.
# What comes back in $OUT (7 files at most, none deeper than $OUT/results/):
#   summary.txt                  what ran, for how long, exit codes, per-run status (epochs, accuracy), the
#                                CIFAR and DDP epoch lines, GPU utilisation samples
#   results/fashion-gpu.jsonl    one line per finished grid run (reproduce.py's format)
#   results/fashion-gpu.md       the grid's table; results/fashion-gpu_acc_vs_{n,params}.png its plots
#   logs.tar.gz                  every log (one per grid run, CIFAR, DDP), every run's config.json,
#                                metrics.jsonl (one line per epoch) and final.json; no checkpoints
#   unfinished_runs.tar          only when grid runs were stopped by the time cap: their last.pt, config.json and
#                                metrics.jsonl, to put back in .gpurun/ and resume (see docs/training.md)
# Runs that did not finish still have their per-epoch lines (epoch, test accuracy, elapsed time) in the logs.
#
# Knobs (environment): GPU_CHECK_TOTAL (seconds for everything, default 525), GPU_CHECK_GRID_CAP (the grid's
# cap, default 450), GPU_CHECK_CIFAR_CAP (default 300), GPU_CHECK_FRESH=1 (delete the grid's run directories
# that an earlier call left on a warm machine instead of resuming them), GPU_CHECK_GRID_N (N values of the grid, default 1,4,10), GPU_CHECK_JOBS (default 6),
# GPU_CHECK_GRID_EXTRA (more reproduce.py options, e.g. "--epochs 20"),
# GPUDATA (default .gpudata), GPU_CHECK_WORK (run directories, default .gpurun), PYTHON (default python3).
# GPU_CHECK_CPU=1: the same logic on a CPU with tiny settings (1 epoch of 512 images, quarter width, no
# --compile unless GPU_CHECK_COMPILE=1), to check the script itself where there is no GPU.
set -u -o pipefail

: "${OUT:?set OUT to the folder whose files come back}"
PYTHON=${PYTHON:-python3}
DATA=${GPUDATA:-.gpudata}
WORK=${GPU_CHECK_WORK:-.gpurun}
CPU=${GPU_CHECK_CPU:-0}
TOTAL=${GPU_CHECK_TOTAL:-525}
GRID_CAP=${GPU_CHECK_GRID_CAP:-450}
GRID_N=${GPU_CHECK_GRID_N:-1,4,10}
JOBS=${GPU_CHECK_JOBS:-6}
CIFAR_CAP=${GPU_CHECK_CIFAR_CAP:-300}
export PYTHONPATH=${PYTHONPATH:-.}
export PYTHONUNBUFFERED=1

START=$SECONDS
mkdir -p "$OUT/results" "$WORK/logs"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$SUMMARY"; }
left() { echo $((TOTAL - (SECONDS - START))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

if [ "$CPU" = 1 ]; then
    DEVICE=cpu
    GRID_EXTRA=(--subset 512 --test-subset 256 --epochs 1 --width 0.25 --reuse-values 1,2 --seeds 0 --threads 1)
    JOBS=2
    CIFAR_EXTRA=(--subset 256 --test-subset 256 --reuse 2 --width 0.25 --epochs 1)
    [ "${GPU_CHECK_COMPILE:-0}" = 1 ] && CIFAR_EXTRA+=(--compile)
    DDP_EXTRA=(--subset 256 --test-subset 256 --width 0.25)
    export OMP_NUM_THREADS=1
else
    DEVICE=cuda
    GRID_EXTRA=(--reuse-values "$GRID_N" --threads 2)
    CIFAR_EXTRA=(--reuse 14 --width 1 --epochs 15 --compile)
    DDP_EXTRA=(--subset 4096 --test-subset 2000 --width 0.5)
fi
# shellcheck disable=SC2206  # GPU_CHECK_GRID_EXTRA: more options for the grid, split on spaces (e.g. "--epochs 20")
GRID_EXTRA+=(${GPU_CHECK_GRID_EXTRA:-})
GRID=(benchmarks/reproduce.py --preset fashion-gpu --data-dir "$DATA/fashion_mnist" --device "$DEVICE"
    --results-dir "$OUT/results" --runs-dir "$WORK/fashion-gpu" "${GRID_EXTRA[@]}")

say "start: device $DEVICE, total cap ${TOTAL}s, grid cap ${GRID_CAP}s, jobs $JOBS, data $DATA, runs $WORK, out $OUT"
say "git: $(git log -1 --format='%h %s' 2>/dev/null || echo 'no git')"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available(), "| cores", os.cpu_count())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
for f in fashion_mnist/train.npz fashion_mnist/test.npz cifar10_subset/train.npz cifar10_subset/test.npz; do
    if [ ! -f "$DATA/$f" ]; then
        say "ERROR: $DATA/$f is missing: run 'python benchmarks/pack_gpu_data.py' where the shared data are, and carry .gpudata"
        exit 2
    fi
done
rm -rf "$WORK/ddp1" "$WORK/cifar14"  # checks, not results: a warm machine may hold an earlier call's
if [ "${GPU_CHECK_FRESH:-0}" = 1 ]; then
    rm -rf "$WORK/fashion-gpu"  # else the grid resumes the run directories an earlier call left on a warm machine
fi

# GPU utilisation every 10 s while the grid runs (when nvidia-smi is there).
UTIL_PID=
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L >>"$SUMMARY" 2>&1
    (while true; do
        echo "+$((SECONDS - START))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>&1)"
        sleep 10
    done) >"$WORK/logs/gpu_util.log" 2>&1 &
    UTIL_PID=$!
fi

# All three parts start at once: the grid gets the most time its cap allows; the CIFAR run's compilation (CPU
# work, on 4 threads) and the tiny DDP run overlap it. The CIFAR run's images/s are therefore measured beside the
# grid's six processes on the same GPU (a lower bound).
GRID_CAP=$(min "$GRID_CAP" $(($(left) - 60)))
say "(a) grid: timeout ${GRID_CAP}s: $PYTHON ${GRID[*]} --jobs $JOBS"
timeout -k 15 "$GRID_CAP" "$PYTHON" "${GRID[@]}" --jobs "$JOBS" --poll 2 </dev/null >"$WORK/logs/grid.log" 2>&1 &
GRID_PID=$!

CIFAR_CAP=$(min "$CIFAR_CAP" $(($(left) - 60)))
say "(b) CIFAR-10 subset, 14-LruNet-1x, --compile, bf16 autocast, beside the grid: timeout ${CIFAR_CAP}s"
TORCHINDUCTOR_COMPILE_THREADS=4 OMP_NUM_THREADS=2 timeout -k 10 "$CIFAR_CAP" "$PYTHON" examples/lrunet_cifar.py \
    --dataset cifar10 --data-dir "$DATA/cifar10_subset" --recipe fast --device "$DEVICE" --no-progress \
    --out "$WORK/cifar14" "${CIFAR_EXTRA[@]}" </dev/null >"$WORK/logs/cifar14.log" 2>&1 &
CIFAR_PID=$!

DDP_CAP=$(min 150 $(($(left) - 60)))
say "(c) DDP, torchrun --nproc_per_node 1, beside the grid: timeout ${DDP_CAP}s"
OMP_NUM_THREADS=2 timeout -k 10 "$DDP_CAP" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 \
    examples/lrunet_cifar.py --dataset fashion-mnist --data-dir "$DATA/fashion_mnist" --reuse 2 --epochs 1 \
    --recipe fast --batch-size 256 --device "$DEVICE" --no-progress --out "$WORK/ddp1" "${DDP_EXTRA[@]}" \
    </dev/null >"$WORK/logs/ddp1.log" 2>&1
DDP_RC=$?
say "(c) DDP exit $DDP_RC (0: fine; 124 or 137: stopped by its cap)"
grep -E '^(epoch |\{|lrunet_cifar.py: error)|Error' "$WORK/logs/ddp1.log" | cut -c1-400 | tail -n 5 | tee -a "$SUMMARY"

wait "$CIFAR_PID"
CIFAR_RC=$?
say "(b) CIFAR exit $CIFAR_RC (0: fine; 124 or 137: stopped by its cap; its epoch lines below: epoch 1 includes compiling)"
grep -E '^(14-|2-|epoch |\{|lrunet_cifar.py: error)|Error' "$WORK/logs/cifar14.log" | cut -c1-400 | tail -n 20 \
    | tee -a "$SUMMARY"

wait "$GRID_PID"
GRID_RC=$?
say "(a) grid exit $GRID_RC (0: all runs finished; 124 or 137: stopped by the cap, unfinished runs keep their epochs)"
[ -n "$UTIL_PID" ] && kill "$UTIL_PID" 2>/dev/null
tail -n 12 "$WORK/logs/grid.log" | cut -c1-400 | tee -a "$SUMMARY"
"$PYTHON" "${GRID[@]}" --status 2>&1 | tee -a "$SUMMARY"

# What comes back: logs and per-epoch metrics (no checkpoints), and the unfinished runs' checkpoints.
echo "--- GPU utilisation (utilization.gpu, memory.used) every 10 s during the grid" >>"$SUMMARY"
[ -f "$WORK/logs/gpu_util.log" ] && cat "$WORK/logs/gpu_util.log" >>"$SUMMARY"
rm -f "$OUT/results/"*.lock
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='*.png' --exclude='.*.tmp' . 2>>"$SUMMARY"
UNFINISHED=()
for run in "$WORK"/fashion-gpu/*/; do
    [ -f "$run/last.pt" ] && [ ! -f "$run/final.json" ] && UNFINISHED+=("fashion-gpu/$(basename "$run")")
done
if [ "${#UNFINISHED[@]}" -gt 0 ]; then
    FILES=()
    for run in "${UNFINISHED[@]}"; do FILES+=("$run/last.pt" "$run/config.json" "$run/metrics.jsonl"); done
    tar -cf "$OUT/unfinished_runs.tar" -C "$WORK" "${FILES[@]}" 2>>"$SUMMARY"
    SIZE=$(stat -c %s "$OUT/unfinished_runs.tar" 2>/dev/null || echo 0)
    if [ "$SIZE" -gt $((16 * 1024 * 1024 - 4096)) ]; then
        rm -f "$OUT/unfinished_runs.tar"
        say "unfinished runs: ${UNFINISHED[*]}; their checkpoints ($SIZE bytes) are over 16 MiB, not returned"
    else
        say "unfinished runs: ${UNFINISHED[*]}; checkpoints in unfinished_runs.tar ($SIZE bytes)"
    fi
fi
if [ "$GRID_RC" = 0 ] && [ "$CIFAR_RC" = 0 ] && [ "$DDP_RC" = 0 ]; then
    say "ALL PARTS FINISHED (grid, CIFAR, DDP: exit 0)"
else
    say "NOT ALL PARTS FINISHED: grid exit $GRID_RC, CIFAR exit $CIFAR_RC, DDP exit $DDP_RC (see above and logs.tar.gz)"
fi
say "done in $((SECONDS - START))s; files in $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
