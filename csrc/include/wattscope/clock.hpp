// One clock for everything: CLOCK_MONOTONIC nanoseconds. Other clocks are converted where they enter.
#pragma once

#include <cstdint>

namespace wattscope {

// Nanoseconds on CLOCK_MONOTONIC (the clock Python's time.monotonic_ns() also reads on Linux).
int64_t mono_now_ns();

// CLOCK_REALTIME minus CLOCK_MONOTONIC, measured by bracketing a realtime read between two monotonic reads and
// keeping the tightest bracket. NVML stamps its buffered samples in CLOCK_REALTIME microseconds; this converts them.
struct RealtimeOffset {
  int64_t offset_ns = 0;       // realtime_ns - mono_ns
  int64_t uncertainty_ns = 0;  // half-width of the tightest bracket
};

// realtime_ns: the realtime clock to bracket, in ns; nullptr reads CLOCK_REALTIME (see NvmlLibrary::realtime_offset).
RealtimeOffset measure_realtime_offset(int tries = 7, long long (*realtime_ns)() = nullptr);

// Thread CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID), for the sampler's own overhead figures.
int64_t thread_cpu_ns();

}  // namespace wattscope
