#!/usr/bin/env bash
# One call on a GPU host with no network: build wattscope against the host's torch/pybind11/scikit-build-core, run
# the GPU tests and the benchmarks, and write logs under $OUT (or bench/out). Peers (Zeus, pynvml) come from .whl/
# when carried (bench/wheels.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && rm -rf /tmp/site/tests /tmp/site/docs /tmp/site/examples /tmp/site/zeusd
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3 | tee "$OUT/build.log"
cd /tmp  # import the installed package, not the source tree
repo=$(cd - >/dev/null && pwd)
wattscope doctor --seconds 3 2>&1 | tee "$OUT/doctor.txt"
python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors "$repo/tests" 2>&1 | tail -15 | tee "$OUT/pytest.txt"
python3 "$repo/bench/overhead_bench.py" 2>&1 | tee "$OUT/overhead.txt"
python3 "$repo/bench/accuracy_bench.py" 2>&1 | tee "$OUT/accuracy.txt"
python3 "$repo/bench/sampler_bench.py" "${SAMPLER_SECONDS:-120}" 2>&1 | tee "$OUT/sampler.txt"
