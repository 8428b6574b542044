#!/usr/bin/env bash
# One call on a GPU host with no network: build wattscope against the host's torch/pybind11/scikit-build-core (nvcc
# there compiles the calibration load), then run the stages named in STAGES, writing logs under $OUT (or bench/out).
#
#   STAGES="build tests calibrate accuracy overhead sampler sweep" bash bench/gpu_check.sh
#   STAGES="build calibrate kernels coexist kernel_overhead" bash bench/gpu_check.sh   (per-kernel validation)
#   STAGES="build exit_bisect abort_trace" bash bench/gpu_check.sh   (hunting the abort at exit of sessions 7-8)
#
# sampler_start launches the 10-minute sampler run in its own process session so that it outlives this call (the
# machine stays warm between calls); sampler_collect, in a later call, waits for it and copies its log.
# sweep runs `wattscope sweep` on the quick preset into data/h100/sweep.sqlite for SWEEP_SECONDS and stops it cleanly
# (SIGINT); the next call resumes where it stopped. Peers (Zeus, pynvml) come from .whl/ when carried
# (bench/wheels.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
STAGES=" ${STAGES:-build tests calibrate accuracy overhead} "
export PYTHONUNBUFFERED=1
# A native abort (glibc's heap checks) then prints the Python stack of every thread: where it happened.
export PYTHONFAULTHANDLER=1
# One profile directory for every call on this machine: the calibration writes it, later stages measure with it.
export WATTSCOPE_CACHE_DIR=${WATTSCOPE_CACHE_DIR:-/tmp/wattscope-cache}
has() { [[ "$STAGES" == *" $1 "* ]]; }
t_start=$SECONDS
mark() { echo "== [$((SECONDS - t_start)) s] $*"; }
# The device tool brings back at most 8 files: pack everything into one, also when an outer `timeout` stops us.
pack() {
  mark "packing $OUT"
  # console.txt (the caller's redirect) is still being written: tar's "file changed" (status 1) is expected.
  (cd "$OUT" && { tar czf results.tgz --exclude results.tgz . ; [ $? -le 1 ]; } \
    && find . -type f ! -name results.tgz ! -name console.txt -delete)
}
trap pack EXIT
trap 'exit 143' TERM INT

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && rm -rf /tmp/site/tests /tmp/site/docs /tmp/site/examples /tmp/site/zeusd
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
mark build
if has build || ! python3 -c "import wattscope" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3 | tee "$OUT/build.log"
fi
cd /tmp  # import the installed package, not the source tree

if has sampler_start; then
  setsid nohup python3 "$repo/bench/sampler_bench.py" "${SAMPLER_SECONDS:-600}" >/tmp/sampler_long.txt 2>&1 &
  echo "sampler run started in the background (${SAMPLER_SECONDS:-600} s)"
fi
if has tests; then
  mark tests
  wattscope doctor --seconds 3 2>&1 | tee "$OUT/doctor.txt"
  # shellcheck disable=SC2086
  python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors ${PYTEST_ARGS:-} "$repo/tests" 2>&1 \
    | tail -25 \
    | tee "$OUT/pytest.txt"
