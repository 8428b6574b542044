#!/usr/bin/env bash
# Builds the native core with the native unit tests (csrc/tests/test_sampler.cpp, csrc/tests/test_tracer.cpp) and runs
# them through ctest under AddressSanitizer + UndefinedBehaviorSanitizer, then under ThreadSanitizer. Needs only a
# C++17 compiler and CMake (no GPU, no Python): the tests drive the real sampler thread against the fake NVML library
# and the real kernel tracer against the fake CUPTI library.
#
#   bash tests/native.sh             both sanitizer builds
#   bash tests/native.sh thread      one of them ("address,undefined" or "thread")
#
# Build folders: build-native-asan-ubsan/ and build-native-tsan/ (ignored by git; reused, so reruns are fast).
set -euo pipefail
cd "$(dirname "$0")/.."

# Leaks are errors; any report stops the process at once, so ctest sees a failure instead of a log line.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# No suppressions: the tests run clean without any. Add one only for a report inside third-party code (e.g.
# libstdc++ internals), with the reason next to it.
export TSAN_OPTIONS=halt_on_error=1

jobs=${WATTSCOPE_NATIVE_JOBS:-2}
sanitizers=("$@")
if [ ${#sanitizers[@]} -eq 0 ]; then
  sanitizers=("address,undefined" "thread")
fi

for san in "${sanitizers[@]}"; do
  case "$san" in
    address,undefined) name=asan-ubsan ;;
    thread) name=tsan ;;
    *) echo "native.sh: unknown sanitizer set '$san' (use 'address,undefined' or 'thread')" >&2; exit 2 ;;
  esac
  dir=build-native-$name
  echo "== native tests under -fsanitize=$san ($dir)"
  start=$SECONDS
  cmake -S . -B "$dir" -DWATTSCOPE_PYTHON=OFF -DWATTSCOPE_NATIVE_TESTS=ON -DWATTSCOPE_WERROR=ON \
    -DWATTSCOPE_SANITIZE="$san" -DCMAKE_BUILD_TYPE=Debug >/dev/null
  cmake --build "$dir" -j"$jobs"
  ctest --test-dir "$dir" --output-on-failure
  echo "== -fsanitize=$san: passed in $((SECONDS - start)) s"
done
