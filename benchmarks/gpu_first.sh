#!/usr/bin/env bash
# The first GPU campaign as ONE device command of at most 8 minutes: facts, build, GPU checks and timings,
# the GPU tests, a memory check, a summary against the goals.
#
#   benchmarks/gpu_first.sh OUT [WHEELS]        # WHEELS: folder of wheels the machine lacks (default .whl,
#                                               # filled by `make gpu-wheels`; carry it: carry [".whl"])
#
# Every step runs under its own `timeout` (LIMITS below, the one place they are declared; the test
# tests/test_benchmarks_smoke.py keeps their sum <= 480 s) and is also cut to what is left of DEADLINE,
# so the whole command ends within DEADLINE plus a few seconds of kill grace. A step that fails or times
# out is recorded ("STEP name status=... seconds=... limit=..." in campaign.log) and the next one runs.
# OUT holds at most 8 files:
#   campaign.log   the steps, their status and times, the machine's facts (nvidia-smi, versions)
#   build.log      the extension's build, ptxas' registers and spills per kernel (POLARPRUNE_PTXAS_VERBOSE=1)
#   tests.txt      pytest on tests/ops (the CUDA extension, Triton, launch grids, backends, compile)
#   checks.json    gpu_checks.py: correctness of every op vs float64, grid-limit probes, determinism
#   timings.json   gpu_checks.py: ops by provider vs a device copy, the ResNet-50 gate bank, a training step
#   sanitizer.txt  compute-sanitizer memcheck over gpu_checks.py --tiny (both kernel providers)
#   summary.md     the goals (met / NOT met / not measured), the failures, the tables
set -uo pipefail

LIMITS="facts=15 wheels=10 build=100 checks=85 timings=125 tests=90 sanitizer=35 summary=10"
DEADLINE=470            # seconds from the start; no step starts or runs past it

out=${1:?usage: benchmarks/gpu_first.sh OUT [WHEELS]}
wheels=${2:-.whl}
py=${PYTHON:-python3}
export py
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/campaign.log"
: >"$log"
declare -A LIMIT
for kv in $LIMITS; do LIMIT[${kv%%=*}]=${kv#*=}; done
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
failed=()

lim() {   # lim NAME: the step's limit, cut to what is left of DEADLINE (the summary's time kept for it)
    local left=$((DEADLINE - SECONDS))
    [ "$1" = summary ] || left=$((left - LIMIT[summary]))
    echo $((left < LIMIT[$1] ? left : LIMIT[$1]))
}

note() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$log"; }

step() {   # step NAME LOGFILE CMD...: run CMD under min(its limit, time left), output to LOGFILE, record it
    local name=$1 dest=$2 limit t0=$SECONDS rc status
    limit=$(lim "$1")
    shift 2
    if ((limit < 5)); then
        note "STEP $name status=skipped-no-time seconds=0 limit=$limit"
        failed+=("$name")
        return 124
    fi
    note "== $name (limit ${limit} s): $*"
    timeout -k 3 "$limit" "$@" >>"$dest" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=exit-$rc ;;
    esac
    note "STEP $name status=$status seconds=$((SECONDS - t0)) limit=$limit"
    [ $rc -eq 0 ] || failed+=("$name")
    return $rc
}

# ---- facts: the machine as found (clocks and power are read, never set)
facts() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,persistence_mode --format=csv
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2
    "$py" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability %d.%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
          "memory GiB %.1f" % (p.total_memory / 2**30), "L2 bytes", getattr(p, "L2_cache_size", "?"))
else:
    print("no CUDA device")
    sys.exit(3)
EOF
}
export -f facts
step facts "$log" bash -c facts
if [ $? -eq 3 ]; then      # nothing to build, check or time; the summary says so
    note "no CUDA device (torch.cuda.is_available() is False): stop"
    step summary "$log" "$py" benchmarks/gpu_checks.py --summary "$out"
    exit 2
fi

# ---- wheels: packages the machine lacks (torch-pruning), into a folder of their own on PYTHONPATH
if ! "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch_pruning") is None)'; then
    if compgen -G "$wheels/*.whl" >/dev/null; then
        site=/tmp/polarprune-site
        step wheels "$log" "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "$wheels"/*.whl && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        note "STEP wheels status=missing-wheels seconds=0 limit=0 (torch_pruning missing and no $wheels/*.whl)"
        failed+=(wheels)
    fi
fi

# ---- build: the CUDA extension for this device's architecture, with ptxas' report
build() {
    local arch
    arch=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
    echo "TORCH_CUDA_ARCH_LIST=$arch"
    export TORCH_CUDA_ARCH_LIST=$arch POLARPRUNE_PTXAS_VERBOSE=1 POLARPRUNE_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
    local rc=0
    if ! "$py" -m pip install -v --no-build-isolation --no-deps -e .; then
        # the package from the source tree (PYTHONPATH), Triton kernels included, whatever the extension does
        echo "== pip install -e . failed; fallback: build_ext --inplace, polarprune_cuda/kernels -> kernels/"
        [ -e polarprune_cuda/kernels ] || ln -s ../kernels polarprune_cuda/kernels
        echo "FALLBACK-BUILD"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        "$py" setup.py build_ext --inplace || rc=1
    fi
    "$py" -m polarprune_cuda info
    return $rc
}
export -f build
step build "$out/build.log" bash -c build
if grep -q FALLBACK-BUILD "$out/build.log" 2>/dev/null; then export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi

# ---- gpu_checks: correctness, limits, determinism; then the timings (separate processes: a crash in one
# leaves the other). Each stops starting cases a few seconds before its step's limit.
step checks "$log" "$py" benchmarks/gpu_checks.py --out "$out" --json checks.json \
    --sections correctness,limits,determinism --deadline-s $(($(lim checks) - 8)) \
    --budget-s correctness=45 --budget-s limits=12 --budget-s determinism=12
step timings "$log" "$py" benchmarks/gpu_checks.py --out "$out" --json timings.json \
    --sections timings,bank,training --deadline-s $(($(lim timings) - 8)) \
    --budget-s timings=50 --budget-s bank=25 --budget-s training=30

# ---- the GPU tests (tests/ops only)
tests=()
for f in test_cuda_extension test_triton_kernels test_launch_grids test_triton_grids test_backends test_compile; do
    [ -f "tests/ops/$f.py" ] && tests+=("tests/ops/$f.py")
done
step tests "$out/tests.txt" "$py" -m pytest -q -p no:cacheprovider -rfEs -o faulthandler_timeout=30 \
    "${tests[@]}"
tail -n 1 "$out/tests.txt" >>"$log" 2>/dev/null

# ---- compute-sanitizer memcheck on small cases (both kernel providers)
if command -v compute-sanitizer >/dev/null; then
    step sanitizer "$out/sanitizer.txt" compute-sanitizer --tool memcheck --error-exitcode 99 \
        "$py" benchmarks/gpu_checks.py --tiny --device cuda --out /tmp/polarprune-sanitizer --json checks.json \
        --sections correctness,limits --providers cuda,triton --dtypes float32,bfloat16 \
        --deadline-s $(($(lim sanitizer) - 10))
else
    echo "compute-sanitizer not found on PATH" >"$out/sanitizer.txt"
    note "STEP sanitizer status=missing seconds=0 limit=0"
fi

# ---- summary.md against the goals (reads whatever the steps left)
step summary "$log" "$py" benchmarks/gpu_checks.py --summary "$out"

if [ ${#failed[@]} -gt 0 ]; then
    note "done in ${SECONDS} s; failed steps: ${failed[*]}"
    exit 1
fi
note "done in ${SECONDS} s; all steps passed"
