// A fake libnvidia-ml.so.1 for CI machines without a GPU.
//
// The product opens this file through its normal dlopen path (WATTSCOPE_NVML_PATH) and runs its real native
// sampler against it; tests open the same file and steer it through fake_nvml_control.h. The fake serves a
// programmable "true" power signal per device through the same sources, update rates and quirks as an H100 on
// driver 580 (docs/measurement-facts.md, section 1), and can inject failures, unsupported sources and slow calls.
//
// Everything is computed lazily from CLOCK_MONOTONIC at call time: there is no background thread, so what a call
// returns depends only on the trace, the settings and the time of the call. The samples tile time (each is the
// exact mean over the period before it), so their sum equals fake_nvml_energy_j over the span they cover, up to
// the rounding to whole mW that NVML imposes: to ~1e-15 when every 20 ms mean is a whole number of mW (e.g. whole
// watts with knots on a 20 µs grid); otherwise each sample is off by up to 0.5 mW (sums ~1e-7 in practice).

#include "fake_nvml_control.h"

#include <wattscope/nvml_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <time.h>

#define FAKE_NVML_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Fixed properties of the fake devices.

constexpr int64_t kNsPerS = 1000000000;
constexpr int64_t kRefreshNs = 100 * 1000000;        // fields and energy counter update on this grid
constexpr int64_t kInstantWindowNs = 25 * 1000000;   // H100 "instant" power averages 25 ms
constexpr int64_t kAverageWindowNs = 1 * kNsPerS;    // field 185 / GetPowerUsage: 1 s moving average
constexpr unsigned int kPowerLimitMw = 700000;
constexpr unsigned int kSmClockMhz = 1980;
constexpr unsigned int kMemClockMhz = 2619;
constexpr unsigned int kVideoClockMhz = 1755;
constexpr unsigned int kTemperatureC = 45;
constexpr unsigned int kPciDeviceId = 0x233010DE;     // (device 0x2330 << 16) | vendor 0x10DE: H100 SXM5 80GB
constexpr unsigned int kPciSubSystemId = 0x16C110DE;
// Bounds on test settings that keep every int64 ns computation far from overflow.
constexpr unsigned int kMaxRingSize = 1000000;
constexpr unsigned int kMaxSamplePeriodUs = 100000000;          // 100 s
constexpr int64_t kMaxOriginDistanceNs = 100LL * 86400 * kNsPerS;  // origin within 100 days of now
constexpr const char* kDeviceName = "Fake NVIDIA H100 80GB HBM3";
constexpr const char* kDriverVersion = "999.99.99-fake";
constexpr const char* kNvmlVersion = "13.999.99.99-fake";

// ---------------------------------------------------------------------------------------------------------------
// Exported NVML functions, in one table so that failure rules, delays and call counts can name them.

enum Fn : int {
  kInit,
  kShutdown,
  kErrorString,
  kSystemGetDriverVersion,
  kSystemGetNVMLVersion,
  kDeviceGetCount,
  kDeviceGetHandleByIndex,
  kDeviceGetHandleByUUID,
  kDeviceGetHandleByPciBusId,
  kDeviceGetName,
  kDeviceGetUUID,
  kDeviceGetPciInfo,
  kDeviceGetSamples,
  kDeviceGetFieldValues,
  kDeviceGetPowerUsage,
  kDeviceGetTotalEnergyConsumption,
  kDeviceGetPowerManagementLimit,
  kDeviceGetClockInfo,
  kDeviceGetTemperature,
  kFnCount,
};

struct FnInfo {
  const char* name;
  bool device_fn;   // acts on one device: matched by the "*" failure rule and delay
  bool needs_init;  // returns NVML_ERROR_UNINITIALIZED while the init count is 0
};

constexpr FnInfo kFns[kFnCount] = {
    {"nvmlInit_v2", false, false},
    {"nvmlShutdown", false, false},  // checks the count itself: shutdown at 0 is UNINITIALIZED
    {"nvmlErrorString", false, false},
    {"nvmlSystemGetDriverVersion", false, false},
    {"nvmlSystemGetNVMLVersion", false, false},
    {"nvmlDeviceGetCount_v2", false, true},
    {"nvmlDeviceGetHandleByIndex_v2", true, true},
    {"nvmlDeviceGetHandleByUUID", true, true},
    {"nvmlDeviceGetHandleByPciBusId_v2", true, true},
    {"nvmlDeviceGetName", true, true},
    {"nvmlDeviceGetUUID", true, true},
    {"nvmlDeviceGetPciInfo_v3", true, true},
    {"nvmlDeviceGetSamples", true, true},
    {"nvmlDeviceGetFieldValues", true, true},
    {"nvmlDeviceGetPowerUsage", true, true},
    {"nvmlDeviceGetTotalEnergyConsumption", true, true},
    {"nvmlDeviceGetPowerManagementLimit", true, true},
    {"nvmlDeviceGetClockInfo", true, true},
    {"nvmlDeviceGetTemperature", true, true},
};

int find_fn(const char* name) {
  if (name == nullptr) return -1;
  for (int i = 0; i < kFnCount; ++i) {
    if (std::strcmp(kFns[i].name, name) == 0) return i;
  }
  return -1;
}

// ---------------------------------------------------------------------------------------------------------------
// Integer time helpers. Times before the origin are legal (the signal exists before it), so divisions must floor.

