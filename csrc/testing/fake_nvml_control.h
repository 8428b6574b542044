// Control API of the fake NVML library (libwattscope_fake_nvml.so).
//
// The fake is loaded by the product through the same dlopen path as the real libnvidia-ml.so.1
// (WATTSCOPE_NVML_PATH points at it). Test code opens the SAME path (ctypes.CDLL / dlopen), which returns the
// already-loaded instance, and drives it through these functions: a programmable power trace per device and
// programmable failures. Everything here is thread-safe and may be called while NVML calls are in flight.
//
// Clock: every *_mono_ns value is CLOCK_MONOTONIC nanoseconds. NVML-facing timestamps are CLOCK_REALTIME
// microseconds, derived from CLOCK_MONOTONIC with one realtime-minus-monotonic offset measured at reset, plus the
// shift of fake_nvml_set_realtime_shift_us. The product measures its own offset against fake_nvml_realtime_ns.
//
// Invalid arguments (device index >= FAKE_NVML_MAX_DEVICES, unknown function name, malformed trace) make the
// call a no-op and print one line starting with "fake_nvml:" to stderr, so a typo in a test is visible.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

#define FAKE_NVML_API __attribute__((visibility("default")))

#define FAKE_NVML_MAX_DEVICES 16
#define FAKE_NVML_DEFAULT_POWER_W 100.0
#define FAKE_NVML_DEFAULT_SAMPLE_PERIOD_US 20000u
#define FAKE_NVML_DEFAULT_RING_SIZE 120u
// The energy counter reads this many mJ at the trace origin ("energy before this test").
#define FAKE_NVML_ENERGY_BASE_MJ 123456789ull

// Sources for fake_nvml_set_supported.
enum {
  FAKE_NVML_SOURCE_SAMPLES = 0,         // nvmlDeviceGetSamples(NVML_TOTAL_POWER_SAMPLES)
  FAKE_NVML_SOURCE_INSTANT_FIELD = 1,   // field 186 in nvmlDeviceGetFieldValues
  FAKE_NVML_SOURCE_AVERAGE = 2,         // field 185 and nvmlDeviceGetPowerUsage
  FAKE_NVML_SOURCE_ENERGY = 3,          // nvmlDeviceGetTotalEnergyConsumption
  FAKE_NVML_SOURCE_CLOCKS_TEMP = 4,     // nvmlDeviceGetClockInfo and nvmlDeviceGetTemperature
  FAKE_NVML_SOURCE_COUNT = 5,
};

// Make n_devices devices (at most FAKE_NVML_MAX_DEVICES) with default settings: constant 100 W, origin = now,
// 20 ms sample period, ring of 120, every source supported. Clears failure rules, fail_init, delays and call
// counts, and re-measures the realtime-minus-monotonic offset. Leaves the nvmlInit reference count alone (that
// state belongs to the NVML clients in the process); see fake_nvml_init_refcount.
// At load time the library resets itself with $WATTSCOPE_FAKE_NVML_DEVICES devices (1 when unset).
FAKE_NVML_API void fake_nvml_reset(unsigned int n_devices);

// Piecewise-constant true power of device `dev`: power_w[i] on [t_s[i], t_s[i+1]) seconds after the origin,
// power_w[0] before t_s[0], power_w[n-1] after t_s[n-1]. repeat_period_s > 0 makes it periodic (the same lookup
// is applied to t modulo the period, in both time directions). origin_mono_ns == 0 means now.
// Requires n >= 1, finite non-decreasing t_s, finite power_w >= 0, an origin within 100 days of now. The
// arrays are copied.
// The signal is defined for all time, also before the origin; the origin is when the "driver was loaded" for
// the energy counter, and the phase reference of samples and of the 100 ms refresh grid.
FAKE_NVML_API void fake_nvml_set_trace(unsigned int dev, const double* t_s, const double* power_w, unsigned int n,
                                       double repeat_period_s, long long origin_mono_ns);

