// Native unit tests of NvmlLibrary and the Sampler thread, run against the fake NVML through the real dlopen path.
//
// Usage: test_sampler <path to libwattscope_fake_nvml.so>   (ctest passes it; tests/native.sh runs ctest under
// ASan/UBSan and TSan). No test framework: CHECK* record a failure and print `file:line: expr`, every test prints
// one line, and the last line is `N passed, M failed` (exit status 1 when M > 0).
//
// The product opens the fake with NvmlLibrary::open(path); the test opens the same path with dlopen, which returns
// the already-loaded instance, and steers it through the fake_nvml_* control functions (fake_nvml_control.h).
// Every test starts from fake_nvml_reset, and after every test the fake's nvmlInit reference count must be back to
// zero (every NvmlLibrary released, so every Sampler too).
//
// Timing: the fake computes everything from CLOCK_MONOTONIC at call time, so the tests sleep real time. Bounds are
// loose enough for a sanitizer build on a loaded 2-core machine and tight enough to catch a real defect (a sampler
// that never wakes, a stop that waits a whole period, a snapshot that waits for an NVML call).

#include <dlfcn.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "fake_nvml_control.h"
#include "check.hpp"
#include "wattscope/clock.hpp"
#include "wattscope/nvml_error.hpp"
#include "wattscope/nvml_library.hpp"
#include "wattscope/sampler.hpp"

#if defined(__SANITIZE_THREAD__)
#define WATTSCOPE_TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define WATTSCOPE_TEST_TSAN 1
#endif
#endif

