#!/usr/bin/env bash
# The one GPU check: on a machine with an NVIDIA GPU, in under 9 minutes, install resnet_fast, run the
# gpu-marked tests, `resnet-fast validate` for ResNet-50 in float32/float16/bfloat16 x eval/train, and
# the GPU benchmarks (bench CLI; benchmarks/gpu_infer.py when present). Everything lands in one folder,
# benchmarks/results/<gpu-name>-<date>/ (or $1): a log and result files per step, summary.txt at the end.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Needs torch, torchvision, triton, pytest and nvcc; no internet (installs with --no-deps).
# Every step has its own `timeout`, clipped to what is left of BUDGET_S; a failing step does not stop
# the others; the exit status is 0 only when every step passed.
#
# Environment: BUDGET_S (default 520 s: the whole stays under 9 minutes), PYTHON, SKIP_INSTALL=1
# (already installed), DEVICE=cpu with QUICK=1 (smoke-tests this script on a machine without a GPU:
# small shapes, and the pytest step then only shows that the gpu tests skip).
set -u
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET_S=${BUDGET_S:-520}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}

if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: torch sees no CUDA GPU here (set DEVICE=cpu QUICK=1 only to smoke-test this script)" >&2
    exit 2
fi
TAG=$("$PYTHON" - "$DEVICE" <<'PY'
import re, sys, torch
name = torch.cuda.get_device_name(0) if sys.argv[1] == "cuda" else "cpu-smoke"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
PY
)
OUT=${1:-benchmarks/results/${TAG}-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

# step NAME LIMIT_S COMMAND...: run with a timeout, log to $OUT/NAME.log, record status and time.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START) - 5))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 15 ]; then
        printf '%-34s %-12s %5s s\n' "$name" "SKIPPED" "0" | tee -a "$SUMMARY"
        FAILED=1
        return
    fi
    local t0 rc status
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" >> "$OUT/commands.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT" ;;
        *) status="FAIL($rc)" ;;
    esac
    [ "$rc" -eq 0 ] || FAILED=1
    printf '%-34s %-12s %5s s\n' "$name" "$status" "$(($(date +%s) - t0))" | tee -a "$SUMMARY"
}

if [ "$QUICK" = 1 ]; then
    ARCH=resnet18 IMG=64 VBATCH=4 BATCHES="2 4" BATCH=4 ITERS=2 WARMUP=1
else
    ARCH=resnet50 IMG=224 VBATCH=16 BATCHES="16 64 256" BATCH=64 ITERS=20 WARMUP=5
fi
RF=("$PYTHON" -m resnet_fast)
BENCH=("${RF[@]}" bench --arch "$ARCH" --device "$DEVICE" --image-size "$IMG" --iters "$ITERS" --warmup "$WARMUP" --no-progress)
LOWP=float16
[ "$DEVICE" = cpu ] && LOWP=bfloat16  # float16 is refused on CPU
PLOT=()
"$PYTHON" -c 'import matplotlib' 2> /dev/null && PLOT=(--plot "$OUT/bench-infer-$LOWP.png")

echo "gpu_check: results in $OUT (budget ${BUDGET_S}s)"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    step install 240 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
fi
step info 60 "${RF[@]}" info
"${RF[@]}" info --json > "$OUT/info.json" 2> /dev/null
# --continue-on-collection-errors: a test module needing a package this bare machine lacks must not
# hide the gpu tests of the others (its error still fails the step).
step pytest-gpu 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest-gpu.xml"
for dtype in float32 float16 bfloat16; do
    if [ "$DEVICE" = cpu ] && [ "$dtype" = float16 ]; then continue; fi
    for mode in eval train; do
        step "validate-$dtype-$mode" 60 "${RF[@]}" validate --arch "$ARCH" --device "$DEVICE" --dtype "$dtype" \
            --mode "$mode" --per-layer --batch-size "$VBATCH" --image-size "$IMG" --json "$OUT/validate-$dtype-$mode.json"
    done
done
# shellcheck disable=SC2086  # BATCHES is a list of numbers
step "bench-infer-$LOWP" 90 "${BENCH[@]}" --dtype "$LOWP" --batch-size $BATCHES \
    --contenders resnet_fast,torchvision,torchvision-cl --json "$OUT/bench-infer-$LOWP.json" "${PLOT[@]}"
step bench-infer-float32 60 "${BENCH[@]}" --dtype float32 --batch-size "$BATCH" \
    --contenders resnet_fast,torchvision,torchvision-cl --json "$OUT/bench-infer-float32.json"
step "bench-train-$LOWP" 60 "${BENCH[@]}" --dtype "$LOWP" --batch-size "$BATCH" --mode train \
    --contenders resnet_fast,torchvision,torchvision-cl --json "$OUT/bench-train-$LOWP.json"
if [ -f benchmarks/gpu_infer.py ] && [ "$DEVICE" = cuda ]; then
    step gpu_infer 120 env RESNET_FAST_RESULTS="$OUT" "$PYTHON" benchmarks/gpu_infer.py
fi
# Compilation is slow (max-autotune most): last, so it only spends what is left.
step "bench-infer-$LOWP-compile" 120 "${BENCH[@]}" --dtype "$LOWP" --batch-size "$BATCH" \
    --contenders resnet_fast,torchvision-cl,compile --json "$OUT/bench-infer-$LOWP-compile.json"
step "bench-infer-$LOWP-max-autotune" 240 "${BENCH[@]}" --dtype "$LOWP" --batch-size "$BATCH" \
    --contenders resnet_fast,torchvision-cl,compile-max-autotune --json "$OUT/bench-infer-$LOWP-max-autotune.json"

"$PYTHON" benchmarks/render_tables.py "$OUT"/bench-*.json > "$OUT/tables.md" 2>> "$OUT/commands.txt"
echo
echo "gpu_check summary ($(($(date +%s) - START)) s; logs and results in $OUT):"
cat "$SUMMARY"
for f in "$OUT"/validate-*.json; do
    [ -f "$f" ] && "$PYTHON" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(("PASS" if r["ok"] else "FAIL"), r["dtype"], r["mode"], "logits rel err %.3g (bound %.3g)" % (r["errors"]["logits"], r["bounds"]["logits"]), "first diverging:", r["first_diverging_block"])' "$f"
done
exit $FAILED