// Spacing of the buffered power samples (default 20000 µs; 1 µs to 100 s).
FAKE_NVML_API void fake_nvml_set_sample_period_us(unsigned int dev, unsigned int period_us);
// Number of samples the driver ring keeps (default 120, at most 1000000; 0 = the ring is always empty).
FAKE_NVML_API void fake_nvml_set_ring_size(unsigned int dev, unsigned int n);
// supported == 0: the functions of `source` (FAKE_NVML_SOURCE_*) return NVML_ERROR_NOT_SUPPORTED
// (per field for the fields of nvmlDeviceGetFieldValues, whose overall return stays NVML_SUCCESS).
FAKE_NVML_API void fake_nvml_set_supported(unsigned int dev, int source, int supported);

// After `after_calls` further calls of `function` that returned NVML_SUCCESS on device `dev` (-1: any device),
// every call of that function on that device returns `code` (sticky until reset). `function` is an exact NVML
// symbol name, or "*" for every function that acts on one device (the nvmlDevice* functions, handle lookups
// included). A named system function (nvmlSystemGet*, nvmlDeviceGetCount_v2, ...) is matched only by dev == -1.
// The count is over everything the rule matches: all devices for dev == -1, all device functions for "*".
// after_calls == 0 fails at once. nvmlErrorString cannot be failed or delayed. Rules stack; the first rule that
// has fired decides. code == 0 instead removes the rules of exactly that (function, dev) pair.
// Example, GPU lost after 10 good reads: fake_nvml_fail("nvmlDeviceGetSamples", 0, 10, 15).
FAKE_NVML_API void fake_nvml_fail(const char* function, int dev, unsigned int after_calls, int code);
// nvmlInit_v2 returns `code` without counting a reference (0: succeed again).
FAKE_NVML_API void fake_nvml_fail_init(int code);
// Make `function` ("*": every device function) take delay_us longer: half is slept before the value is read and
// half after, so the reading sits in the middle of the call as on real hardware (the energy counter takes ~4 ms).
// The lock is not held while sleeping: other threads are not blocked.
FAKE_NVML_API void fake_nvml_set_delay_us(const char* function, unsigned int delay_us);

// Calls of `function` so far, on all devices, whatever they returned ("*": all NVML functions together).
FAKE_NVML_API unsigned long long fake_nvml_call_count(const char* function);
// Trace origin of `dev` (CLOCK_MONOTONIC ns), -1 for an invalid device.
FAKE_NVML_API long long fake_nvml_origin_mono_ns(unsigned int dev);
// Exact integral in joules of the true signal of `dev` over [from_mono_ns, to_mono_ns] (negative if to < from).
FAKE_NVML_API double fake_nvml_energy_j(unsigned int dev, long long from_mono_ns, long long to_mono_ns);

// Steps the fake's realtime clock: from now on it reads CLOCK_MONOTONIC plus the offset measured at reset plus
// shift_us (0 after reset; negative = back in time; not cumulative). The step applies to every stamp handed out
// afterwards, those of the samples already in the ring included (a real driver keeps the stamps of samples taken
// before a step). One clock for all devices, as the driver has: a per-device shift would model nothing real.
FAKE_NVML_API void fake_nvml_set_realtime_shift_us(long long shift_us);
// The realtime clock the fake stamps with, in ns (shift included). Not NVML: the product resolves this optional
// symbol from the library it loads and measures its realtime offset against it (real NVML stamps with the kernel's
// CLOCK_REALTIME and has no such symbol), so a shift is a clock step for both sides. Lock-free.
FAKE_NVML_API long long fake_nvml_realtime_ns(void);

// Extra (not in the original brief): current nvmlInit_v2 reference count, so tests can check that the product
// shuts NVML down as often as it initialised it.
FAKE_NVML_API int fake_nvml_init_refcount(void);

#ifdef __cplusplus
}  // extern "C"
#endif
