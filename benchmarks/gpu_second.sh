#!/usr/bin/env bash
# The GPU campaign's second command: the method's value at full scale. The whole Fashion-MNIST training set, dense
# and the one pass at 50% of the MACs (benchmarks/experiments/equal_budget.py --preset fashion), one process per
# seed on the one GPU, all within DEADLINE seconds; then one result of the seeds that finished.
#
#   benchmarks/gpu_second.sh OUT [DATA] [WHEELS]   # on the GPU machine, after gpu_first.sh (carry ["data", ".whl"];
#                                                  # make gpu-data fills data/fashion-mnist, make gpu-wheels .whl)
#   DRY_RUN=1 benchmarks/gpu_second.sh OUT         # on a CPU: digits, 1 epoch, 96 images, two seeds (its CI test)
#
# OUT holds 3 files (a device command brings back 8 at most): campaign2.log (the machine, each seed's output
# prefixed by its seed, its status and time) and equal-budget-<preset>-gpu.{json,md}: every row of every seed that
# finished, mean and spread per arm (each seed's own result stays in WORK). A seed cut by DEADLINE leaves no result;
# the others still merge.
set -uo pipefail

DEADLINE=${DEADLINE:-500}     # seconds for the seeds' processes (a device command may run 600)
out=${1:?usage: benchmarks/gpu_second.sh OUT [DATA] [WHEELS]}
data=${2:-data/fashion-mnist}
wheels=${3:-.whl}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/campaign2.log"
: >"$log"
note() { echo "[$(date +%T)] $*" | tee -a "$log"; }

if [ "${DRY_RUN:-0}" = 1 ]; then
    preset=digits
    seeds=${SEEDS:-"0 1"}
    args=(--preset digits --epochs 1 --max-train 96 --device cpu)
else
    preset=fashion
    seeds=${SEEDS:-"0 1 2"}
    args=(--preset fashion --device cuda --data-dir "$data")
    for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
        [ -f "$data/$f" ] || { note "missing $data/$f (make gpu-data, and carry data)"; exit 2; }
    done
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.draw --format=csv 2>&1 || echo "no nvidia-smi"
    "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} >>"$log" 2>&1
# torch-pruning where the machine lacks it: the wheels into a folder of their own on PYTHONPATH (as gpu_first.sh)
if ! "$py" -c "import torch_pruning" 2>/dev/null; then
    site=/tmp/polarprune-site
    note "installing $wheels/*.whl into $site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl >>"$log" 2>&1 && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

work=${WORK:-/tmp/polarprune-second}
threads=$(( $(nproc) / $(echo $seeds | wc -w) ))
[ "$threads" -ge 1 ] || threads=1
note "seeds $seeds as parallel processes, $threads threads each, deadline ${DEADLINE}s"
pids=()
for k in $seeds; do
    (
        t0=$SECONDS
        OMP_NUM_THREADS=$threads timeout -k 5 "$DEADLINE" "$py" benchmarks/experiments/equal_budget.py "${args[@]}" \
            --arms dense one-pass --seeds "$k" --tag "gpu-seed$k" --results "$work/results" --work "$work/seed$k" --quiet \
            2>&1 | sed -u "s/^/[seed $k] /" >>"$log"
        rc=${PIPESTATUS[0]}
        note "seed $k: exit $rc after $((SECONDS - t0)) s"
    ) &
    pids+=($!)
done
wait "${pids[@]}"

done_=()
for k in $seeds; do
    f="$work/results/equal-budget-$preset-gpu-seed$k.json"
    [ -f "$f" ] && done_+=("$f")
done
if [ ${#done_[@]} -eq 0 ]; then
    note "no seed finished"
    exit 1
fi
"$py" benchmarks/experiments/equal_budget.py --preset "$preset" --tag gpu --results "$out" --merge "${done_[@]}" \
    >>"$log" 2>&1
rc=$?
note "merged ${#done_[@]} seed(s): exit $rc"
exit $rc
