#!/usr/bin/env bash
# The GPU campaign as ONE device command of at most 8 minutes, and its dry run on a machine without a GPU.
#
#   benchmarks/gpu_first.sh OUT [WHEELS]          # on the GPU machine (carry [".whl"]; make gpu-wheels fills it)
#   DRY_RUN=1 benchmarks/gpu_first.sh OUT         # make gpu-dryrun: the image's versions, no GPU (benchmarks/README.md)
#
# It runs the project's own harnesses and nothing of its own: the GPU tests (pytest -m gpu, in parallel, each
# test under a timeout), the pytest-benchmark suites in the order of the goals (training step, gate bank, kernels),
# compute-sanitizer over a selection of the GPU tests with the caching allocator off, then benchmarks/campaign.py
# writes summary.md against the goals. The dry run builds the extension the same way, compiles every Triton
# kernel for sm_90 ahead of time with the runtime's specialisation (benchmarks/triton_aot.py) and runs tests/ops
# on the CPU.
#
# Every step runs under its own `timeout` (LIMITS below, the one place they are declared; the CI test
# tests/test_benchmarks_smoke.py keeps their sum <= 480 s) and is also cut to what is left of DEADLINE, so the
# whole command ends within DEADLINE plus a few seconds of kill grace. A step that fails or times out is
# recorded ("STEP name status=... seconds=... limit=..." in campaign.log) and the next one runs.
# OUT holds at most 8 files:
#   campaign.log   the steps, their status and times, the machine's facts (nvidia-smi, versions, pip, setuptools)
#   build.log      the extension's build, ptxas' registers and spills per kernel (POLARPRUNE_PTXAS_VERBOSE=1)
#   tests.txt      pytest -m gpu (dry run: tests/ops on the CPU); tests.xml: the same as junit XML
#   bench.json     pytest-benchmark's JSON of the suites (GPU only); bench.txt: their pytest output
#   sanitizer.txt  compute-sanitizer memcheck over GPU tests (GPU only)
#   aot.json       the AOT compile of every Triton kernel for sm_90 (dry run only)
#   summary.md     the goals (met / NOT met / not measured), the steps, the tests, the tables
set -uo pipefail

LIMITS="facts=15 wheels=10 build=100 tests=110 bench=150 sanitizer=45 summary=10"
DEADLINE=470            # seconds from the start; no step starts or runs past it
# the dry run on a 2-core machine: the build alone takes minutes there; nothing of it counts against a GPU lease
DRY_LIMITS="facts=30 wheels=10 build=900 aot=300 tests=1800 summary=10"
DRY_DEADLINE=3100
# the GPU tests that the sanitizer runs (small sizes; both kernel providers, every op: each op's test_gpu_* cases in
# tests/ops/test_<op>.py, and the opcheck of channel_gate and gate_bank with each kernel provider forced)
SANITIZER_K="(test_gpu_ and (gate_kernels or ((penalty or bank) and 67) or nan_in_a_closed or views or (gpu_gated_affine and not past))) or (opcheck and ((channel_gate and fp32) or (gate_bank and identity)))"
# the benchmarks the goals read, in the order of the goals; torch.compile only where a goal compares with it
BENCH_NODES="benchmarks/micro/bench_training.py::test_training_side_by_side[resnet50]
benchmarks/micro/bench_gate_bank.py::test_bank_direction
benchmarks/micro/bench_kernels.py"
BENCH_K="not compile or (channel_gate and backward)"
BENCH_LIMITS="60 35 50"  # seconds for each of BENCH_NODES, in order (their sum within the bench step's limit)
BENCH_OPTS=${BENCH_OPTS:-"--rounds 30 --energy-seconds 0"}   # the suites' own options (a test runs them --tiny)

out=${1:?usage: benchmarks/gpu_first.sh OUT [WHEELS]}
wheels=${2:-.whl}
py=${PYTHON:-python3}
dry=${DRY_RUN:-0}
export py dry
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/campaign.log"
: >"$log"
if [ "$dry" = 1 ]; then LIMITS=$DRY_LIMITS; DEADLINE=$DRY_DEADLINE; fi
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

has() { "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

[ "$dry" = 1 ] && note "DRY RUN: the GPU image's versions on a machine without a GPU (no timings, no sanitizer)"

# ---- facts: the machine as found (clocks and power are read, never set), the versions the build depends on
facts() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,persistence_mode --format=csv
    fi
    command -v nvcc >/dev/null && echo "nvcc $(nvcc --version | tail -n 1)"
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2
    echo "pip $("$py" -m pip --version)"
    echo "ninja $(ninja --version 2>/dev/null || "$py" -c 'import ninja; print(ninja.__version__, "(python package)")' 2>/dev/null || echo missing)"
    "$py" - <<'EOF'
import os, sys
print("python", sys.version.split()[0], sys.executable)
try:
    import setuptools, wheel
    print("setuptools", setuptools.__version__, "wheel", wheel.__version__)
except Exception as exc:
    print("setuptools/wheel:", exc)
import numpy, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "numpy", numpy.__version__)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
for name in ("xdist", "pytest_timeout", "pytest_benchmark", "torch_pruning"):
    try:
        __import__(name)
        print(name, "present")
    except Exception as exc:
        print(name, "MISSING:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability %d.%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
          "memory GiB %.1f" % (p.total_memory / 2**30), "L2 bytes", getattr(p, "L2_cache_size", "?"))
elif os.environ.get("dry") == "1":
    print("device none (dry run)")
else:
    print("no CUDA device")
    sys.exit(3)
