#include "wattscope/clock.hpp"

#include <ctime>
#include <limits>

namespace wattscope {

namespace {
int64_t read_ns(clockid_t id) {
  timespec ts{};
  clock_gettime(id, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}
}  // namespace

int64_t mono_now_ns() { return read_ns(CLOCK_MONOTONIC); }

int64_t thread_cpu_ns() { return read_ns(CLOCK_THREAD_CPUTIME_ID); }

RealtimeOffset measure_realtime_offset(int tries, long long (*realtime_ns)()) {
  RealtimeOffset best{0, std::numeric_limits<int64_t>::max()};
  for (int i = 0; i < tries; ++i) {
    const int64_t before = read_ns(CLOCK_MONOTONIC);
    const int64_t real = realtime_ns != nullptr ? static_cast<int64_t>(realtime_ns()) : read_ns(CLOCK_REALTIME);
    const int64_t after = read_ns(CLOCK_MONOTONIC);
    const int64_t half_width = (after - before) / 2;
    if (half_width < best.uncertainty_ns) {
      best.uncertainty_ns = half_width;
      best.offset_ns = real - (before + half_width);
    }
  }
  return best;
}

}  // namespace wattscope