namespace {

using wattscope::DeviceSnapshot;
using wattscope::mono_now_ns;
using wattscope::NvmlError;
using wattscope::NvmlFailure;
using wattscope::NvmlLibrary;
using wattscope::Sampler;
using wattscope::SamplerConfig;
using wattscope::SamplerStats;
using wattscope::Series;

// ---------------------------------------------------------------------------------------------------------------
using wattscope_test::report_failure;
using wattscope_test::TestCase;

// ---------------------------------------------------------------------------------------------------------------
// The fake's control API, resolved from the same path the product opens.

struct FakeControl {
  decltype(&fake_nvml_reset) reset = nullptr;
  decltype(&fake_nvml_set_trace) set_trace = nullptr;
  decltype(&fake_nvml_set_sample_period_us) set_sample_period_us = nullptr;
  decltype(&fake_nvml_set_ring_size) set_ring_size = nullptr;
  decltype(&fake_nvml_set_supported) set_supported = nullptr;
  decltype(&fake_nvml_fail) fail = nullptr;
  decltype(&fake_nvml_fail_init) fail_init = nullptr;
  decltype(&fake_nvml_set_delay_us) set_delay_us = nullptr;
  decltype(&fake_nvml_call_count) call_count = nullptr;
  decltype(&fake_nvml_origin_mono_ns) origin_mono_ns = nullptr;
  decltype(&fake_nvml_energy_j) energy_j = nullptr;
  decltype(&fake_nvml_init_refcount) init_refcount = nullptr;
  decltype(&fake_nvml_set_realtime_shift_us) set_realtime_shift_us = nullptr;
  decltype(&fake_nvml_realtime_ns) realtime_ns = nullptr;
};

FakeControl fake;
std::string g_fake_path;

template <typename Fn>
bool resolve(void* dl, const char* name, Fn& out) {
  out = reinterpret_cast<Fn>(dlsym(dl, name));
  if (out == nullptr) std::printf("missing control symbol %s in %s\n", name, g_fake_path.c_str());
  return out != nullptr;
}

bool load_fake(const std::string& path) {
  g_fake_path = path;
  // Never closed: the product's NvmlLibrary never dlcloses either, and both share this one instance.
  void* dl = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (dl == nullptr) {
    const char* why = dlerror();
    std::printf("cannot dlopen %s: %s\n", path.c_str(), why != nullptr ? why : "?");
    return false;
  }
  bool ok = true;
  ok &= resolve(dl, "fake_nvml_reset", fake.reset);
  ok &= resolve(dl, "fake_nvml_set_trace", fake.set_trace);
  ok &= resolve(dl, "fake_nvml_set_sample_period_us", fake.set_sample_period_us);
  ok &= resolve(dl, "fake_nvml_set_ring_size", fake.set_ring_size);
  ok &= resolve(dl, "fake_nvml_set_supported", fake.set_supported);
  ok &= resolve(dl, "fake_nvml_fail", fake.fail);
  ok &= resolve(dl, "fake_nvml_fail_init", fake.fail_init);
  ok &= resolve(dl, "fake_nvml_set_delay_us", fake.set_delay_us);
  ok &= resolve(dl, "fake_nvml_call_count", fake.call_count);
  ok &= resolve(dl, "fake_nvml_origin_mono_ns", fake.origin_mono_ns);
  ok &= resolve(dl, "fake_nvml_energy_j", fake.energy_j);
  ok &= resolve(dl, "fake_nvml_init_refcount", fake.init_refcount);
  ok &= resolve(dl, "fake_nvml_set_realtime_shift_us", fake.set_realtime_shift_us);
  ok &= resolve(dl, "fake_nvml_realtime_ns", fake.realtime_ns);
  return ok;
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers.

constexpr int64_t kMs = 1'000'000;
constexpr int64_t kSamplePeriodNs = 20 * kMs;  // the fake's default (FAKE_NVML_DEFAULT_SAMPLE_PERIOD_US)
constexpr int kSamples = static_cast<int>(Series::kSamplesMw);
constexpr int kInstant = static_cast<int>(Series::kInstantMw);
constexpr int kEnergy = static_cast<int>(Series::kEnergyMj);

int64_t abs_ns(int64_t v) { return v < 0 ? -v : v; }

void sleep_ms(int64_t ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

std::shared_ptr<NvmlLibrary> open_fake() { return NvmlLibrary::open(g_fake_path); }

// Constant true power from now on (origin = now: the sample grid starts at the call).
void set_constant_w(unsigned int dev, double watts) {
  const double t_s[] = {0.0};
  const double power_w[] = {watts};
  fake.set_trace(dev, t_s, power_w, 1, 0.0, 0);
}

// The cadences the assertions below assume, pinned so that a change of a default does not silently change what a
// test exercises (test_default_cadence alone uses the defaults, on purpose).
SamplerConfig pinned_config() {
  SamplerConfig cfg;
  cfg.drain_period_ns = 50 * kMs;
  cfg.instant_period_ns = 20 * kMs;
  cfg.average_period_ns = 100 * kMs;
  cfg.energy_period_ns = 100 * kMs;
  cfg.telemetry_period_ns = 500 * kMs;
  cfg.offset_period_ns = 1000 * kMs;
  return cfg;
}

// Every cadence 10 s: after its first tick the thread sleeps unless something wakes it.
SamplerConfig idle_config() {
  SamplerConfig cfg = pinned_config();
  cfg.drain_period_ns = cfg.instant_period_ns = cfg.average_period_ns = cfg.energy_period_ns =
      cfg.telemetry_period_ns = cfg.offset_period_ns = 10'000 * kMs;
  return cfg;
}

DeviceSnapshot snapshot_all(const Sampler& s, int slot) { return s.snapshot(slot, INT64_MIN, INT64_MAX); }

// Runs f and returns the NvmlError code it threw, -1 if it returned, -2 for another exception.
int nvml_error_code(const std::function<void()>& f, std::string* call = nullptr) {
  try {
    f();
  } catch (const NvmlError& e) {
    if (call != nullptr) *call = e.call();
    return e.code();
  } catch (...) {
    return -2;
  }
  return -1;
}

// Distance of t from the nearest point of the fake's sample grid origin + k * period.
int64_t grid_offset_ns(int64_t t_ns, int64_t origin_ns, int64_t period_ns) {
  int64_t r = (t_ns - origin_ns) % period_ns;
  if (r < 0) r += period_ns;
  return std::min(r, period_ns - r);
}

bool strictly_increasing(const std::vector<int64_t>& t) {
  for (std::size_t i = 1; i < t.size(); ++i)
    if (t[i] <= t[i - 1]) return false;
  return true;
}

int64_t max_spacing_error_ns(const std::vector<int64_t>& t, int64_t period_ns) {
  int64_t worst = 0;
  for (std::size_t i = 1; i < t.size(); ++i) worst = std::max(worst, abs_ns(t[i] - t[i - 1] - period_ns));
  return worst;
}

// Distance from x to the closest element of the sorted t (INT64_MAX when t is empty).
int64_t distance_to_nearest_ns(const std::vector<int64_t>& t, int64_t x) {
  auto it = std::lower_bound(t.begin(), t.end(), x);
  int64_t best = INT64_MAX;
  if (it != t.end()) best = std::min(best, abs_ns(*it - x));
  if (it != t.begin()) best = std::min(best, abs_ns(*(it - 1) - x));
  return best;
}

template <typename Pred>
bool wait_until_true(Pred pred, int64_t timeout_ms) {
  const int64_t deadline = mono_now_ns() + timeout_ms * kMs;
  while (!pred()) {
    if (mono_now_ns() > deadline) return false;
    sleep_ms(2);
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// NvmlLibrary.

void test_library_open_balances_init() {
  fake.reset(2);
  CHECK_EQ(fake.init_refcount(), 0);
  {
    auto lib = open_fake();
    CHECK_EQ(fake.init_refcount(), 1);
    CHECK_EQ(lib->device_count(), 2u);
    CHECK_EQ(lib->path(), g_fake_path);
    const wattscope::DeviceInfo info = lib->info(1);
    CHECK_EQ(info.nvml_index, 1u);
    CHECK_EQ(info.pci_bus_id, std::string("00000000:11:00.0"));
    CHECK_EQ(info.power_limit_mw, 700000u);
    CHECK_EQ(nvml_error_code([&] { lib->handle(2); }), 2);  // index out of range: INVALID_ARGUMENT
  }
  CHECK_EQ(fake.init_refcount(), 0);
}

void test_init_failure_throws_code() {
  fake.fail_init(9);  // driver not loaded
  std::string call;
  CHECK_EQ(nvml_error_code([] { open_fake(); }, &call), 9);
  CHECK_EQ(call, std::string("nvmlInit_v2"));
  CHECK_EQ(fake.init_refcount(), 0);  // a failed init takes no reference and the library must not shut down
  fake.fail_init(0);
  CHECK_EQ(nvml_error_code([] { open_fake(); }), -1);
}

void test_missing_library_code_12() {
  std::string call;
  CHECK_EQ(nvml_error_code([] { NvmlLibrary::open("/nonexistent/wattscope-test/libnvidia-ml.so.1"); }, &call), 12);
  CHECK_EQ(call, std::string("dlopen"));
  try {
    NvmlLibrary::open("/nonexistent/wattscope-test/libnvidia-ml.so.1");
  } catch (const NvmlError& e) {
    // The message names the path tried, so a user can see what was searched.
    CHECK(std::string(e.what()).find("/nonexistent/wattscope-test/libnvidia-ml.so.1") != std::string::npos);
  }
}

void test_add_device_errors() {
  fake.reset(4);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  CHECK_EQ(s.add_device(0), 0);
  CHECK_EQ(s.add_device(0), 0);  // same NVML index, same slot
  CHECK_EQ(s.device_count(), 1);
  // No power source at all: a clear error instead of a device that never reports.
  for (int source : {FAKE_NVML_SOURCE_SAMPLES, FAKE_NVML_SOURCE_INSTANT_FIELD, FAKE_NVML_SOURCE_AVERAGE,
                     FAKE_NVML_SOURCE_ENERGY})
    fake.set_supported(1, source, 0);
  CHECK_EQ(nvml_error_code([&] { s.add_device(1); }), 3);
  // A lost GPU cannot be added: whether its handle lookup or a probe of a source says so.
  fake.fail("*", 2, 0, 15);
  CHECK_EQ(nvml_error_code([&] { s.add_device(2); }), 15);
  fake.fail("nvmlDeviceGetSamples", 3, 0, 15);
  CHECK_EQ(nvml_error_code([&] { s.add_device(3); }), 15);
  CHECK_EQ(s.device_count(), 1);
  try {
    s.snapshot(5, 0, 1);
    CHECK(!"snapshot of a slot that does not exist should throw");
  } catch (const std::out_of_range&) {
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The sampler thread against a well-behaved device.

void test_samples_constant_power() {
  fake.reset(1);
  set_constant_w(0, 250.0);
  const int64_t origin_ns = fake.origin_mono_ns(0);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  const int slot = s.add_device(0);
  const int64_t t0 = mono_now_ns();
  s.acquire();
  sleep_ms(500);
  const int64_t t1 = mono_now_ns();
  CHECK(s.wait_covered(t1, 1000 * kMs));
  const int64_t after_ns = mono_now_ns();
  const DeviceSnapshot snap = s.snapshot(slot, t0, t1);
  const auto& t = snap.series[kSamples].t_ns;
  const auto& v = snap.series[kSamples].value;
  // 0.5 s of 20 ms samples is 25, plus up to 2 before t0 (the snapshot's margin) and up to 2 after t1.
  CHECK_GE(t.size(), static_cast<std::size_t>(23));
  CHECK_LE(t.size(), static_cast<std::size_t>(30));
  CHECK_EQ(t.size(), v.size());
  CHECK(strictly_increasing(t));
  CHECK_LE(max_spacing_error_ns(t, kSamplePeriodNs), static_cast<int64_t>(2000));  // µs stamps
  for (int64_t mw : v) CHECK_EQ(mw, static_cast<int64_t>(250000));
  CHECK((snap.supported_mask & 0x1Fu) == 0x1Fu);
  CHECK_EQ(snap.sample_period_ns, kSamplePeriodNs);
  CHECK(!snap.lost);

  // Clock conversion: every REALTIME µs stamp lands back on the fake's monotonic sample grid, and the newest
  // sample after wait_covered(t1) was taken at or after t1 and not in the future.
  const DeviceSnapshot all = snapshot_all(s, slot);
  const auto& ta = all.series[kSamples].t_ns;
  CHECK(!ta.empty());
  if (!ta.empty()) {
    for (int64_t ti : ta) CHECK_LE(grid_offset_ns(ti, origin_ns, kSamplePeriodNs), 2 * kMs);
    CHECK_GE(ta.back(), t1);
    CHECK_LE(ta.back(), after_ns + 2 * kMs);
    CHECK_GE(ta.back(), after_ns - kSamplePeriodNs - 100 * kMs);
  }
  // The first drain reads the whole driver ring (120 × 20 ms = 2.4 s back), which is before the trace origin.
  CHECK_GE(all.samples_total, static_cast<uint64_t>(120));
  CHECK_EQ(all.samples_total, static_cast<uint64_t>(ta.size()));
  CHECK(s.failures().empty());
  const SamplerStats st = s.stats();
  CHECK(st.running);
  CHECK_EQ(st.threads_started, static_cast<uint64_t>(1));
  CHECK_GE(st.drains, static_cast<uint64_t>(5));
  CHECK_LE(abs_ns(st.realtime_offset_uncertainty_ns), 1 * kMs);
  // The other sources are polled too.
  CHECK_GE(all.series[kInstant].t_ns.size(), static_cast<std::size_t>(10));
  CHECK_GE(all.series[kEnergy].t_ns.size(), static_cast<std::size_t>(3));
  s.release();
}

void test_samples_integrate_square_wave() {
  fake.reset(1);
  // 300 W for 50 ms, 100 W for 50 ms, repeating: 20 ms samples see 300, 300, 200, 100, 100 W.
  const double t_s[] = {0.0, 0.05};
  const double power_w[] = {300.0, 100.0};
  fake.set_trace(0, t_s, power_w, 2, 0.1, 0);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  const int slot = s.add_device(0);
  s.acquire();
  sleep_ms(400);
  CHECK(s.wait_covered(mono_now_ns(), 1000 * kMs));
  const DeviceSnapshot snap = snapshot_all(s, slot);
  const auto& t = snap.series[kSamples].t_ns;
  const auto& v = snap.series[kSamples].value;
  CHECK_GE(t.size(), static_cast<std::size_t>(100));
  if (t.size() >= 2) {
    // Each sample is the mean over the period before it, so the samples tile [t.front(), t.back()] exactly.
    double sum_j = 0.0;
    for (std::size_t i = 1; i < t.size(); ++i) sum_j += static_cast<double>(v[i]) * 1e-3 * 1e-9 *
                                                        static_cast<double>(t[i] - t[i - 1]);
    const double exact_j = fake.energy_j(0, t.front(), t.back());
    CHECK_GT(exact_j, 1.0);
    // One sample more or less would be ≥ 2 J off; stamps are µs-rounded (≤ 1 µs × 300 W per sample).
    CHECK_LT(std::fabs(sum_j - exact_j), 0.01);
    bool saw_300 = false, saw_200 = false, saw_100 = false;
    for (int64_t mw : v) {
      saw_300 |= mw == 300000;
      saw_200 |= mw == 200000;
      saw_100 |= mw == 100000;
      CHECK(mw == 300000 || mw == 200000 || mw == 100000);
    }
    CHECK(saw_300 && saw_200 && saw_100);
  }
  s.release();
}

void test_default_cadence() {
  fake.reset(1);
  auto lib = open_fake();
  Sampler s(lib, SamplerConfig{});
  const int slot = s.add_device(0);
  // Calls from here on are the thread's (add_device probed each source once).
  const unsigned long long drains0 = fake.call_count("nvmlDeviceGetSamples");
  const unsigned long long counter0 = fake.call_count("nvmlDeviceGetTotalEnergyConsumption");
  const unsigned long long clock0 = fake.call_count("nvmlDeviceGetClockInfo");
  s.acquire();
  sleep_ms(1200);
  // Drains every 250 ms (0, 250, ..., 1000 ms; a late one is skipped), the counter every 5 s and the SM clock every
  // 1 s: the cadences that keep the thread's CPU low. Drained at 100 ms, the counter at 1 Hz or the telemetry at
  // 2 Hz, these counts would be 12, 2 and 3.
  const unsigned long long drains = fake.call_count("nvmlDeviceGetSamples") - drains0;
  CHECK_GE(drains, 3ull);
  CHECK_LE(drains, 6ull);
  CHECK_EQ(fake.call_count("nvmlDeviceGetTotalEnergyConsumption") - counter0, 1ull);
  CHECK_LE(fake.call_count("nvmlDeviceGetClockInfo") - clock0, 2ull);
  CHECK(s.wait_covered(mono_now_ns(), 1000 * kMs));
  // ... and lose no sample: the fake's ring of 120 × 20 ms outlasts a drain period ten times over.
  const DeviceSnapshot snap = snapshot_all(s, slot);
  CHECK(snap.overrun_from_ns.empty());
  CHECK(snap.overrun_to_ns.empty());
  CHECK_EQ(snap.overruns, 0ull);
  CHECK_EQ(s.stats().overruns, 0ull);
  CHECK_LE(max_spacing_error_ns(snap.series[kSamples].t_ns, kSamplePeriodNs), static_cast<int64_t>(2000));
  CHECK_GE(snap.series[kSamples].t_ns.size(), static_cast<std::size_t>(170));  // 120 from the ring + ~60 new
  CHECK_EQ(snap.dropped[kSamples], static_cast<uint64_t>(0));
  s.release();
}

void test_overruns_when_ring_wraps() {
  fake.reset(1);
  fake.set_ring_size(0, 3);  // the driver keeps 60 ms ...
  SamplerConfig cfg = pinned_config();
  cfg.drain_period_ns = 250 * kMs;  // ... and is drained every 250 ms: ~190 ms lost each time
  auto lib = open_fake();
  Sampler s(lib, cfg);
  const int slot = s.add_device(0);
  s.acquire();
  sleep_ms(900);
  const DeviceSnapshot snap = snapshot_all(s, slot);
  CHECK_EQ(snap.overrun_from_ns.size(), snap.overrun_to_ns.size());
  CHECK_GE(snap.overrun_from_ns.size(), static_cast<std::size_t>(2));
  CHECK_EQ(snap.overruns, static_cast<uint64_t>(snap.overrun_from_ns.size()));
  CHECK_EQ(s.stats().overruns, snap.overruns);
  for (std::size_t i = 0; i < snap.overrun_from_ns.size() && i < snap.overrun_to_ns.size(); ++i) {
    const int64_t len = snap.overrun_to_ns[i] - snap.overrun_from_ns[i];
    CHECK_GT(len, 2 * kSamplePeriodNs);  // above overrun_factor 2.5 × 20 ms ...
    CHECK_LT(len, 400 * kMs);            // ... and about one drain period
  }
  // The edges are the samples on either side: the last one stored by a drain and the oldest the next one found.
  const auto& t = snap.series[kSamples].t_ns;
  for (std::size_t i = 0; i < snap.overrun_from_ns.size(); ++i) {
    CHECK_EQ(distance_to_nearest_ns(t, snap.overrun_from_ns[i]), static_cast<int64_t>(0));
    CHECK_EQ(distance_to_nearest_ns(t, snap.overrun_to_ns[i]), static_cast<int64_t>(0));
  }
  // A range that ends before every overrun lists none, but the device's count stays.
  if (!t.empty()) {
    const DeviceSnapshot early = s.snapshot(slot, t.front() - 1, t.front());
    CHECK(early.overrun_from_ns.empty());
    CHECK_EQ(early.overruns, snap.overruns);
  }
  s.release();
}

void test_samples_not_supported_uses_instant() {
  fake.reset(1);
  set_constant_w(0, 250.0);
  fake.set_supported(0, FAKE_NVML_SOURCE_SAMPLES, 0);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  const int slot = s.add_device(0);
  s.acquire();
  sleep_ms(400);
  CHECK(s.wait_covered(mono_now_ns(), 1000 * kMs));  // the best source is now the instant field
  const DeviceSnapshot snap = snapshot_all(s, slot);
  CHECK_EQ(snap.supported_mask & 1u, 0u);
  CHECK_EQ(snap.supported_mask & 2u, 2u);
  CHECK(snap.series[kSamples].t_ns.empty());
  CHECK_GE(snap.series[kInstant].t_ns.size(), static_cast<std::size_t>(10));  // polled every 20 ms
  for (int64_t mw : snap.series[kInstant].value) CHECK_EQ(mw, static_cast<int64_t>(250000));
  CHECK(strictly_increasing(snap.series[kInstant].t_ns));
  CHECK(s.failures().empty());  // NOT_SUPPORTED is not a failure
  s.release();
}

void test_samples_become_unsupported_mid_run() {
  fake.reset(1);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  const int slot = s.add_device(0);
  s.acquire();
  sleep_ms(200);
  fake.set_supported(0, FAKE_NVML_SOURCE_SAMPLES, 0);
  sleep_ms(200);
  const DeviceSnapshot snap = snapshot_all(s, slot);
  CHECK_EQ(snap.supported_mask & 1u, 0u);
  CHECK(!snap.series[kSamples].t_ns.empty());  // kept
  CHECK(!snap.lost);
  CHECK(s.failures().empty());
  // Coverage falls back to the next source instead of waiting for samples that will never come.
  const int64_t t_wait = mono_now_ns();
  CHECK(s.wait_covered(t_wait, 1000 * kMs));
  CHECK_LT(mono_now_ns() - t_wait, 500 * kMs);
  s.release();
}

// ---------------------------------------------------------------------------------------------------------------
// Failures.

void test_gpu_lost_mid_run() {
  fake.reset(2);
  set_constant_w(0, 250.0);
  set_constant_w(1, 150.0);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  const int slot0 = s.add_device(0);
  const int slot1 = s.add_device(1);
  s.acquire();
  sleep_ms(200);
  const int64_t t_fail = mono_now_ns();
  fake.fail("*", 0, 5, 15);  // five more good calls on GPU 0, then "GPU is lost" for ever
  sleep_ms(300);

  const DeviceSnapshot lost = snapshot_all(s, slot0);
  CHECK(lost.lost);
  const auto& t0 = lost.series[kSamples].t_ns;
  CHECK_GE(t0.size(), static_cast<std::size_t>(120));  // the samples from before the loss are kept
  if (!t0.empty()) CHECK_LT(t0.front(), t_fail);
  for (int64_t mw : lost.series[kSamples].value) CHECK_EQ(mw, static_cast<int64_t>(250000));

  const std::vector<NvmlFailure> failures = s.failures();
  int lost_failures = 0;
  for (const NvmlFailure& f : failures) {
    CHECK_EQ(f.device_slot, slot0);  // nothing went wrong on GPU 1
    if (f.code == 15) {
      ++lost_failures;
      CHECK_EQ(f.message, std::string("GPU is lost"));
      CHECK(!f.call.empty());
      CHECK_GE(f.t_ns, t_fail);
    }
  }
  CHECK_GE(lost_failures, 1);

  // The thread keeps sampling GPU 1 and stops polling GPU 0.
  const unsigned long long calls_before = fake.call_count("*");
  sleep_ms(200);
  const DeviceSnapshot alive = snapshot_all(s, slot1);
  CHECK(!alive.lost);
  CHECK(!alive.series[kSamples].t_ns.empty());
  if (!alive.series[kSamples].t_ns.empty()) CHECK_GT(alive.series[kSamples].t_ns.back(), t_fail + 300 * kMs);
  for (int64_t mw : alive.series[kSamples].value) CHECK_EQ(mw, static_cast<int64_t>(150000));
  CHECK_GT(fake.call_count("*"), calls_before);
  CHECK_EQ(s.failures().size(), failures.size());  // no further failures: GPU 0 is no longer polled
  CHECK(s.stats().running);
  // wait_covered waits for live devices only.
  CHECK(s.wait_covered(mono_now_ns(), 1000 * kMs));
  s.release();
}

// ---------------------------------------------------------------------------------------------------------------
// Lifecycle.

void test_stop_wakes_thread_at_once() {
  fake.reset(1);
  SamplerConfig cfg = pinned_config();
  cfg.drain_period_ns = cfg.instant_period_ns = cfg.average_period_ns = cfg.energy_period_ns =
      cfg.telemetry_period_ns = cfg.offset_period_ns = 10'000 * kMs;
  auto lib = open_fake();
  Sampler s(lib, cfg);
  s.add_device(0);
  s.acquire();
  CHECK(wait_until_true([&] { return s.stats().ticks >= 1; }, 1000));
  sleep_ms(50);  // the thread is now asleep until its next 10 s deadline
  const int64_t t = mono_now_ns();
  s.stop();
  const int64_t stop_ns = mono_now_ns() - t;
  CHECK_LT(stop_ns, 100 * kMs);
  CHECK(!s.stats().running);
  // acquire() after stop() starts a new thread.
  s.acquire();
  CHECK(s.stats().running);
  CHECK_EQ(s.stats().threads_started, static_cast<uint64_t>(2));
  s.release();
  const int64_t t2 = mono_now_ns();
  s.stop();
  CHECK_LT(mono_now_ns() - t2, 100 * kMs);
}

void test_linger_then_acquire_restarts() {
  fake.reset(1);
  SamplerConfig cfg = pinned_config();
  cfg.linger_ns = 100 * kMs;
  auto lib = open_fake();
  Sampler s(lib, cfg);
  const int slot = s.add_device(0);
  s.acquire();
  sleep_ms(200);
  CHECK(s.stats().running);
  const int64_t t_release = mono_now_ns();
  s.release();
  CHECK(wait_until_true([&] { return !s.stats().running; }, 1000));
  const int64_t stopped_after = mono_now_ns() - t_release;
  CHECK_GE(stopped_after, 90 * kMs);  // it lingered ...
  CHECK_LT(stopped_after, 600 * kMs);  // ... and then stopped by itself
  CHECK_EQ(s.stats().threads_started, static_cast<uint64_t>(1));

  const DeviceSnapshot before = snapshot_all(s, slot);
  CHECK(!before.series[kSamples].t_ns.empty());  // data kept
  const unsigned long long calls = fake.call_count("nvmlDeviceGetSamples");
  sleep_ms(150);
  CHECK_EQ(fake.call_count("nvmlDeviceGetSamples"), calls);  // really stopped
  CHECK_EQ(snapshot_all(s, slot).samples_total, before.samples_total);

  s.acquire();
  CHECK(s.stats().running);
  CHECK_EQ(s.stats().threads_started, static_cast<uint64_t>(2));
  CHECK(s.wait_covered(mono_now_ns(), 1000 * kMs));
  const DeviceSnapshot after = snapshot_all(s, slot);
  CHECK_GT(after.samples_total, before.samples_total);
  // The new thread continues where the old one stopped: the driver ring (2.4 s) still held the samples taken
  // meanwhile, so the stream has no hole and no repeat.
  CHECK(after.overrun_from_ns.empty());
  CHECK(strictly_increasing(after.series[kSamples].t_ns));
  CHECK_LE(max_spacing_error_ns(after.series[kSamples].t_ns, kSamplePeriodNs), static_cast<int64_t>(2000));

  // Stopped for longer than the driver ring holds (5 × 20 ms here): the restart reports one overrun, from the last
  // sample before the stop to the oldest one the ring still had.
  s.release();
  CHECK(wait_until_true([&] { return !s.stats().running; }, 1000));
  fake.set_ring_size(0, 5);
  const DeviceSnapshot stopped = snapshot_all(s, slot);
  sleep_ms(300);
  s.acquire();
  CHECK(s.wait_covered(mono_now_ns(), 1000 * kMs));
  const DeviceSnapshot overran = snapshot_all(s, slot);
  CHECK_EQ(overran.overrun_from_ns.size(), static_cast<std::size_t>(1));
  CHECK_EQ(overran.overruns, 1ull);
  if (overran.overrun_from_ns.size() == 1 && !stopped.series[kSamples].t_ns.empty()) {
    CHECK_EQ(overran.overrun_from_ns[0], stopped.series[kSamples].t_ns.back());
    CHECK_GT(overran.overrun_to_ns[0] - overran.overrun_from_ns[0], 200 * kMs);
  }
  s.release();
}

void test_wait_covered_true_promptly() {
  fake.reset(1);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  s.add_device(0);
  // Not acquired: wait_covered holds the thread itself while it waits.
  const int64_t t = mono_now_ns();
  CHECK(s.wait_covered(t, 2000 * kMs));
  const int64_t waited = mono_now_ns() - t;
  // A sample stamped after t exists within 20 ms and the next drain is ≤ 50 ms away.
  CHECK_LT(waited, 250 * kMs);
  CHECK_GE(s.snapshot(0, INT64_MIN, INT64_MAX).series[kSamples].t_ns.back(), t);
  CHECK(s.stats().running);  // lingering after the wait
}

void test_wait_covered_false_at_timeout() {
  fake.reset(2);
  fake.set_ring_size(1, 0);  // GPU 1 supports buffered samples but its ring stays empty
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  s.add_device(0);
  const int slot1 = s.add_device(1);
  CHECK_EQ(s.snapshot(slot1, INT64_MIN, INT64_MAX).supported_mask & 1u, 1u);
  s.acquire();
  const int64_t t = mono_now_ns();
  CHECK(!s.wait_covered(t, 300 * kMs));
  const int64_t waited = mono_now_ns() - t;
  CHECK_GE(waited, 295 * kMs);
  CHECK_LT(waited, 800 * kMs);
  // The instant field of both GPUs does deliver.
  const int64_t t2 = mono_now_ns();
  CHECK(s.wait_covered(t2, 1000 * kMs, kInstant));
  CHECK_LT(mono_now_ns() - t2, 500 * kMs);
  CHECK(s.failures().empty());  // an empty ring (NOT_FOUND) is not a failure
  s.release();
}

void test_concurrent_snapshots() {
  fake.reset(2);
  set_constant_w(0, 250.0);
  set_constant_w(1, 150.0);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  s.add_device(0);
  s.add_device(1);
  s.acquire();
  const int64_t t0 = mono_now_ns();
  const int64_t end_ns = t0 + 400 * kMs;
  std::atomic<int> iterations{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 4; ++r) {
    readers.emplace_back([&, r] {
      while (mono_now_ns() < end_ns) {
        const int slot = r % 2;
        const DeviceSnapshot snap = s.snapshot(slot, t0 - 100 * kMs, INT64_MAX);
        for (int i = 0; i < wattscope::kSeriesCount; ++i)
          CHECK_EQ(snap.series[i].t_ns.size(), snap.series[i].value.size());
        CHECK(strictly_increasing(snap.series[kSamples].t_ns));
        const int64_t want_mw = slot == 0 ? 250000 : 150000;
        for (int64_t mw : snap.series[kSamples].value) CHECK_EQ(mw, want_mw);
        (void)s.stats();
        (void)s.failures();
        (void)s.device_count();
        iterations.fetch_add(1);
      }
    });
  }
  // Meanwhile the owner keeps poking the thread.
  while (mono_now_ns() < end_ns) {
    s.request_drain();
    s.acquire();
    s.release();
    (void)s.wait_covered(mono_now_ns() - 30 * kMs, 50 * kMs);
  }
  for (auto& th : readers) th.join();
  CHECK_GE(iterations.load(), 40);
  CHECK(s.failures().empty());
  s.release();
}

void test_destroy_running_sampler_joins() {
  fake.reset(1);
  auto lib = open_fake();
  auto s = std::make_unique<Sampler>(lib, pinned_config());
  s->add_device(0);
  s->acquire();  // never released: the destructor must stop it anyway
  sleep_ms(100);
  CHECK(s->stats().running);
  const int64_t t = mono_now_ns();
  s.reset();
  CHECK_LT(mono_now_ns() - t, 200 * kMs);
  const unsigned long long calls = fake.call_count("*");
  sleep_ms(100);
  CHECK_EQ(fake.call_count("*"), calls);  // no thread left calling NVML
  CHECK_EQ(lib.use_count(), 1L);          // the sampler let go of the library
}

void test_slow_energy_counter_does_not_block_snapshot() {
  fake.reset(1);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  const int slot = s.add_device(0);
  fake.set_delay_us("nvmlDeviceGetTotalEnergyConsumption", 20000);  // 20 ms per counter read
  s.acquire();
  sleep_ms(100);
  // The fake counts a call when it starts: a change of the count means a 20 ms read has just begun.
  const char* kCounter = "nvmlDeviceGetTotalEnergyConsumption";
  unsigned long long seen = fake.call_count(kCounter);
  int in_flight = 0;
  int64_t worst_ns = 0;
  const int64_t deadline = mono_now_ns() + 1500 * kMs;
  while (in_flight < 5 && mono_now_ns() < deadline) {
    const unsigned long long now_count = fake.call_count(kCounter);
    if (now_count == seen) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      continue;
    }
    seen = now_count;
    const int64_t t = mono_now_ns();
    const DeviceSnapshot snap = s.snapshot(slot, INT64_MIN, INT64_MAX);
    worst_ns = std::max(worst_ns, mono_now_ns() - t);
    CHECK(!snap.series[kSamples].t_ns.empty());
    ++in_flight;
  }
  CHECK_GE(in_flight, 3);
  CHECK_LT(worst_ns, 5 * kMs);
  CHECK_GE(snapshot_all(s, slot).series[kEnergy].t_ns.size(), static_cast<std::size_t>(3));
  s.release();
}

// Also run under TSan: with GCC 12's libtsan a child of a multi-threaded fork works as long as it starts no thread
// (TSAN_OPTIONS die_after_fork), which this child does not. Were a TSan runtime to hang in such a child, the 5 s
// timeout below turns that into a failure, never a hung test.
void test_fork_child_destroys_its_copy() {
  fake.reset(1);
  auto lib = open_fake();
  auto s = std::make_unique<Sampler>(lib, pinned_config());
  const int slot = s->add_device(0);
  s->acquire();
  sleep_ms(100);
  // A slow counter read makes it likely that fork() lands while the thread is inside NVML (the atfork handler
  // then waits for the call to end).
  fake.set_delay_us("nvmlDeviceGetTotalEnergyConsumption", 10000);
  for (int round = 0; round < 3; ++round) {
    sleep_ms(37);
    std::fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
      // Child: the sampler thread does not exist here. Using the sampler is refused, and destroying it must
      // neither hang nor touch the parent's thread. _exit: no atexit handlers, no static destructors.
      int status = 0;
      try {
        (void)s->snapshot(slot, 0, 1);
        status = 3;
      } catch (const std::runtime_error&) {
      }
      s.reset();
      _exit(status);
    }
    CHECK_GT(pid, 0);
    if (pid < 0) break;
    int wstatus = 0;
    pid_t done = 0;
    const int64_t deadline = mono_now_ns() + 5000 * kMs;
    while ((done = waitpid(pid, &wstatus, WNOHANG)) == 0 && mono_now_ns() < deadline) sleep_ms(5);
    if (done == 0) {
      report_failure(__FILE__, __LINE__, "child did not exit within 5 s (round " + std::to_string(round) + ")");
      kill(pid, SIGKILL);
      waitpid(pid, &wstatus, 0);
      continue;
    }
    CHECK_EQ(done, pid);
    CHECK(WIFEXITED(wstatus));
    if (WIFEXITED(wstatus)) CHECK_EQ(WEXITSTATUS(wstatus), 0);
  }
  // The parent's sampler goes on.
  const int64_t t = mono_now_ns();
  CHECK(s->wait_covered(t, 1000 * kMs));
  CHECK(s->stats().running);
  CHECK(s->failures().empty());
  s.reset();
}

void test_bounded_capacity() {
  fake.reset(1);
  SamplerConfig cfg = pinned_config();
  cfg.capacity = 10;
  auto lib = open_fake();
  Sampler s(lib, cfg);
  const int slot = s.add_device(0);
  s.acquire();
  sleep_ms(300);
  CHECK(s.wait_covered(mono_now_ns(), 1000 * kMs));
  const DeviceSnapshot snap = snapshot_all(s, slot);
  const auto& t = snap.series[kSamples].t_ns;
  CHECK_EQ(t.size(), static_cast<std::size_t>(10));
  CHECK_GE(snap.samples_total, static_cast<uint64_t>(130));  // 120 from the first drain alone
  CHECK_EQ(snap.dropped[kSamples], snap.samples_total - 10);  // every sample is kept or counted
  CHECK_LE(max_spacing_error_ns(t, kSamplePeriodNs), static_cast<int64_t>(2000));  // the newest ten
  if (!t.empty()) CHECK_GT(t.back(), mono_now_ns() - 200 * kMs);
  CHECK_EQ(snap.series[kInstant].t_ns.size(), static_cast<std::size_t>(10));
  CHECK_GT(snap.dropped[kInstant], static_cast<uint64_t>(0));
  for (int i = 0; i < wattscope::kSeriesCount; ++i) CHECK_LE(snap.series[i].t_ns.size(), static_cast<std::size_t>(10));
  s.release();
}


// ---------------------------------------------------------------------------------------------------------------
// Energy counter on request, one publication per tick.

void test_request_counter_reads_at_once() {
  fake.reset(2);
  auto lib = open_fake();
  Sampler s(lib, idle_config());
  const int slot0 = s.add_device(0);
  const int slot1 = s.add_device(1);
  s.acquire();
  CHECK(wait_until_true([&] { return s.stats().ticks >= 1; }, 1000));
  sleep_ms(50);  // asleep until its next 10 s deadline
  const char* kCounter = "nvmlDeviceGetTotalEnergyConsumption";
  fake.set_delay_us(kCounter, 20000);  // 20 ms per read, the value taken in its middle
  const unsigned long long calls0 = fake.call_count(kCounter);

  const int64_t t_request = mono_now_ns();
  s.request_counter();
  const int64_t request_ns = mono_now_ns() - t_request;
  CHECK_LT(request_ns, 5 * kMs);  // the caller never makes the 20 ms call itself
  // A second request while the first reading is under way gets a reading of its own, after it.
  sleep_ms(5);
  const int64_t t_second = mono_now_ns();
  s.request_counter();

  auto readings = [&](int slot) { return snapshot_all(s, slot).series[kEnergy].t_ns.size(); };
  // Probe, first tick, and one reading per request on each GPU.
  CHECK(wait_until_true([&] { return readings(slot0) == 4 && readings(slot1) == 4; }, 1000));
  sleep_ms(50);
  CHECK_EQ(fake.call_count(kCounter) - calls0, 4ull);  // coalesced: never more than one pending reading
  // Read within a few ms of each request (stamped mid-call, 10 ms in), not at the next 10 s deadline.
  const DeviceSnapshot snap0 = snapshot_all(s, slot0);
  const auto& t0 = snap0.series[kEnergy].t_ns;
  CHECK_EQ(t0.size(), static_cast<std::size_t>(4));
  if (t0.size() == 4) {
    CHECK_GE(t0[2], t_request + 9 * kMs);
    CHECK_LT(t0[2] - t_request, 60 * kMs);
    CHECK_GE(t0[3], t_second + 9 * kMs);  // began after the second request: not served by the first reading
    CHECK_LT(t0[3] - t_second, 120 * kMs);
  }
  // The periodic cadence was left alone: no drain ran along with the readings.
  CHECK_EQ(s.stats().drains, 1ull);

  // A result's wait for the counter is served the same way.
  const int64_t t_wait = mono_now_ns();
  CHECK(s.wait_covered(t_wait, 1000 * kMs, kEnergy));
  CHECK_LT(mono_now_ns() - t_wait, 200 * kMs);
  CHECK(s.failures().empty());
  s.release();
}

void test_tick_publishes_at_once() {
  // The thread takes its lock once per tick and publishes everything the tick read in one go: a reader never sees
  // GPU 0's reading of a tick without GPU 1's, even while GPU 1's call is still running.
  fake.reset(2);
  auto lib = open_fake();
  Sampler s(lib, idle_config());
  const int slot0 = s.add_device(0);
  const int slot1 = s.add_device(1);
  s.acquire();
  CHECK(wait_until_true([&] { return s.stats().ticks >= 1; }, 1000));
  sleep_ms(20);
  fake.set_delay_us("nvmlDeviceGetTotalEnergyConsumption", 60000);
  const std::size_t n0 = snapshot_all(s, slot0).series[kEnergy].t_ns.size();
  const std::size_t n1 = snapshot_all(s, slot1).series[kEnergy].t_ns.size();
  const int64_t t_request = mono_now_ns();
  s.request_counter();
  // Watch GPU 0 closely; the moment its reading shows, GPU 1's must be there too.
  bool seen = false;
  while (!seen && mono_now_ns() - t_request < 2000 * kMs) {
    if (snapshot_all(s, slot0).series[kEnergy].t_ns.size() > n0) {
      seen = true;
      CHECK_GT(snapshot_all(s, slot1).series[kEnergy].t_ns.size(), n1);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  CHECK(seen);
  // Both readings took 60 ms one after the other before anything was published.
  CHECK_GE(mono_now_ns() - t_request, 110 * kMs);
  s.release();
}

// ---------------------------------------------------------------------------------------------------------------
// Fork while a caller thread is inside NVML.

void test_fork_during_caller_nvml_calls() {
  fake.reset(2);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  // A caller thread probing and listing devices as fast as it can: without the fork lock, fork() often lands while
  // it is inside the fake, whose internal lock the child then inherits taken (as it would NVML's).
  std::atomic<bool> done{false};
  std::atomic<long> rounds{0};
  std::thread caller([&] {
    while (!done.load()) {
      (void)lib->device_count();
      (void)lib->info(1);
      (void)s.add_device(0);  // probed once, then found in the list (no NVML call)
      rounds.fetch_add(1);
    }
  });
  CHECK(wait_until_true([&] { return rounds.load() > 10; }, 1000));
  int hung = 0;
  for (int round = 0; round < 20; ++round) {
    std::fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
      // Child: NVML must still answer. _exit: no atexit handlers, no static destructors.
      int status = 0;
      try {
        status = lib->device_count() == 2u && lib->info(1).pci_bus_id == "00000000:11:00.0" ? 0 : 3;
      } catch (...) {
        status = 4;
      }
      _exit(status);
    }
    CHECK_GT(pid, 0);
    if (pid < 0) break;
    int wstatus = 0;
    pid_t reaped = 0;
    const int64_t deadline = mono_now_ns() + 3000 * kMs;
    while ((reaped = waitpid(pid, &wstatus, WNOHANG)) == 0 && mono_now_ns() < deadline) sleep_ms(1);
    if (reaped == 0) {
      ++hung;
      kill(pid, SIGKILL);
      waitpid(pid, &wstatus, 0);
      continue;
    }
    CHECK(WIFEXITED(wstatus));
    if (WIFEXITED(wstatus)) CHECK_EQ(WEXITSTATUS(wstatus), 0);
  }
  done.store(true);
  caller.join();
  CHECK_EQ(hung, 0);
  CHECK_GT(rounds.load(), 20L);
}

// ---------------------------------------------------------------------------------------------------------------
// Realtime steps.

void test_realtime_step_back_resyncs() {
  fake.reset(1);
  // 300 W / 100 W square wave: a sample counted twice, lost, or put at the wrong time changes the integral.
  const double t_s[] = {0.0, 0.05};
  const double power_w[] = {300.0, 100.0};
  fake.set_trace(0, t_s, power_w, 2, 0.1, 0);
  const int64_t origin_ns = fake.origin_mono_ns(0);
  SamplerConfig cfg = pinned_config();
  cfg.offset_period_ns = 50 * kMs;  // a step is seen within 50 ms
  auto lib = open_fake();
  Sampler s(lib, cfg);
  const int slot = s.add_device(0);
  s.acquire();
  sleep_ms(300);
  CHECK(s.wait_covered(mono_now_ns(), 1000 * kMs));
  const uint64_t steps0 = s.stats().clock_steps;
  const int64_t offset0 = s.stats().realtime_offset_ns;

  // Realtime goes back 1.01 s (not a whole number of sample periods, so a sample converted with the wrong offset
  // lands off the sample grid). The fake's stamps, those of the samples already in its ring included, and the clock
  // the sampler measures its offset against both step.
  const int64_t t_step = mono_now_ns();
  fake.set_realtime_shift_us(-1'010'000);
  // New samples keep coming at once: the driver's stamps now look older than the last one seen, and only the reset
  // of last_seen lets them through before realtime has caught up (1.01 s, by when the ring would have overrun).
  const int64_t t_wait = t_step + 300 * kMs;
  sleep_ms(300);
  CHECK(s.wait_covered(t_wait, 300 * kMs));
  const SamplerStats st = s.stats();
  CHECK_GE(st.clock_steps, steps0 + 1);
  CHECK_LT(abs_ns(st.realtime_offset_ns - (offset0 - 1'010'000'000)), 1 * kMs);

  const DeviceSnapshot snap = snapshot_all(s, slot);
  const auto& t = snap.series[kSamples].t_ns;
  const auto& v = snap.series[kSamples].value;
  CHECK(strictly_increasing(t));
  // No repeat and no hole across the step: every spacing is one period (µs stamps; the offsets measured before
  // and after the step each carry their bracket's error).
  CHECK_LE(max_spacing_error_ns(t, kSamplePeriodNs), static_cast<int64_t>(100'000));
  for (int64_t ti : t) CHECK_LE(grid_offset_ns(ti, origin_ns, kSamplePeriodNs), static_cast<int64_t>(100'000));
  CHECK_EQ(snap.samples_total, static_cast<uint64_t>(t.size()));
  CHECK_EQ(snap.overruns, 0ull);
  CHECK(!t.empty() && t.back() >= t_wait);
  if (t.size() >= 2) {
    double sum_j = 0.0;
    for (std::size_t i = 1; i < t.size(); ++i)
      sum_j += static_cast<double>(v[i]) * 1e-3 * 1e-9 * static_cast<double>(t[i] - t[i - 1]);
    CHECK_LT(std::fabs(sum_j - fake.energy_j(0, t.front(), t.back())), 0.05);
  }
  CHECK(s.failures().empty());
  s.release();
}

// ---------------------------------------------------------------------------------------------------------------


// The chore (the kernel tracer's periodic flush) runs on the sampler thread at its period, starts at once when set,
// and never runs again once removed, even while the thread keeps ticking.
void test_chore_runs_on_the_thread_until_removed() {
  fake.reset(1);
  set_constant_w(0, 100.0);
  auto lib = open_fake();
  Sampler s(lib, pinned_config());
  s.add_device(0);
  s.acquire();
  std::atomic<int> runs{0};
  std::atomic<bool> off_thread{false};
  const std::thread::id caller = std::this_thread::get_id();
  const int64_t set_ns = mono_now_ns();
  std::atomic<int64_t> first_ns{0};
  s.set_chore(
      [&] {
        if (std::this_thread::get_id() == caller) off_thread = true;
        int64_t expected = 0;
        first_ns.compare_exchange_strong(expected, mono_now_ns());
        runs.fetch_add(1);
        // ~2 ms of CPU per run, which stats() must book to the chore, not to the sampler's own work.
        const int64_t until_ns = mono_now_ns() + 2 * kMs;
        while (mono_now_ns() < until_ns) {
        }
      },
      50 * kMs);
  sleep_ms(525);
  const int n = runs.load();
  CHECK_GE(n, 9);   // 0, 50, ..., 500 ms: 11 runs, less a tick or two of scheduling slack
  CHECK_LE(n, 12);
  CHECK(!off_thread.load());
  CHECK_LE(first_ns.load() - set_ns, 20 * kMs);  // not left until the next scheduled tick
  CHECK_GE(s.stats().chore_cpu_ns, static_cast<int64_t>(n - 1) * kMs);  // ~2 ms a run, with slack for sanitizers
  s.set_chore(nullptr, 0);
  const int after_removal = runs.load();
  sleep_ms(200);
  CHECK_EQ(runs.load(), after_removal);
  bool threw = false;
  try {
    s.set_chore([] {}, 0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  s.release();
}

const TestCase kTests[] = {
    {"library_open_balances_init", test_library_open_balances_init},
    {"init_failure_throws_code", test_init_failure_throws_code},
    {"missing_library_code_12", test_missing_library_code_12},
    {"add_device_errors", test_add_device_errors},
    {"samples_constant_power", test_samples_constant_power},
    {"samples_integrate_square_wave", test_samples_integrate_square_wave},
    {"default_cadence", test_default_cadence},
    {"overruns_when_ring_wraps", test_overruns_when_ring_wraps},
    {"samples_not_supported_uses_instant", test_samples_not_supported_uses_instant},
    {"samples_become_unsupported_mid_run", test_samples_become_unsupported_mid_run},
    {"gpu_lost_mid_run", test_gpu_lost_mid_run},
    {"stop_wakes_thread_at_once", test_stop_wakes_thread_at_once},
    {"linger_then_acquire_restarts", test_linger_then_acquire_restarts},
    {"wait_covered_true_promptly", test_wait_covered_true_promptly},
    {"wait_covered_false_at_timeout", test_wait_covered_false_at_timeout},
    {"concurrent_snapshots", test_concurrent_snapshots},
    {"destroy_running_sampler_joins", test_destroy_running_sampler_joins},
    {"slow_energy_counter_does_not_block_snapshot", test_slow_energy_counter_does_not_block_snapshot},
    {"fork_child_destroys_its_copy", test_fork_child_destroys_its_copy},
    {"bounded_capacity", test_bounded_capacity},
    {"request_counter_reads_at_once", test_request_counter_reads_at_once},
    {"tick_publishes_at_once", test_tick_publishes_at_once},
    {"fork_during_caller_nvml_calls", test_fork_during_caller_nvml_calls},
    {"realtime_step_back_resyncs", test_realtime_step_back_resyncs},
    {"chore_runs_on_the_thread_until_removed", test_chore_runs_on_the_thread_until_removed},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::printf("usage: %s <path to libwattscope_fake_nvml.so>\n", argv[0]);
    return 2;
  }
  if (!load_fake(argv[1])) return 2;
  return wattscope_test::run_tests(
      kTests, [] { fake.reset(1); },
      [](const char* name) {
        // Every NvmlLibrary (and so every Sampler) of the test is gone: its nvmlInit must have been balanced.
        if (fake.init_refcount() != 0) {
          report_failure(__FILE__, __LINE__,
                         std::string(name) + ": NVML init references left: " + std::to_string(fake.init_refcount()));
        }
      });
}
