#!/usr/bin/env bash
# The one GPU check: on a machine with an NVIDIA GPU, cold, in at most 8 minutes, install resnet_fast and
# measure what matters, most valuable first:
#   install (CUDA sources for this GPU's arch only) and `resnet-fast info`; ResNet-50 `validate` eval and
#   train in bf16 and fp16; inference bench at batch 64 and 256 in bf16 and fp16 (resnet_fast eager and
#   CUDA graph, torchvision channels_last; then torch.compile default); the AMP training bench at batch 256
#   (benchmarks/gpu_train.py); the gpu-marked tests with what is left; max-autotune only if time remains.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh OUT_DIR   # dry run of the same steps, tiny sizes, no GPU
#
# OUT_DIR receives three files: summary.json (every verdict and figure, machine and versions),
# summary.txt (the same, readable) and results.tar.gz (every log, JSON and plot). Work files live in a
# temporary folder; nothing is written into the repository tree besides the editable install's build.
# Every step has a time limit and the limits add up to BUDGET_S; a step that fails does not stop the
# others; the exit status is 0 only when every step's verdict (benchmarks/gpu_check_summary.py) passes.
#
# Environment: BUDGET_S (seconds for all steps; default 460 on a GPU, 170 for the dry run), PYTHON
# (default python3, else python), SKIP_INSTALL=1 (already installed), KEEP_WORK=1 (keep the temp folder).
set -u

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
START=$(date +%s)

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
[ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$W"' EXIT
cd "$W" || exit 2 # the steps run here: stray files (caches, .hypothesis) stay out of the repository

if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: $PYTHON's torch sees no CUDA GPU (DEVICE=cpu QUICK=1 only dry-runs this script)" |
        tee "$OUT/summary.txt" >&2
    exit 2
fi

# Sizes and step limits (seconds). The fixed limits add up to (at most) BUDGET_S; each is clipped to what
# is left of it. The pytest step then gets whatever the others left, max-autotune what pytest left.
if [ "$DEVICE" = cuda ]; then
    ARCH=resnet50 IMG=224 VBATCH=16 BATCHES="64 256" TBATCH=256 ITERS=30 WARMUP=3
    DTYPES="bfloat16 float16" CONTENDERS=resnet_fast,resnet_fast-cudagraph,torchvision-cl
    BUDGET_S=${BUDGET_S:-460}
    L_INSTALL=150 L_INFO=20 L_VALIDATE=100 L_INFER=40 L_TRAIN=40 L_COMPILE=35
else
    # One dtype (float16 is refused on CPU): each process mostly imports torch, and CI has 2 cores.
    ARCH=resnet18 IMG=32 VBATCH=2 BATCHES="2 4" TBATCH=4 ITERS=2 WARMUP=1
    DTYPES="bfloat16" CONTENDERS=resnet_fast,torchvision-cl
    BUDGET_S=${BUDGET_S:-170}
    L_INSTALL=0 L_INFO=25 L_VALIDATE=50 L_INFER=25 L_TRAIN=30 L_COMPILE=25
    # Inductor's C++ compiles take minutes on 2 cores: the dry run checks the plumbing, not the compiler
    # (and starts no pool of compile workers). One thread per process: the steps run side by side, and
    # tiny shapes gain nothing from more.
    export TORCH_COMPILE_DISABLE=1 TORCHINDUCTOR_COMPILE_THREADS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
if [ "$QUICK" != 1 ] && [ "$DEVICE" != cuda ]; then
    echo "gpu_check: DEVICE=$DEVICE needs QUICK=1 (a dry run)" >&2
    exit 2
fi
# RESNET_FAST_NO_JIT: the check measures the installed build; a build on first use would hide a failed
# install (and cost every step minutes).
export PYTHONUNBUFFERED=1 RESNET_FAST_CACHE=$W/cache RESNET_FAST_NO_JIT=1
RF=("$PYTHON" -m resnet_fast)
BENCH=("${RF[@]}" bench --arch "$ARCH" --device "$DEVICE" --image-size "$IMG" --no-progress)
PLOT=0
"$PYTHON" -c 'import matplotlib' 2> /dev/null && PLOT=1

# step NAME LIMIT COMMAND...: run COMMAND under `timeout` (clipped to what is left of BUDGET_S), log to
# NAME.log, and append "name status rc seconds limit" to steps.tsv. STEP_SIGNAL picks the signal.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        skip "$name" "no time left"
        return
    fi
    local t0 rc status
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" >> "$W/commands.txt"
    timeout -s "${STEP_SIGNAL:-TERM}" -k 10 "$limit" "$@" > "$W/$name.log" 2>&1 < /dev/null
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=fail ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$limit" >> "$W/steps.tsv"
    echo "gpu_check: $name $status ($(($(date +%s) - t0)) s, limit $limit s)"
}
# skip NAME WHY: record a step that does not run.
skip() {
    printf '%s\tskipped\t\t0\t0\t%s\n' "$1" "$2" >> "$W/steps.tsv"
    echo "gpu_check: $1 skipped ($2)"
}

echo "gpu_check: $DEVICE, budget ${BUDGET_S}s, work folder $W, results to $OUT"
printf 'device\t%s\nquick\t%s\nbudget_s\t%s\npython\t%s\narch\t%s\n' \
    "$DEVICE" "$QUICK" "$BUDGET_S" "$PYTHON" "$ARCH" > "$W/run.tsv"

