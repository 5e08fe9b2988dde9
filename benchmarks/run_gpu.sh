#!/usr/bin/env bash
# The LONG campaign on a GPU machine you hold: build the CUDA extension there, run the whole test suite
# with CUDA, run every benchmark suite, and write everything to the folder given.
#
#   benchmarks/run_gpu.sh OUT_DIR [WHEEL_DIR]
#
# Duration, estimated for an H200 with 16 cores: 8.5 to 13 minutes (build 1-1.5, the full test suite
# 3-5, benchmarks/run.py 4-6.5; never measured). That is more than one command on the
# lent device machine (10 minutes) and more than its whole budget (15 minutes, start included): there,
# run benchmarks/gpu_first.sh instead (one command, at most 8 minutes, every step under its own timeout).
# A failing benchmark does not stop this script: run.py summarises what finished and lists what failed.
#
# It uses the machine's own python3 (PYTHON=... to choose another) and its torch. Packages that
# machine lacks are installed from WHEEL_DIR (default .whl/, filled here by `make gpu-wheels`)
# without a network. Results in OUT_DIR (8 files at most, so they can be copied back whole):
#   campaign.log                 every step, backend info, timings of the steps
#   tests.txt                    the test suite's output on CUDA
#   <gpu>-<date>.json .md .png   the benchmark results (benchmarks/run.py)
#   <gpu>-<date>-raw.json        pytest-benchmark's own JSON
set -uo pipefail

out=${1:?usage: benchmarks/run_gpu.sh OUT_DIR [WHEEL_DIR]}
wheels=${2:-.whl}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
log="$out/campaign.log"
: >"$log"
note() { echo "[$(date +%T)] $*" | tee -a "$log"; }
step() {   # step NAME CMD...: run, log its tail, keep going, remember failures
    local name=$1 t0=$SECONDS rc
    shift
    note "== $name: $*"
    "$@" >>"$log" 2>&1
    rc=$?
    note "== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || failed+=("$name")
    return $rc
}
failed=()

"$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"' || { note "no CUDA device: stop"; exit 2; }
note "python: $("$py" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())')"
nvidia-smi --query-gpu=name,driver_version,power.draw,power.limit,temperature.gpu,clocks.sm --format=csv >>"$log" 2>&1

missing=$("$py" - <<'EOF'
import importlib.util
need = {"torch_pruning": "torch-pruning", "pytest_benchmark": "pytest-benchmark", "pynvml": "nvidia-ml-py",
        "hypothesis": "hypothesis", "matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn",
        "torchvision": "torchvision", "ninja": "ninja"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    step wheels "$py" -m pip install --no-index --no-deps --find-links "$wheels" $missing \
        || { note "missing packages ($missing) and no wheels for them in $wheels (make gpu-wheels): stop"; exit 2; }
fi

arch=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)}
step build env POLARPRUNE_REQUIRE_EXT=1 "$py" -m pip install --no-index --no-build-isolation --no-deps -e . \
    || { note "the extension did not build: stop"; exit 1; }
"$py" -m polarprune_cuda info >>"$log" 2>&1

step tests bash -c '"$0" -m pytest tests -q -p no:cacheprovider -rs >"$1" 2>&1' "$py" "$out/tests.txt"
tail -n 3 "$out/tests.txt" >>"$log"

step benchmarks "$py" benchmarks/run.py --out "$out" --keep-raw

if [ ${#failed[@]} -gt 0 ]; then
    note "failed steps: ${failed[*]}"
    exit 1
fi
note "all steps passed; results in $out"