int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

int64_t mono_now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * kNsPerS + ts.tv_nsec;
}

int64_t realtime_now_ns() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return int64_t(ts.tv_sec) * kNsPerS + ts.tv_nsec;
}

// Realtime-minus-monotonic offset from the tightest of a few (mono, real, mono) brackets, so that every
// NVML-facing timestamp is the monotonic time shifted by one constant: the product's own clock mapping can then
// be tested against an exact answer.
int64_t measure_realtime_minus_mono_ns() {
  int64_t best_width_ns = INT64_MAX;
  int64_t best_offset_ns = 0;
  for (int i = 0; i < 7; ++i) {
    const int64_t m0 = mono_now_ns();
    const int64_t r = realtime_now_ns();
    const int64_t m1 = mono_now_ns();
    if (m1 - m0 < best_width_ns) {
      best_width_ns = m1 - m0;
      best_offset_ns = r - (m0 + (m1 - m0) / 2);
    }
  }
  return best_offset_ns;
}

void sleep_us(unsigned int us) {
  if (us > 0) std::this_thread::sleep_for(std::chrono::microseconds(us));
}

unsigned int watts_to_mw(long double power_w) {
  const long double mw = std::round(power_w * 1000.0L);
  if (!(mw > 0)) return 0;  // also catches NaN
  if (mw >= static_cast<long double>(UINT_MAX)) return UINT_MAX;
  return static_cast<unsigned int>(mw);
}

// ---------------------------------------------------------------------------------------------------------------
// The true power signal and its exact integral.
//
// Times come in as nanoseconds relative to the origin, held in long double: every int64 is exact there (64-bit
// mantissa), so interval widths are exact and positions are good to ~1e-19 relative. Energies then agree with a
// sum of sample means to ~1e-15 relative, far inside the ~1e-9 that tests compare at, even hours into a run.

class Trace {
 public:
  Trace() { set({0.0}, {FAKE_NVML_DEFAULT_POWER_W}, 0.0); }

  void set(std::vector<double> t_s, std::vector<double> power_w, double period_s) {
    t_s_ = std::move(t_s);
    power_w_ = std::move(power_w);
    period_s_ = period_s;
    // Integral from the first knot to each knot: whole segments then cost O(1).
    cum_j_.assign(t_s_.size(), 0.0L);
    for (size_t i = 1; i < t_s_.size(); ++i) {
      cum_j_[i] = cum_j_[i - 1] + static_cast<long double>(power_w_[i - 1]) *
                                      (static_cast<long double>(t_s_[i]) - t_s_[i - 1]);
    }
    period_j_ = period_s_ > 0 ? lookup_integral_j(0.0L, period_s_, period_s_) : 0.0L;
  }

  // Exact ∫_a^b p(x) dx in joules (negative when b < a). Periodic signals: whole periods × the period integral,
  // plus the two remainders, so that arbitrarily long intervals cost O(log n) and lose no precision.
  long double integral_j(long double a_ns, long double b_ns) const {
    const long double a_s = a_ns / kNsPerS, b_s = b_ns / kNsPerS, width_s = (b_ns - a_ns) / kNsPerS;
    if (period_s_ <= 0) return lookup_integral_j(a_s, b_s, width_s);
    long double periods_a, periods_b, rem_a_s, rem_b_s;
    split_period(a_s, &periods_a, &rem_a_s);
    split_period(b_s, &periods_b, &rem_b_s);
    if (periods_a == periods_b) return lookup_integral_j(rem_a_s, rem_b_s, width_s);
    return (periods_b - periods_a) * period_j_ + lookup_integral_j(rem_a_s, rem_b_s, rem_b_s - rem_a_s);
  }

  // Mean power over (end - window, end]: what a boxcar sensor of that window reports at `end`.
  long double mean_w(long double end_ns, long double window_ns) const {
    return integral_j(end_ns - window_ns, end_ns) / (window_ns / kNsPerS);
  }

 private:
  // Segment holding x: -1 before t_s[0] (power_w[0]), i on [t_s[i], t_s[i+1]) (the last one never ends).
  long segment(long double x_s) const {
    const auto it = std::upper_bound(t_s_.begin(), t_s_.end(), x_s,
                                     [](long double x, double t) { return x < static_cast<long double>(t); });
    return static_cast<long>(it - t_s_.begin()) - 1;
  }
  long double segment_power_w(long i) const { return power_w_[static_cast<size_t>(std::max(i, 0L))]; }

  // Integral of the non-periodic lookup, summed piecewise (partial first segment, whole inner segments from the
  // prefix sums, partial last segment) rather than as a difference of antiderivatives: hours after the last
  // knot that difference would cancel two large numbers, this keeps full precision for short windows.
  // width_s = b_s - a_s, passed in because the caller can often compute it exactly.
  long double lookup_integral_j(long double a_s, long double b_s, long double width_s) const {
    if (b_s < a_s) return -lookup_integral_j(b_s, a_s, -width_s);
    const long ia = segment(a_s);
    const long ib = segment(b_s);
    if (ia == ib) return segment_power_w(ia) * width_s;
    const size_t first_full = static_cast<size_t>(ia + 1);
    const size_t last_knot = static_cast<size_t>(ib);
    return segment_power_w(ia) * (static_cast<long double>(t_s_[first_full]) - a_s) +
           (cum_j_[last_knot] - cum_j_[first_full]) +
           segment_power_w(ib) * (b_s - static_cast<long double>(t_s_[last_knot]));
  }

