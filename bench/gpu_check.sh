#!/usr/bin/env bash
# One call on a GPU host with no network: build wattscope against the host's torch/pybind11/scikit-build-core (nvcc
# there compiles the calibration load), then run the stages named in STAGES, writing logs under $OUT (or bench/out).
#
#   STAGES="build tests calibrate accuracy overhead sampler sweep" bash bench/gpu_check.sh
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
# One profile directory for every call on this machine: the calibration writes it, later stages measure with it.
export WATTSCOPE_CACHE_DIR=${WATTSCOPE_CACHE_DIR:-/tmp/wattscope-cache}
has() { [[ "$STAGES" == *" $1 "* ]]; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && rm -rf /tmp/site/tests /tmp/site/docs /tmp/site/examples /tmp/site/zeusd
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
if has build || ! python3 -c "import wattscope" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3 | tee "$OUT/build.log"
fi
cd /tmp  # import the installed package, not the source tree

if has sampler_start; then
  setsid nohup python3 "$repo/bench/sampler_bench.py" "${SAMPLER_SECONDS:-600}" >/tmp/sampler_long.txt 2>&1 &
  echo "sampler run started in the background (${SAMPLER_SECONDS:-600} s)"
fi
if has tests; then
  wattscope doctor --seconds 3 2>&1 | tee "$OUT/doctor.txt"
  python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors "$repo/tests" 2>&1 | tail -15 \
    | tee "$OUT/pytest.txt"
fi
if has calibrate; then
  wattscope calibrate --plot "$OUT/calibration.png" 2>&1 | tee "$OUT/calibrate.txt"
  python3 "$repo/bench/calibration_bench.py" "$OUT/calibration.json" 2>&1 | tee "$OUT/calibration_bench.txt"
  cp "$WATTSCOPE_CACHE_DIR"/*.json "$OUT/" 2>/dev/null
fi
has accuracy && python3 "$repo/bench/accuracy_bench.py" 2>&1 | tee "$OUT/accuracy.txt"
has overhead && python3 "$repo/bench/overhead_bench.py" 2>&1 | tee "$OUT/overhead.txt"
has cadence && python3 "$repo/bench/cadence_bench.py" 2>&1 | tee "$OUT/cadence.txt"
if has sweep; then
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
has sampler && python3 "$repo/bench/sampler_bench.py" "${SAMPLER_SECONDS:-120}" 2>&1 | tee "$OUT/sampler.txt"
# The device tool brings back at most 8 files: pack everything into one.
(cd "$OUT" && tar czf results.tgz --exclude results.tgz . && find . -type f ! -name results.tgz -delete)
exit 0
