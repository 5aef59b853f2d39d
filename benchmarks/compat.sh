#!/usr/bin/env bash
# The CPU suite under another torch release (the GPU machine's: torch 2.11.0, torchvision 0.26.0,
# triton 3.6.0), without touching the main checkout's venv or its built resnet_fast/_C*.so.
#
#   bash benchmarks/compat.sh 2.11.0 [PYTEST_ARGS...]
#
# Makes (or reuses) a venv in $COMPAT_DIR (default /tmp/rf-compat-<torch>), installs the pinned
# releases with pip, copies the working tree (tracked + untracked, non-ignored files) into
# $COMPAT_DIR/src, builds the extension there (CPU sources only) and runs `python -m pytest` there:
# interpreter and sm_90 ahead-of-time Triton tests included. Exit status: pytest's (or the failing step's).
# Environment: COMPAT_DIR, PYTHON (default python3), TORCHVISION and TRITON (versions paired with a
# torch release not in the table below).
set -euo pipefail

TORCH=${1:?usage: bash benchmarks/compat.sh TORCH_VERSION [PYTEST_ARGS...]  (e.g. 2.11.0)}
shift
case $TORCH in
    2.11.0) TV_DEFAULT=0.26.0 TRITON_DEFAULT=3.6.0 ;;
    *) TV_DEFAULT="" TRITON_DEFAULT="" ;;
esac
TORCHVISION=${TORCHVISION:-$TV_DEFAULT}
TRITON=${TRITON:-$TRITON_DEFAULT}
if [ -z "$TORCHVISION" ] || [ -z "$TRITON" ]; then
    echo "compat.sh: no known torchvision/triton for torch $TORCH: set TORCHVISION= and TRITON=" >&2
    exit 2
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${COMPAT_DIR:-/tmp/rf-compat-$TORCH}
VENV=$DIR/venv
SRC=$DIR/src
mkdir -p "$DIR"
START=$(date +%s)
stamp() { echo "compat.sh [$(($(date +%s) - START)) s] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    stamp "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY=$VENV/bin/python
export PATH="$VENV/bin:$PATH" # tests run the `resnet-fast` command
# The copy has no ../shared beside it: point the MNIST tests at the checkout's.
if [ -z "${RESNET_FAST_MNIST_DIR:-}" ] && [ -d "$REPO/../shared/data/mnist" ]; then
    export RESNET_FAST_MNIST_DIR=$(cd "$REPO/../shared/data/mnist" && pwd)
fi
# The machine's pip cap (/etc/xdg/pip) allows these older releases; pip skips what is already there.
stamp "installing torch==$TORCH torchvision==$TORCHVISION triton==$TRITON"
"$PY" -m pip install -q "torch==$TORCH" "torchvision==$TORCHVISION" "triton==$TRITON" \
    numpy tqdm ninja pybind11 setuptools wheel pytest pytest-benchmark hypothesis
"$PY" -c 'import torch, torchvision, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "triton", triton.__version__)'

# A copy of the working tree, so the build never overwrites the checkout's resnet_fast/_C*.so. The
# copy's build/ folder is kept between runs: ninja then recompiles only the sources that changed.
stamp "copying the working tree into $SRC"
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
(
    cd "$REPO"
    git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        [ -f "$f" ] && printf '%s\0' "$f" # files deleted but still tracked are left out
    done | tar --null -T - -cf -
) | tar -xf - -C "$SRC"

stamp "building the extension (CPU sources)"
cd "$SRC"
# The editable install without the extension (fast: metadata and the resnet-fast command), then the
# extension in place with build_ext, whose build/ folder (unlike pip's temporary one) ninja reuses.
{
    RESNET_FAST_SKIP_EXT=1 "$PY" -m pip install --no-deps --no-build-isolation -e . &&
        RESNET_FAST_SKIP_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace
} > "$DIR/build.log" 2>&1 || {
    tail -40 "$DIR/build.log"
    stamp "build failed (log: $DIR/build.log)"
    exit 1
}
"$PY" -c 'import resnet_fast._C as c; print("resnet_fast._C:", c.__file__)'

stamp "running the CPU suite"
set +e
"$PY" -m pytest -q -p no:cacheprovider --junitxml="$DIR/pytest.xml" "$@"
rc=$?
stamp "pytest exit status $rc (junit: $DIR/pytest.xml)"
exit $rc