  // x = periods * P + rem with rem in [0, P); the clamps absorb rounding of the division.
  void split_period(long double x_s, long double* periods, long double* rem_s) const {
    const long double p = period_s_;
    long double q = std::floor(x_s / p);
    long double r = x_s - q * p;
    if (r < 0) {
      r += p;
      q -= 1;
    } else if (r >= p) {
      r -= p;
      q += 1;
    }
    *periods = q;
    *rem_s = r;
  }

  std::vector<double> t_s_;
  std::vector<double> power_w_;
  std::vector<long double> cum_j_;
  double period_s_ = 0;
  long double period_j_ = 0;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// A device. nvmlDevice_t is a pointer to this struct (the NVML header leaves it opaque); handles point into a
// fixed array that is never freed, so a handle stays a valid pointer whatever reset() does, and validation is a
// comparison against the active entries.

struct nvmlDevice_st {
  Trace trace;
  int64_t origin_mono_ns = 0;
  int64_t sample_period_ns = int64_t(FAKE_NVML_DEFAULT_SAMPLE_PERIOD_US) * 1000;
  unsigned int ring_size = FAKE_NVML_DEFAULT_RING_SIZE;
  bool supported[FAKE_NVML_SOURCE_COUNT] = {true, true, true, true, true};

  // Exact in long double, and cannot overflow like an int64 difference of arbitrary test inputs could.
  long double rel_ns(int64_t mono_ns) const {
    return static_cast<long double>(mono_ns) - static_cast<long double>(origin_mono_ns);
  }
  // Last point of the 100 ms refresh grid at or before `now`: the fields and the energy counter hold their value
  // between grid points, as the real ones do.
  int64_t last_refresh_mono_ns(int64_t now_mono_ns) const {
    return origin_mono_ns + floor_div(now_mono_ns - origin_mono_ns, kRefreshNs) * kRefreshNs;
  }
  unsigned int boxcar_mw(int64_t end_mono_ns, int64_t window_ns) const {
    return watts_to_mw(trace.mean_w(rel_ns(end_mono_ns), static_cast<long double>(window_ns)));
  }
  unsigned int average_mw(int64_t now_mono_ns) const {
    return boxcar_mw(last_refresh_mono_ns(now_mono_ns), kAverageWindowNs);
  }
  unsigned int instant_mw(int64_t now_mono_ns) const {
    return boxcar_mw(last_refresh_mono_ns(now_mono_ns), kInstantWindowNs);
  }
  unsigned long long energy_mj(int64_t now_mono_ns) const {
    const long double since_origin_j =
        trace.integral_j(0.0L, rel_ns(last_refresh_mono_ns(now_mono_ns)));
    // Truncated like the hardware counter. The 1e-6 mJ nudge keeps a value that is a whole number of mJ in
    // exact arithmetic (e.g. 806000 mJ computed as 805999.9999999) from losing a whole mJ to rounding.
    const long double total_mj = std::floor(since_origin_j * 1000.0L + 1e-6L) + FAKE_NVML_ENERGY_BASE_MJ;
    return total_mj > 0 ? static_cast<unsigned long long>(total_mj) : 0ull;
  }
};

namespace {

struct FailRule {
  int fn;         // -1: every device function ("*")
  int dev;        // -1: any device
  unsigned long long after_calls;
  unsigned long long successes = 0;
  nvmlReturn_t code;

  bool matches(int f, int d) const {
    const bool fn_ok = fn == f || (fn == -1 && kFns[f].device_fn);
    return fn_ok && (dev == -1 || dev == d);
  }
  bool fired() const { return successes >= after_calls; }
};

struct State {
  std::mutex mu;
  nvmlDevice_st devices[FAKE_NVML_MAX_DEVICES];
  unsigned int n_devices = 0;
  int init_refcount = 0;
  nvmlReturn_t fail_init_code = NVML_SUCCESS;
  std::vector<FailRule> rules;
  unsigned int delay_us[kFnCount] = {};
  unsigned long long calls[kFnCount] = {};
  int64_t realtime_minus_mono_ns = 0;  // measured at reset
  // realtime_minus_mono_ns plus the test's shift: what every stamp uses. Atomic so that fake_nvml_realtime_ns needs
  // no lock (written under mu).
  std::atomic<int64_t> stamp_minus_mono_ns{0};