EOF
}
export -f facts
step facts "$log" bash -c facts
if [ $? -eq 3 ]; then      # nothing to build, check or time; the summary says so
    note "no CUDA device (torch.cuda.is_available() is False): stop"
    step summary "$log" "$py" benchmarks/campaign.py "$out"
    exit 2
fi

# ---- wheels: packages the machine lacks (torch-pruning), into a folder of their own on PYTHONPATH
if ! has torch_pruning; then
    if compgen -G "$wheels/*.whl" >/dev/null; then
        site=/tmp/polarprune-site
        step wheels "$log" "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "$wheels"/*.whl && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        note "STEP wheels status=missing-wheels seconds=0 limit=0 (torch_pruning missing and no $wheels/*.whl)"
        failed+=(wheels)
    fi
fi

# ---- build: the CUDA extension for this device's architecture (sm_90 in a dry run), with ptxas' report.
# --no-index: nothing is fetched (the machine has no network); --no-build-isolation: the environment's torch,
# setuptools and wheel build it (pyproject.toml; no 'setup.py develop' fallback that fetches setuptools)
build() {
    local arch
    if [ "$dry" = 1 ]; then arch=9.0; else
        arch=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
    fi
    echo "TORCH_CUDA_ARCH_LIST=$arch"
    export TORCH_CUDA_ARCH_LIST=$arch POLARPRUNE_PTXAS_VERBOSE=1 POLARPRUNE_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
    local rc=0
    if ! "$py" -m pip install -v --no-index --no-build-isolation --no-deps -e .; then
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

# pytest options that need a plugin: only where the plugin is there (an unknown option stops pytest)
timeout_opt() { has pytest_timeout && echo "--timeout=$1"; }
# a session limit ends the run after the test in progress, and pytest still writes its summary line and junit XML
# (a step killed by its own `timeout` writes neither); pytest-timeout >= 2.3
session_opt() {
    "$py" -c "import inspect, pytest_timeout, sys; sys.exit('session_timeout' not in inspect.getsource(pytest_timeout))" \
        2>/dev/null && echo "--session-timeout=$1"
}
workers_opt() { has xdist && echo "-n $1"; }

if [ "$dry" = 1 ]; then
    # ---- aot: every Triton kernel compiled for sm_90 with the runtime's specialisation of its real arguments
    step aot "$log" env -u TRITON_INTERPRET "$py" benchmarks/triton_aot.py --set all --save "$out/aot.json"
    # ---- tests: tests/ops on the CPU (the Triton kernels under the interpreter)
    # shellcheck disable=SC2046
    step tests "$out/tests.txt" "$py" -m pytest -p no:cacheprovider -rfEs $(workers_opt 2) $(timeout_opt 600) \
        $(session_opt $(($(lim tests) - 30))) --junitxml "$out/tests.xml" tests/ops
else
    # ---- tests: the GPU tests, in parallel (cold Triton compiles and big tensors), each under a timeout
    # shellcheck disable=SC2046
    step tests "$out/tests.txt" "$py" -m pytest -m gpu -p no:cacheprovider -rfEs $(workers_opt 8) $(timeout_opt 100) \
        $(session_opt $(($(lim tests) - 20))) --junitxml "$out/tests.xml" tests/ops
    # ---- bench: the suites the goals read (training step first: the goal that costs most to reach), one pytest
    # run per suite under its own limit, each merged into bench.json as it ends (pytest-benchmark writes its JSON
    # only at the end of a run: a suite cut by its limit loses its own rows, not the others')
    bench() {
        local i=0 rc=0 node limits
        read -r -a limits <<<"$BENCH_LIMITS"
        for node in $BENCH_NODES; do
            # shellcheck disable=SC2046,SC2086
            timeout -k 3 "${limits[$i]}" "$py" -m pytest -c benchmarks/micro/pytest.ini -p no:cacheprovider -rfE \
                $(timeout_opt "${limits[$i]}") $(session_opt $((limits[i] - 12))) $BENCH_OPTS --benchmark-json "/tmp/polarprune-bench-$i.json" -k "$BENCH_K" "$node" || rc=1
            "$py" benchmarks/campaign.py --merge "$out/bench.json" /tmp/polarprune-bench-*.json || rc=1
            i=$((i + 1))
        done
        return $rc
    }
    export -f bench timeout_opt session_opt has
    export BENCH_NODES BENCH_LIMITS BENCH_K BENCH_OPTS out
    rm -f /tmp/polarprune-bench-*.json
    step bench "$out/bench.txt" bash -c bench
    # ---- sanitizer: memcheck with the caching allocator off (an overrun of a 2 MB cached block is otherwise
    # inside memory the allocator owns, and invisible)
    if command -v compute-sanitizer >/dev/null; then
        # shellcheck disable=SC2046
        step sanitizer "$out/sanitizer.txt" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
            --error-exitcode 99 "$py" -m pytest -p no:cacheprovider -rfE $(timeout_opt 60) \
            $(session_opt $(($(lim sanitizer) - 12))) -m gpu tests/ops -k "$SANITIZER_K"
    else
        echo "compute-sanitizer not found on PATH" >"$out/sanitizer.txt"
        note "STEP sanitizer status=missing seconds=0 limit=0"
    fi
fi

# ---- summary.md against the goals (reads whatever the steps left)
step summary "$log" "$py" benchmarks/campaign.py "$out"

if [ ${#failed[@]} -gt 0 ]; then
    note "done in ${SECONDS} s; failed steps: ${failed[*]}"
    exit 1
fi
note "done in ${SECONDS} s; all steps passed"