fi
if has calibrate; then
  mark calibrate
  wattscope calibrate --plot "$OUT/calibration.png" 2>&1 | tee "$OUT/calibrate.txt"
  python3 "$repo/bench/calibration_bench.py" "$OUT/calibration.json" 2>&1 | tee "$OUT/calibration_bench.txt"
  cp "$WATTSCOPE_CACHE_DIR"/*.json "$OUT/" 2>/dev/null
fi
if has kernels; then
  mark kernels
  python3 "$repo/bench/kernel_ground_truth.py" --json "$OUT/kernel_ground_truth.json" ${KERNEL_ARGS:-} 2>&1 \
    | tee "$OUT/kernel_ground_truth.txt"
fi
has coexist && mark coexist && python3 "$repo/bench/profiler_coexistence.py" 2>&1 | tee "$OUT/coexist.txt"
if has exitcheck; then
  # Does a process that used torch.profiler exit cleanly? Each entry of EXIT_PLAN is scenario:TEARDOWN_CUPTI:runs
  # (bench/exit_check.py; "unset" leaves the variable alone), each run a fresh process.
  mark exitcheck
  plan=${EXIT_PLAN:-meter_profiler:unset:3 meter_profiler_keep:unset:2 meter_profiler:1:2 profiler_only:0:2 profiler_only:unset:1}
  for entry in $plan; do
    IFS=: read -r scenario teardown runs <<< "$entry"
    for i in $(seq "$runs"); do
      if [ "$teardown" = unset ]; then
        env -u TEARDOWN_CUPTI python3 "$repo/bench/exit_check.py" "$scenario" >/tmp/exit.txt 2>&1
      else
        TEARDOWN_CUPTI=$teardown python3 "$repo/bench/exit_check.py" "$scenario" >/tmp/exit.txt 2>&1
      fi
      rc=$?
      echo "$scenario TEARDOWN_CUPTI=$teardown run $i: exit $rc | $(grep -E 'detach|kernel meter|profiler saw|corruption|free\(\)|Error' /tmp/exit.txt | tr '\n' ' ')"
    done
  done 2>&1 | tee "$OUT/exitcheck.txt"
fi
if has graphs; then
  mark graphs
  python3 "$repo/bench/cuda_graph_kernels.py" 2>&1 | tee "$OUT/cuda_graph_kernels.txt"
fi
if has run_kernels; then
  # `wattscope run --kernels` on a Python child: its kernels attributed against the parent's readings.
  mark run_kernels
  wattscope run --kernels -o "$OUT/run_kernels.json" -- python3 -c "import torch
a = torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16)
for _ in range(3000): a @ a
torch.cuda.synchronize()" 2>&1 | tee "$OUT/run_kernels.txt"
fi
if has run_vs; then
  mark run_vs
  python3 "$repo/bench/run_vs_inprocess.py" 2>&1 | tee "$OUT/run_vs_inprocess.txt"
fi
if has exit_bisect; then  # which GPU tests leave the process aborting at exit? one pytest process per selection
  mark exit_bisect
  for sel in "test" "profiler" "nvtx" "kernel_meter_traces" "not profiler"; do
    python3 -m pytest -q -p no:cacheprovider -m gpu -k "$sel" "$repo/tests" >/tmp/bisect.txt 2>&1
    echo "-k '$sel': exit status $? | $(grep -E 'passed|failed' /tmp/bisect.txt | tail -1) | $(grep -E 'free\(\)|double free|corruption|Abort' /tmp/bisect.txt | head -2 | tr '\n' ' ')" \
      | tee -a "$OUT/exit_bisect.txt"
  done
fi
if has abort_trace; then  # the native stack of an abort at exit (bench/abort_backtrace.c), per pytest selection
  mark abort_trace
  cc -shared -fPIC -O1 -o /tmp/abort_bt.so "$repo/bench/abort_backtrace.c"
  IFS=';' read -ra selections <<< "${ABORT_SELECTIONS:-profiler or kernel_meter_traces;test}"
  for sel in "${selections[@]}"; do
    LD_PRELOAD=/tmp/abort_bt.so python3 -m pytest -q -p no:cacheprovider -m gpu -k "$sel" "$repo/tests" \
      >/tmp/abort.txt 2>&1
    rc=$?
    { echo "-k '$sel': exit status $rc | $(grep -E 'passed|failed' /tmp/abort.txt | tail -1)"
      if [ $rc -ne 0 ]; then tail -60 /tmp/abort.txt; python3 "$repo/bench/resolve_stack.py" /tmp/abort.txt; fi
    } | tee -a "$OUT/abort_trace.txt"
  done
fi
if has kernel_overhead; then
  mark kernel_overhead
  # shellcheck disable=SC2086
  python3 "$repo/bench/kernel_overhead_bench.py" --json "$OUT/kernel_overhead.json" ${OVERHEAD_ARGS:-} \
    --top-kernels-md "$OUT/top_kernels.md" 2>&1 | tee "$OUT/kernel_overhead.txt"
fi
if has kernel_overhead_graph; then  # the same model replayed as one CUDA graph: GPU-bound, no launch cost to add to
  mark kernel_overhead_graph
  # shellcheck disable=SC2086
  python3 "$repo/bench/kernel_overhead_bench.py" --graph --top-seconds 0 --json "$OUT/kernel_overhead_graph.json" \
    ${OVERHEAD_GRAPH_ARGS:-} 2>&1 | tee "$OUT/kernel_overhead_graph.txt"
fi
if has range_overhead; then
  mark range_overhead
  # shellcheck disable=SC2086
  python3 "$repo/bench/range_overhead_bench.py" --json "$OUT/range_overhead.json" ${RANGE_ARGS:-} 2>&1 \
    | tee "$OUT/range_overhead.txt"
fi
has accuracy && python3 "$repo/bench/accuracy_bench.py" 2>&1 | tee "$OUT/accuracy.txt"
has overhead && python3 "$repo/bench/overhead_bench.py" 2>&1 | tee "$OUT/overhead.txt"
has cadence && python3 "$repo/bench/cadence_bench.py" 2>&1 | tee "$OUT/cadence.txt"
if has sweep; then
  mark sweep
  mkdir -p "$repo/data/h100"
  # shellcheck disable=SC2086
  timeout -s INT "${SWEEP_SECONDS:-480}" wattscope sweep ${SWEEP_ARGS:---preset quick --batch-sizes 64 --precisions fp32,bf16} \
    --db "$repo/data/h100/sweep.sqlite" 2>&1 | tail -60 | tee "$OUT/sweep.txt"
  cp "$repo/data/h100/sweep.sqlite" "$OUT/"
fi
if has sampler_collect; then
  while pgrep -f sampler_bench.py >/dev/null; do sleep 2; done
  cp /tmp/sampler_long.txt "$OUT/sampler_long.txt" && cat "$OUT/sampler_long.txt"
fi
if has multi_gpu; then
  # Several GPUs (nvidia-h200-x2): isolation, sweep throughput on 1 and 2 GPUs, shards + merge; MULTI_ARGS picks.
  mark multi_gpu
  # shellcheck disable=SC2086
  python3 "$repo/bench/multi_gpu_bench.py" --out-dir "$OUT/multi_gpu" ${MULTI_ARGS:-} 2>&1 | tee "$OUT/multi_gpu.txt"
fi
has sampler && python3 "$repo/bench/sampler_bench.py" "${SAMPLER_SECONDS:-120}" 2>&1 | tee "$OUT/sampler.txt"
exit 0