  // -1 when the handle is not one of the active devices.
  int device_index(nvmlDevice_t handle) const {
    for (unsigned int i = 0; i < n_devices; ++i) {
      if (handle == &devices[i]) return static_cast<int>(i);
    }
    return -1;
  }
  unsigned long long realtime_us(int64_t mono_ns) const {
    return static_cast<unsigned long long>(floor_div(mono_ns + stamp_minus_mono_ns.load(), 1000));
  }
  nvmlReturn_t injected_failure(int fn, int dev) const {
    for (const FailRule& r : rules) {
      if (r.matches(fn, dev) && r.fired()) return r.code;
    }
    return NVML_SUCCESS;
  }
  void note_success(int fn, int dev) {
    for (FailRule& r : rules) {
      if (r.matches(fn, dev)) ++r.successes;
    }
  }
};

// Allocated once and never destroyed: the product's sampler thread may still be inside an NVML call while the
// process runs its static destructors at exit.
State& state() {
  static State* s = new State;
  return *s;
}

// Rejects control calls on a device slot that does not exist, with a line a test author will see.
nvmlDevice_st* control_device(State& s, unsigned int dev, const char* what) {
  if (dev >= FAKE_NVML_MAX_DEVICES) {
    std::fprintf(stderr, "fake_nvml: %s: device %u out of range (max %d)\n", what, dev, FAKE_NVML_MAX_DEVICES);
    return nullptr;
  }
  return &s.devices[dev];
}

void reset_locked(State& s, unsigned int n_devices) {
  if (n_devices > FAKE_NVML_MAX_DEVICES) {
    std::fprintf(stderr, "fake_nvml: reset: %u devices requested, using %d\n", n_devices, FAKE_NVML_MAX_DEVICES);
    n_devices = FAKE_NVML_MAX_DEVICES;
  }
  const int64_t now_ns = mono_now_ns();
  for (unsigned int i = 0; i < FAKE_NVML_MAX_DEVICES; ++i) {
    nvmlDevice_st& d = s.devices[i];
    d = nvmlDevice_st{};
    d.origin_mono_ns = now_ns;
  }
  s.n_devices = n_devices;
  s.fail_init_code = NVML_SUCCESS;
  s.rules.clear();
  std::fill(std::begin(s.delay_us), std::end(s.delay_us), 0u);
  std::fill(std::begin(s.calls), std::end(s.calls), 0ull);
  s.realtime_minus_mono_ns = measure_realtime_minus_mono_ns();
  s.stamp_minus_mono_ns.store(s.realtime_minus_mono_ns);
}

// ---------------------------------------------------------------------------------------------------------------
// The skeleton shared by every NVML entry point.
//
// 1. Under the lock: count the call, check init, resolve the device (resolve(State&, int* dev) returns an NVML
//    code; dev = -1 for system functions), apply failure rules, read the delay.
// 2. Sleep half the delay without the lock, so a slow call (the ~4 ms energy counter) blocks no other thread.
// 3. Under the lock: re-check the device (a reset may have removed it meanwhile), run body(State&, dev, now),
//    and count a success for the failure rules.
// 4. Sleep the other half.

template <class Resolve, class Body>
nvmlReturn_t nvml_call(Fn fn, Resolve&& resolve, Body&& body) {
  State& s = state();
  int dev = -1;
  unsigned int delay_us = 0;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    ++s.calls[fn];
    if (kFns[fn].needs_init && s.init_refcount == 0) return NVML_ERROR_UNINITIALIZED;
    const nvmlReturn_t resolved = resolve(s, &dev);
    if (resolved != NVML_SUCCESS) return resolved;
    const nvmlReturn_t injected = s.injected_failure(fn, dev);
    if (injected != NVML_SUCCESS) return injected;
    delay_us = s.delay_us[fn];
  }
  sleep_us(delay_us / 2);
  nvmlReturn_t rc;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (dev >= 0 && static_cast<unsigned int>(dev) >= s.n_devices) {
      rc = NVML_ERROR_INVALID_ARGUMENT;
    } else {
      rc = body(s, dev, mono_now_ns());
      if (rc == NVML_SUCCESS) s.note_success(fn, dev);
    }
  }
  sleep_us(delay_us - delay_us / 2);
  return rc;
}

// For functions that take no device.
nvmlReturn_t no_device(State&, int* dev) {
  *dev = -1;
  return NVML_SUCCESS;
}

// For functions that take a handle.
auto by_handle(nvmlDevice_t handle) {
  return [handle](State& s, int* dev) -> nvmlReturn_t {
    *dev = s.device_index(handle);
    return *dev < 0 ? NVML_ERROR_INVALID_ARGUMENT : NVML_SUCCESS;
  };
}

nvmlReturn_t copy_string(const char* value, char* out, unsigned int length) {
  if (out == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
  if (std::strlen(value) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
  std::memcpy(out, value, std::strlen(value) + 1);
  return NVML_SUCCESS;
}

std::string device_uuid(unsigned int index) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "GPU-fa4e0000-0000-0000-0000-0000000000%02x", index);
  return buf;
}

unsigned int device_pci_bus(unsigned int index) { return 0x10 + index; }

