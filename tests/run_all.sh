#!/usr/bin/env bash
# The whole test suite on a fresh machine (no GPU needed): installs what it needs into a venv, runs the native
# tests under sanitizers, then pytest (GPU tests are skipped where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/test-venv
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# The CPU build of torch (a local wheel on the CI machines): a CUDA build would load a real libcupti at import, which
# wattscope then reuses instead of its fake CUPTI, so the tracer tests would skip.
python -m pip install -q "torch==2.13.0"
python -m pip install -q ".[test]"
# The web app's browser tests drive Debian's headless Chromium through its driver; under CI they fail without it.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium chromium-driver
fi
if [ -f tests/native.sh ]; then
  bash tests/native.sh
fi
cd tests/..
python -m pytest -q -p no:cacheprovider tests