# 1. Build. The CUDA sources for this GPU's arch only, on every core.
if [ "$DEVICE" != cuda ]; then
    skip install "dry run: the installed build is used (a rebuild would replace the running venv's _C)"
elif [ "${SKIP_INSTALL:-0}" = 1 ]; then
    skip install "SKIP_INSTALL=1"
else
    CC_ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    step install "$L_INSTALL" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$CC_ARCH" MAX_JOBS="$(nproc)" \
        PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install -v --no-deps --no-build-isolation -e "$REPO"
fi
step info "$L_INFO" sh -c '"$@" > info.json' sh "${RF[@]}" info --json

# 2. Numerics, in parallel (each is bound by compiling kernels, not by the GPU), with torch.compile's
# cache warmed beside them for the compile steps below. Their per-layer choices go to a separate cache:
# measured under this contention, they must not serve the benchmarks.
for dtype in $DTYPES; do
    for mode in eval train; do
        RESNET_FAST_CACHE=$W/cache-validate step "validate-$dtype-$mode" "$L_VALIDATE" \
            "${RF[@]}" validate --arch "$ARCH" --device "$DEVICE" --dtype "$dtype" --mode "$mode" \
            --per-layer --batch-size "$VBATCH" --image-size "$IMG" --json "validate-$dtype-$mode.json" &
    done
    if [ "$DEVICE" = cuda ]; then
        # shellcheck disable=SC2086  # BATCHES is a list of numbers
        RESNET_FAST_CACHE=$W/cache-validate TORCHINDUCTOR_COMPILE_THREADS=4 step "compile-warmup-$dtype" \
            "$L_VALIDATE" "${BENCH[@]}" --dtype "$dtype" --batch-size $BATCHES --iters 1 --warmup 1 \
            --contenders compile &
    else
        skip "compile-warmup-$dtype" "dry run: torch.compile is disabled"
    fi
done
wait

# 3. Inference: resnet_fast eager and CUDA graph against torchvision channels_last, one process per dtype.
for dtype in $DTYPES; do
    plot=()
    [ "$PLOT" = 1 ] && plot=(--plot "infer-$dtype.png")
    # shellcheck disable=SC2086
    step "infer-$dtype" "$L_INFER" "${BENCH[@]}" --dtype "$dtype" --batch-size $BATCHES --iters "$ITERS" \
        --warmup "$WARMUP" --contenders "$CONTENDERS" --keep-going --json "infer-$dtype.json" "${plot[@]}"
done

# 4. Training: one AMP bf16 step at batch 256, speed and peak memory against torchvision channels_last.
step train-bfloat16 "$L_TRAIN" "$PYTHON" "$REPO/benchmarks/gpu_train.py" --device "$DEVICE" --arch "$ARCH" \
    --batch "$TBATCH" --size "$IMG" --rounds "$((ITERS / 2 + 1))" --warmup "$WARMUP" --out train-bfloat16.json

# 5. torch.compile (default mode) of torchvision, its cache warmed in step 2; torchvision-cl anchors
# these figures to the inference steps'.
for dtype in $DTYPES; do
    # shellcheck disable=SC2086
    step "compile-$dtype" "$L_COMPILE" "${BENCH[@]}" --dtype "$dtype" --batch-size $BATCHES --iters "$ITERS" \
        --warmup "$WARMUP" --contenders torchvision-cl,compile --json "compile-$dtype.json"
done

# 6. The gpu-marked tests with what is left, collected from the files that have some (importing every
# test module costs time). SIGINT at the limit: pytest still writes its summary and XML.
mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' 'mark\.gpu' "$REPO/tests" | sort)
[ "${#GPU_TESTS[@]}" -gt 0 ] || GPU_TESTS=("$REPO/tests")
STEP_SIGNAL=INT step pytest-gpu "$BUDGET_S" "$PYTHON" -m pytest -m gpu -v -p no:cacheprovider \
    --rootdir "$REPO" -c "$REPO/pyproject.toml" --continue-on-collection-errors --junitxml=pytest-gpu.xml \
    "${GPU_TESTS[@]}"

# 7. max-autotune only if a cold compile of it can fit (on a GPU: at least 2 minutes).
left=$((BUDGET_S - ($(date +%s) - START)))
need=120
[ "$DEVICE" = cuda ] || need=20
if [ "$left" -ge "$need" ]; then
    step max-autotune-bfloat16 "$left" "${BENCH[@]}" --dtype bfloat16 --batch-size "${BATCHES%% *}" --iters "$ITERS" \
        --warmup "$WARMUP" --contenders torchvision-cl,compile-max-autotune --json max-autotune-bfloat16.json
else
    skip max-autotune-bfloat16 "only ${left}s left (needs ${need}s)"
fi

# Verdicts, figures and the result files.
printf 'elapsed_s\t%s\n' "$(($(date +%s) - START))" >> "$W/run.tsv"
"$PYTHON" "$REPO/benchmarks/gpu_check_summary.py" "$W" > summary.log 2>&1
rc=$?
[ -f summary.txt ] || { echo "gpu_check: the summary failed:"; cat summary.log; } > summary.txt
cp summary.txt "$OUT/summary.txt"
[ -f summary.json ] && cp summary.json "$OUT/summary.json"
tar -czf "$OUT/results.tar.gz" --exclude=./cache --exclude=./cache-validate -C "$W" .
cat "$OUT/summary.txt"
echo "gpu_check: $(($(date +%s) - START)) s; files in $OUT"
exit $rc