// Parses "dddddddd:bb:dd.f", "dddd:bb:dd.f" or "bb:dd.f" (hex, any case) as the real NVML accepts; CUDA reports
// the 4-digit-domain form, NVML the 8-digit one.
bool parse_pci_bus_id(const char* text, unsigned int* domain, unsigned int* bus, unsigned int* device,
                      unsigned int* function) {
  int consumed = -1;
  if (std::sscanf(text, "%x:%x:%x.%x%n", domain, bus, device, function, &consumed) == 4 &&
      text[consumed] == '\0') {
    return true;
  }
  consumed = -1;
  *domain = 0;
  return std::sscanf(text, "%x:%x.%x%n", bus, device, function, &consumed) == 3 && text[consumed] == '\0';
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// NVML entry points. Each is checked against the function-pointer type the product resolves it as.

#define FAKE_NVML_CHECK_SIGNATURE(name) \
  static_assert(std::is_same<decltype(&name), name##_fn>::value, #name " does not match nvml_api.h")

FAKE_NVML_EXPORT nvmlReturn_t nvmlInit_v2(void) {
  return nvml_call(kInit, no_device, [](State& s, int, int64_t) -> nvmlReturn_t {
    if (s.fail_init_code != NVML_SUCCESS) return s.fail_init_code;
    ++s.init_refcount;
    return NVML_SUCCESS;
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlInit_v2);

FAKE_NVML_EXPORT nvmlReturn_t nvmlShutdown(void) {
  return nvml_call(kShutdown, no_device, [](State& s, int, int64_t) -> nvmlReturn_t {
    if (s.init_refcount == 0) return NVML_ERROR_UNINITIALIZED;
    --s.init_refcount;
    return NVML_SUCCESS;
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlShutdown);

FAKE_NVML_EXPORT const char* nvmlErrorString(nvmlReturn_t result) {
  {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    ++s.calls[kErrorString];
  }
  // The strings of the real library, for the codes it defines.
  switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt Request Issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 22: return "The requested vgpu operation is not available on target device, because ECC is enabled";
    case 23: return "Ran out of critical resources, other than memory";
    case 24: return "Insufficient power";
    case 25: return "Argument version mismatch";
    case 26: return "Deprecated";
    case 27: return "Not Ready";
    case 999: return "Unknown Error";
    default: return "Unknown Error";
  }
}
FAKE_NVML_CHECK_SIGNATURE(nvmlErrorString);

FAKE_NVML_EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char* version, unsigned int length) {
  return nvml_call(kSystemGetDriverVersion, no_device,
                   [&](State&, int, int64_t) -> nvmlReturn_t {
                     return copy_string(kDriverVersion, version, length);
                   });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlSystemGetDriverVersion);

FAKE_NVML_EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char* version, unsigned int length) {
  return nvml_call(kSystemGetNVMLVersion, no_device,
                   [&](State&, int, int64_t) -> nvmlReturn_t {
                     return copy_string(kNvmlVersion, version, length);
                   });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlSystemGetNVMLVersion);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int* device_count) {
  return nvml_call(kDeviceGetCount, no_device, [&](State& s, int, int64_t) -> nvmlReturn_t {
    if (device_count == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    *device_count = s.n_devices;
    return NVML_SUCCESS;
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetCount_v2);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t* device) {
  auto resolve = [&](State& s, int* dev) -> nvmlReturn_t {
    if (index >= s.n_devices || device == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    *dev = static_cast<int>(index);
    return NVML_SUCCESS;
  };
  return nvml_call(kDeviceGetHandleByIndex, resolve, [&](State& s, int dev, int64_t) -> nvmlReturn_t {
    *device = &s.devices[dev];
    return NVML_SUCCESS;
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetHandleByIndex_v2);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char* uuid, nvmlDevice_t* device) {
  auto resolve = [&](State& s, int* dev) -> nvmlReturn_t {
    if (uuid == nullptr || device == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < s.n_devices; ++i) {
      if (device_uuid(i) == uuid) {
        *dev = static_cast<int>(i);
        return NVML_SUCCESS;
      }
    }
    return NVML_ERROR_NOT_FOUND;
  };
  return nvml_call(kDeviceGetHandleByUUID, resolve, [&](State& s, int dev, int64_t) -> nvmlReturn_t {
    *device = &s.devices[dev];
    return NVML_SUCCESS;
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetHandleByUUID);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char* pci_bus_id, nvmlDevice_t* device) {
  auto resolve = [&](State& s, int* dev) -> nvmlReturn_t {
    if (pci_bus_id == nullptr || device == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int domain = 0, bus = 0, dev_no = 0, function = 0;
    if (!parse_pci_bus_id(pci_bus_id, &domain, &bus, &dev_no, &function)) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < s.n_devices; ++i) {
      if (domain == 0 && bus == device_pci_bus(i) && dev_no == 0 && function == 0) {
        *dev = static_cast<int>(i);
        return NVML_SUCCESS;
      }
    }
    return NVML_ERROR_NOT_FOUND;
  };
  return nvml_call(kDeviceGetHandleByPciBusId, resolve, [&](State& s, int dev, int64_t) -> nvmlReturn_t {
    *device = &s.devices[dev];
    return NVML_SUCCESS;
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetHandleByPciBusId_v2);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char* name, unsigned int length) {
  return nvml_call(kDeviceGetName, by_handle(device),
                   [&](State&, int, int64_t) -> nvmlReturn_t {
                     return copy_string(kDeviceName, name, length);
                   });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetName);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char* uuid, unsigned int length) {
  return nvml_call(kDeviceGetUUID, by_handle(device), [&](State&, int dev, int64_t) -> nvmlReturn_t {
    return copy_string(device_uuid(static_cast<unsigned int>(dev)).c_str(), uuid, length);
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetUUID);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t* pci) {
  return nvml_call(kDeviceGetPciInfo, by_handle(device), [&](State&, int dev, int64_t) -> nvmlReturn_t {
    if (pci == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    const unsigned int bus = device_pci_bus(static_cast<unsigned int>(dev));
    std::memset(pci, 0, sizeof *pci);
    pci->domain = 0;
    pci->bus = bus;
    pci->device = 0;
    pci->pciDeviceId = kPciDeviceId;
    pci->pciSubSystemId = kPciSubSystemId;
    // Domain and device are always 0 here; the bus stays below 0x20 (16 devices from 0x10).
    std::snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", bus & 0xFFu);
    std::snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", bus & 0xFFu);
    return NVML_SUCCESS;
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetPciInfo_v3);

// The driver's power-sample ring. Sample k is taken at origin + k * period and reports the exact mean of the
// signal over the preceding period (a boxcar sensor, so the samples tile time and integrate to the exact energy).
// The ring holds the newest ring_size samples at or before now; nothing is stored, each call recomputes them.
FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetSamples(nvmlDevice_t device, int type,
                                                   unsigned long long last_seen_timestamp, int* sample_val_type,
                                                   unsigned int* sample_count, nvmlSample_t* samples) {
  auto body = [&](State& s, int dev, int64_t now_ns) -> nvmlReturn_t {
    if (sample_val_type == nullptr || sample_count == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    if (type != NVML_TOTAL_POWER_SAMPLES) return NVML_ERROR_NOT_SUPPORTED;  // only power is faked
    const nvmlDevice_st& d = s.devices[dev];
    if (!d.supported[FAKE_NVML_SOURCE_SAMPLES]) return NVML_ERROR_NOT_SUPPORTED;
    *sample_val_type = NVML_VALUE_TYPE_UNSIGNED_INT;

    const int64_t period_ns = d.sample_period_ns;
    const int64_t newest_k = floor_div(now_ns - d.origin_mono_ns, period_ns);
    int64_t first_k = newest_k - static_cast<int64_t>(d.ring_size) + 1;
    auto sample_mono_ns = [&](int64_t k) { return d.origin_mono_ns + k * period_ns; };
    if (last_seen_timestamp != 0) {
      // Timestamps rise with k, so skip the prefix at or before last_seen (at most ring_size steps of a binary
      // search; last_seen may be any value, including ones from before a reset).
      int64_t lo = first_k, hi = newest_k + 1;  // first k in [lo, hi) with stamp > last_seen, hi if none
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (s.realtime_us(sample_mono_ns(mid)) > last_seen_timestamp) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      first_k = lo;
    }
    const int64_t available = std::max<int64_t>(0, newest_k - first_k + 1);
    if (available == 0) {
      *sample_count = 0;
      return NVML_ERROR_NOT_FOUND;
    }
    if (samples == nullptr) {
      *sample_count = static_cast<unsigned int>(available);
      return NVML_SUCCESS;
    }
    if (*sample_count < available) {
      *sample_count = static_cast<unsigned int>(available);
      return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (int64_t i = 0; i < available; ++i) {
      const int64_t t_ns = sample_mono_ns(first_k + i);
      samples[i].timeStamp = s.realtime_us(t_ns);
      samples[i].sampleValue.ullVal = 0;  // clear the union's upper bytes: callers may read the wrong member
      samples[i].sampleValue.uiVal = d.boxcar_mw(t_ns, period_ns);
    }
    *sample_count = static_cast<unsigned int>(available);
    return NVML_SUCCESS;
  };
  return nvml_call(kDeviceGetSamples, by_handle(device), body);
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetSamples);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int values_count,
                                                       nvmlFieldValue_t* values) {
  auto body = [&](State& s, int dev, int64_t now_ns) -> nvmlReturn_t {
    if (values_count < 0 || (values_count > 0 && values == nullptr)) return NVML_ERROR_INVALID_ARGUMENT;
    const nvmlDevice_st& d = s.devices[dev];
    // Real NVML stamps fields with the query time, not with the time of the reading.
    const long long query_us = static_cast<long long>(s.realtime_us(now_ns));
    for (int i = 0; i < values_count; ++i) {
      nvmlFieldValue_t& v = values[i];
      v.timestamp = query_us;
      v.latencyUsec = 0;
      v.valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
      v.value.ullVal = 0;
      if (v.fieldId == NVML_FI_DEV_POWER_INSTANT && d.supported[FAKE_NVML_SOURCE_INSTANT_FIELD]) {
        v.nvmlReturn = NVML_SUCCESS;
        v.value.uiVal = d.instant_mw(now_ns);
      } else if (v.fieldId == NVML_FI_DEV_POWER_AVERAGE && d.supported[FAKE_NVML_SOURCE_AVERAGE]) {
        v.nvmlReturn = NVML_SUCCESS;
        v.value.uiVal = d.average_mw(now_ns);
      } else {
        v.nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
      }
    }
    return NVML_SUCCESS;
  };
  return nvml_call(kDeviceGetFieldValues, by_handle(device), body);
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetFieldValues);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int* power_mw) {
  auto body = [&](State& s, int dev, int64_t now_ns) -> nvmlReturn_t {
    if (power_mw == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    const nvmlDevice_st& d = s.devices[dev];
    if (!d.supported[FAKE_NVML_SOURCE_AVERAGE]) return NVML_ERROR_NOT_SUPPORTED;
    *power_mw = d.average_mw(now_ns);
    return NVML_SUCCESS;
  };
  return nvml_call(kDeviceGetPowerUsage, by_handle(device), body);
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetPowerUsage);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long* energy_mj) {
  auto body = [&](State& s, int dev, int64_t now_ns) -> nvmlReturn_t {
    if (energy_mj == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    const nvmlDevice_st& d = s.devices[dev];
    if (!d.supported[FAKE_NVML_SOURCE_ENERGY]) return NVML_ERROR_NOT_SUPPORTED;
    *energy_mj = d.energy_mj(now_ns);
    return NVML_SUCCESS;
  };
  return nvml_call(kDeviceGetTotalEnergyConsumption, by_handle(device), body);
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetTotalEnergyConsumption);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int* limit_mw) {
  return nvml_call(kDeviceGetPowerManagementLimit, by_handle(device), [&](State&, int, int64_t) -> nvmlReturn_t {
    if (limit_mw == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    *limit_mw = kPowerLimitMw;
    return NVML_SUCCESS;
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetPowerManagementLimit);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, int type, unsigned int* clock_mhz) {
  return nvml_call(kDeviceGetClockInfo, by_handle(device), [&](State& s, int dev, int64_t) -> nvmlReturn_t {
    if (clock_mhz == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    if (!s.devices[dev].supported[FAKE_NVML_SOURCE_CLOCKS_TEMP]) return NVML_ERROR_NOT_SUPPORTED;
    switch (type) {  // nvmlClockType_t: 0 graphics, 1 SM, 2 memory, 3 video
      case 0:
      case NVML_CLOCK_SM: *clock_mhz = kSmClockMhz; return NVML_SUCCESS;
      case 2: *clock_mhz = kMemClockMhz; return NVML_SUCCESS;
      case 3: *clock_mhz = kVideoClockMhz; return NVML_SUCCESS;
      default: return NVML_ERROR_INVALID_ARGUMENT;
    }
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetClockInfo);

FAKE_NVML_EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int* temp_c) {
  return nvml_call(kDeviceGetTemperature, by_handle(device), [&](State& s, int dev, int64_t) -> nvmlReturn_t {
    if (temp_c == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    if (!s.devices[dev].supported[FAKE_NVML_SOURCE_CLOCKS_TEMP]) return NVML_ERROR_NOT_SUPPORTED;
    if (sensor != NVML_TEMPERATURE_GPU) return NVML_ERROR_INVALID_ARGUMENT;
    *temp_c = kTemperatureC;
    return NVML_SUCCESS;
  });
}
FAKE_NVML_CHECK_SIGNATURE(nvmlDeviceGetTemperature);

// ---------------------------------------------------------------------------------------------------------------
// Control API (fake_nvml_control.h).

FAKE_NVML_EXPORT void fake_nvml_reset(unsigned int n_devices) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  reset_locked(s, n_devices);
}

FAKE_NVML_EXPORT void fake_nvml_set_trace(unsigned int dev, const double* t_s, const double* power_w, unsigned int n,
                                          double repeat_period_s, long long origin_mono_ns) {
  // Validate before taking the lock: a malformed trace leaves the old one in place.
  const char* problem = nullptr;
  if (t_s == nullptr || power_w == nullptr || n == 0) {
    problem = "needs n >= 1 points";
  } else if (!std::isfinite(repeat_period_s) || repeat_period_s < 0) {
    problem = "repeat_period_s must be finite and >= 0";
  } else {
    for (unsigned int i = 0; i < n && problem == nullptr; ++i) {
      if (!std::isfinite(t_s[i]) || !std::isfinite(power_w[i])) problem = "non-finite time or power";
      else if (power_w[i] < 0) problem = "negative power";
      else if (i > 0 && t_s[i] < t_s[i - 1]) problem = "times must be non-decreasing";
    }
  }
  const int64_t now_ns = mono_now_ns();
  const int64_t origin_ns = origin_mono_ns != 0 ? origin_mono_ns : now_ns;
  if (problem == nullptr && std::llabs(origin_ns / 1000 - now_ns / 1000) > kMaxOriginDistanceNs / 1000) {
    problem = "origin_mono_ns is not a CLOCK_MONOTONIC time within 100 days of now";
  }
  if (problem != nullptr) {
    std::fprintf(stderr, "fake_nvml: set_trace(device %u) ignored: %s\n", dev, problem);
    return;
  }
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  nvmlDevice_st* d = control_device(s, dev, "set_trace");
  if (d == nullptr) return;
  d->trace.set(std::vector<double>(t_s, t_s + n), std::vector<double>(power_w, power_w + n), repeat_period_s);
  d->origin_mono_ns = origin_ns;
}

FAKE_NVML_EXPORT void fake_nvml_set_sample_period_us(unsigned int dev, unsigned int period_us) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  nvmlDevice_st* d = control_device(s, dev, "set_sample_period_us");
  if (d == nullptr) return;
  if (period_us == 0 || period_us > kMaxSamplePeriodUs) {
    std::fprintf(stderr, "fake_nvml: set_sample_period_us(device %u, %u) ignored: must be in [1, %u]\n", dev,
                 period_us, kMaxSamplePeriodUs);
    return;
  }
  d->sample_period_ns = int64_t(period_us) * 1000;
}

FAKE_NVML_EXPORT void fake_nvml_set_ring_size(unsigned int dev, unsigned int n) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  nvmlDevice_st* d = control_device(s, dev, "set_ring_size");
  if (d == nullptr) return;
  if (n > kMaxRingSize) {
    std::fprintf(stderr, "fake_nvml: set_ring_size(device %u, %u) ignored: at most %u\n", dev, n, kMaxRingSize);
    return;
  }
  d->ring_size = n;
}

FAKE_NVML_EXPORT void fake_nvml_set_supported(unsigned int dev, int source, int supported) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  nvmlDevice_st* d = control_device(s, dev, "set_supported");
  if (d == nullptr) return;
  if (source < 0 || source >= FAKE_NVML_SOURCE_COUNT) {
    std::fprintf(stderr, "fake_nvml: set_supported: unknown source %d\n", source);
    return;
  }
  d->supported[source] = supported != 0;
}

FAKE_NVML_EXPORT void fake_nvml_fail(const char* function, int dev, unsigned int after_calls, int code) {
  const bool any_fn = function != nullptr && std::strcmp(function, "*") == 0;
  const int fn = any_fn ? -1 : find_fn(function);
  if (!any_fn && fn < 0) {
    std::fprintf(stderr, "fake_nvml: fail: unknown function '%s'\n", function ? function : "(null)");
    return;
  }
  if (dev < -1 || dev >= FAKE_NVML_MAX_DEVICES) {
    std::fprintf(stderr, "fake_nvml: fail: device %d out of range\n", dev);
    return;
  }
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (code == NVML_SUCCESS) {
    s.rules.erase(std::remove_if(s.rules.begin(), s.rules.end(),
                                 [&](const FailRule& r) { return r.fn == fn && r.dev == dev; }),
                  s.rules.end());
    return;
  }
  FailRule rule;
  rule.fn = fn;
  rule.dev = dev;
  rule.after_calls = after_calls;
  rule.code = code;
  s.rules.push_back(rule);
}

FAKE_NVML_EXPORT void fake_nvml_fail_init(int code) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.fail_init_code = code;
}

FAKE_NVML_EXPORT void fake_nvml_set_delay_us(const char* function, unsigned int delay_us) {
  const bool any_fn = function != nullptr && std::strcmp(function, "*") == 0;
  const int fn = any_fn ? -1 : find_fn(function);
  if (!any_fn && fn < 0) {
    std::fprintf(stderr, "fake_nvml: set_delay_us: unknown function '%s'\n", function ? function : "(null)");
    return;
  }
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  for (int i = 0; i < kFnCount; ++i) {
    if (i == fn || (any_fn && kFns[i].device_fn)) s.delay_us[i] = delay_us;
  }
}

FAKE_NVML_EXPORT unsigned long long fake_nvml_call_count(const char* function) {
  const bool any_fn = function != nullptr && std::strcmp(function, "*") == 0;
  const int fn = any_fn ? -1 : find_fn(function);
  if (!any_fn && fn < 0) {
    std::fprintf(stderr, "fake_nvml: call_count: unknown function '%s'\n", function ? function : "(null)");
    return 0;
  }
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!any_fn) return s.calls[fn];
  unsigned long long total = 0;
  for (unsigned long long c : s.calls) total += c;
  return total;
}

FAKE_NVML_EXPORT long long fake_nvml_origin_mono_ns(unsigned int dev) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  const nvmlDevice_st* d = control_device(s, dev, "origin_mono_ns");
  return d != nullptr ? d->origin_mono_ns : -1;
}

FAKE_NVML_EXPORT double fake_nvml_energy_j(unsigned int dev, long long from_mono_ns, long long to_mono_ns) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  const nvmlDevice_st* d = control_device(s, dev, "energy_j");
  if (d == nullptr) return 0.0;
  return static_cast<double>(d->trace.integral_j(d->rel_ns(from_mono_ns), d->rel_ns(to_mono_ns)));
}

FAKE_NVML_EXPORT void fake_nvml_set_realtime_shift_us(long long shift_us) {
  if (std::llabs(shift_us) > kMaxOriginDistanceNs / 1000) {
    std::fprintf(stderr, "fake_nvml: set_realtime_shift_us(%lld) ignored: at most 100 days\n", shift_us);
    return;
  }
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.stamp_minus_mono_ns.store(s.realtime_minus_mono_ns + shift_us * 1000);
}

FAKE_NVML_EXPORT long long fake_nvml_realtime_ns(void) {
  return mono_now_ns() + state().stamp_minus_mono_ns.load();
}

FAKE_NVML_EXPORT int fake_nvml_init_refcount(void) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.init_refcount;
}

namespace {

// At load time: the product may call nvmlInit_v2 before any test code had a chance to call fake_nvml_reset.
__attribute__((constructor)) void fake_nvml_load() {
  unsigned int n_devices = 1;
  if (const char* env = std::getenv("WATTSCOPE_FAKE_NVML_DEVICES")) {
    char* end = nullptr;
    const unsigned long parsed = std::strtoul(env, &end, 10);
    if (end != env && *end == '\0') {
      n_devices = static_cast<unsigned int>(std::min<unsigned long>(parsed, FAKE_NVML_MAX_DEVICES));
    } else {
      std::fprintf(stderr, "fake_nvml: WATTSCOPE_FAKE_NVML_DEVICES='%s' is not a number, using 1 device\n", env);
    }
  }
  fake_nvml_reset(n_devices);
}

}  // namespace
