// Native unit tests of CuptiLibrary, CuptiClockFit and KernelTracer, run against the fake CUPTI through the real
// dlopen path.
//
// Usage: test_tracer <path to libwattscope_fake_cupti.so>   (ctest passes it; tests/native.sh runs ctest under
// ASan/UBSan and TSan). Same conventions as test_sampler.cpp: CHECK* record a failure and print `file:line: expr`,
// one line per test, and a last line `N passed, M failed` (exit status 1 when M > 0). Every test starts from
// fake_cupti_reset.

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fake_cupti_control.h"
#include "check.hpp"
#include "wattscope/clock.hpp"
#include "wattscope/cupti_library.hpp"
#include "wattscope/kernel_tracer.hpp"

namespace {

using wattscope::CuptiClockFit;
using wattscope::CuptiError;
using wattscope::CuptiLibrary;
using wattscope::KernelTracer;
using wattscope::mono_now_ns;
using wattscope::TracerConfig;
using wattscope::TracerSnapshot;

using wattscope_test::report_failure;
using wattscope_test::TestCase;

// ---------------------------------------------------------------------------------------------------------------
// The fake's control API, resolved from the same path the product opens.

struct FakeControl {
  decltype(&fake_cupti_reset) reset = nullptr;
  decltype(&fake_cupti_set_clock) set_clock = nullptr;
  decltype(&fake_cupti_inject) inject = nullptr;
  decltype(&fake_cupti_fail) fail = nullptr;
  decltype(&fake_cupti_call_count) call_count = nullptr;
  decltype(&fake_cupti_enabled) enabled = nullptr;
  decltype(&fake_cupti_complete_again) complete_again = nullptr;
  decltype(&fake_cupti_buffers_held) buffers_held = nullptr;
  decltype(&fake_cupti_dropped_total) dropped_total = nullptr;
  decltype(&fake_cupti_set_version) set_version = nullptr;
  cuptiActivityFlushAll_fn flush_all = nullptr;  // CUPTI itself, to return buffers behind the product's back
  cuptiActivityRegisterCallbacks_fn register_callbacks = nullptr;  // to play another CUPTI client (Kineto)
  cuptiActivityEnable_fn enable = nullptr;
  cuptiActivityDisable_fn disable = nullptr;
};

FakeControl fake;
std::string g_fake_path;

template <typename Fn>
bool resolve(void* dl, const char* name, Fn& out) {
  out = reinterpret_cast<Fn>(dlsym(dl, name));
  if (out == nullptr) std::printf("missing symbol %s in %s\n", name, g_fake_path.c_str());
  return out != nullptr;
}

bool load_fake(const std::string& path) {
  g_fake_path = path;
  void* dl = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);  // never closed, like the product's handle
  if (dl == nullptr) {
    const char* why = dlerror();
    std::printf("cannot dlopen %s: %s\n", path.c_str(), why != nullptr ? why : "?");
    return false;
  }
  bool ok = true;
  ok &= resolve(dl, "fake_cupti_reset", fake.reset);
  ok &= resolve(dl, "fake_cupti_set_clock", fake.set_clock);
  ok &= resolve(dl, "fake_cupti_inject", fake.inject);
  ok &= resolve(dl, "fake_cupti_fail", fake.fail);
  ok &= resolve(dl, "fake_cupti_call_count", fake.call_count);
  ok &= resolve(dl, "fake_cupti_enabled", fake.enabled);
  ok &= resolve(dl, "fake_cupti_complete_again", fake.complete_again);
  ok &= resolve(dl, "fake_cupti_buffers_held", fake.buffers_held);
  ok &= resolve(dl, "fake_cupti_dropped_total", fake.dropped_total);
  ok &= resolve(dl, "fake_cupti_set_version", fake.set_version);
  ok &= resolve(dl, "cuptiActivityFlushAll", fake.flush_all);
  ok &= resolve(dl, "cuptiActivityRegisterCallbacks", fake.register_callbacks);
  ok &= resolve(dl, "cuptiActivityEnable", fake.enable);
  ok &= resolve(dl, "cuptiActivityDisable", fake.disable);
  return ok;
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers.

constexpr int64_t kUs = 1'000;
constexpr int64_t kMs = 1'000'000;
constexpr uint32_t kKernel = CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
constexpr uint32_t kMemcpy = CUPTI_ACTIVITY_KIND_MEMCPY;
constexpr uint32_t kMemset = CUPTI_ACTIVITY_KIND_MEMSET;

int64_t abs_ns(int64_t v) { return v < 0 ? -v : v; }
void sleep_ms(int64_t ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }
std::shared_ptr<CuptiLibrary> open_fake() { return CuptiLibrary::open(g_fake_path, {}); }

struct Injected {
  uint32_t kind;
  uint32_t device;
  uint32_t stream;
  std::string name;
  int64_t start_ns;
  int64_t end_ns;
  uint32_t correlation;
};

// Injects a kernel ending now: [now - 300 µs, now - 100 µs].
Injected inject_kernel_now(const char* name, uint32_t stream, uint32_t correlation) {
  const int64_t now = mono_now_ns();
  Injected r{kKernel, 0, stream, name, now - 300 * kUs, now - 100 * kUs, correlation};
  CHECK_EQ(fake.inject(r.kind, r.device, r.stream, name, r.start_ns, r.end_ns, r.correlation), 1);
  return r;
}

// Each injected record appears once in the snapshot, with its fields, and its stamps within 1 µs.
void check_records(const TracerSnapshot& snap, const std::vector<Injected>& expected) {
  CHECK_EQ(snap.start_ns.size(), expected.size());
  if (snap.start_ns.size() != expected.size()) return;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const Injected& e = expected[i];
    CHECK_EQ(snap.kind[i], e.kind);
    CHECK_EQ(snap.device_id[i], e.device);
    CHECK_EQ(snap.stream_id[i], e.stream);
    CHECK_EQ(snap.correlation_id[i], e.correlation);
    CHECK_LE(abs_ns(snap.start_ns[i] - e.start_ns), kUs);
    CHECK_LE(abs_ns(snap.end_ns[i] - e.end_ns), kUs);
    if (e.kind == kKernel) {
      CHECK_GE(snap.name_index[i], 0);
      if (snap.name_index[i] >= 0) CHECK_EQ(snap.names.at(static_cast<std::size_t>(snap.name_index[i])), e.name);
    } else {
      CHECK_EQ(snap.name_index[i], -1);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tests.

void test_open_reports_version_and_path() {
  auto lib = open_fake();
  CHECK_EQ(lib->path(), g_fake_path);
  CHECK(!lib->reused());
  CHECK_EQ(lib->version(), 130001u);
}

void test_open_missing_library() {
  try {
    CuptiLibrary::open("/nonexistent/libcupti.so.13", {});
    CHECK(false);
  } catch (const CuptiError& e) {
    CHECK_EQ(e.code(), wattscope::kCuptiLibraryNotFound);
    CHECK(std::string(e.what()).find("/nonexistent/libcupti.so.13") != std::string::npos);
    CHECK(std::string(e.what()).find("WATTSCOPE_CUPTI_PATH") != std::string::npos);
  }
}

void test_open_version_failure() {
  fake.fail("cuptiGetVersion", 0, CUPTI_ERROR_NOT_INITIALIZED);
  try {
    open_fake();
    CHECK(false);
  } catch (const CuptiError& e) {
    CHECK_EQ(e.call(), std::string("cuptiGetVersion"));
    CHECK_EQ(e.code(), CUPTI_ERROR_NOT_INITIALIZED);
    CHECK(e.detail().find("driver") != std::string::npos);
  }
}

void test_records_parsed_and_mapped() {
  KernelTracer t(open_fake(), TracerConfig{});
  t.start();
  CHECK(t.running());
  CHECK_EQ(fake.enabled(kKernel), 1);
  CHECK_EQ(fake.enabled(kMemcpy), 1);
  CHECK_EQ(fake.enabled(kMemset), 1);
  CHECK_EQ(fake.enabled(CUPTI_ACTIVITY_KIND_KERNEL), 0);  // kind 3 would serialize kernels
  sleep_ms(2);
  std::vector<Injected> expected;
  expected.push_back(inject_kernel_now("gemm_kernel", 7, 11));
  expected.push_back(inject_kernel_now("softmax_kernel", 7, 12));
  expected.push_back(inject_kernel_now("gemm_kernel", 13, 13));
  const int64_t now = mono_now_ns();
  expected.push_back(Injected{kMemcpy, 1, 9, "", now - 50 * kUs, now - 40 * kUs, 14});
  expected.push_back(Injected{kMemset, 1, 9, "", now - 30 * kUs, now - 20 * kUs, 15});
  CHECK_EQ(fake.inject(kMemcpy, 1, 9, nullptr, expected[3].start_ns, expected[3].end_ns, 14), 1);
  CHECK_EQ(fake.inject(kMemset, 1, 9, nullptr, expected[4].start_ns, expected[4].end_ns, 15), 1);
  // Not flushed yet: still in CUPTI's buffer.
  CHECK_EQ(t.snapshot().start_ns.size(), 0u);
  CHECK(t.flush());
  const TracerSnapshot snap = t.snapshot();
  check_records(snap, expected);
  CHECK_EQ(snap.names.size(), 2u);  // interned: gemm_kernel once
  CHECK_EQ(snap.name_index[0], snap.name_index[2]);
  CHECK_EQ(snap.clock_segments, 1u);
  CHECK_EQ(snap.buffers_refused, 0u);
  t.stop();
  CHECK(!t.running());
  CHECK_EQ(fake.enabled(kKernel), 0);
  CHECK_EQ(fake.buffers_held(), 0u);  // the forced flush at stop returned every buffer
  CHECK_EQ(t.stats().buffers_outstanding, 0u);
  CHECK(t.failures().empty());
}

void test_stamps_mapped_without_flush_until_stop() {
  KernelTracer t(open_fake(), TracerConfig{});
  t.start();
  sleep_ms(1);
  std::vector<Injected> expected{inject_kernel_now("k", 1, 1)};
  t.stop();  // the forced flush delivers it
  check_records(t.snapshot(), expected);
  CHECK_EQ(fake.call_count("cuptiActivityFlushAll"), 2ull);  // one at start (foreign buffers), one at stop
}

void test_clock_switch_mid_run_refits() {
  KernelTracer t(open_fake(), TracerConfig{});
  t.start();
  sleep_ms(2);
  std::vector<Injected> expected{inject_kernel_now("before", 1, 1)};
  sleep_ms(2);
  CHECK(t.flush());
  CHECK_LT(std::abs(t.stats().ns_per_tick - 1.0), 1e-3);
  // torch.profiler's session switches CUPTI to a 2.5 GHz TSC: records from now on are stamped in ticks.
  fake.set_clock(2.5, 123'456'789);
  expected.push_back(inject_kernel_now("after_switch", 1, 2));  // before any point of the new clock
  sleep_ms(3);
  CHECK(t.flush());
  sleep_ms(3);
  expected.push_back(inject_kernel_now("later", 1, 3));
  sleep_ms(3);
  CHECK(t.flush());
  t.stop();
  const TracerSnapshot snap = t.snapshot();
  check_records(snap, expected);
  CHECK_EQ(snap.clock_segments, 2u);
  CHECK_LT(std::abs(t.stats().ns_per_tick - 0.4), 1e-3);
}

// The switch is first seen by stop's clock point: the new segment's slope comes from the extra point taken 1 ms later,
// not from the 1 ns per tick a single point would assume (that would be off by 60% of the distance to the point).
void test_clock_switch_seen_at_stop() {
  KernelTracer t(open_fake(), TracerConfig{});
  t.start();
  sleep_ms(2);
  fake.set_clock(0.4, 5'000'000);
  sleep_ms(1);
  std::vector<Injected> expected{inject_kernel_now("after_switch", 1, 1)};
  sleep_ms(3);
  t.stop();
  check_records(t.snapshot(), expected);
  CHECK_EQ(t.snapshot().clock_segments, 2u);
}

void test_clock_fit_rejects_implausible_slope() {
  CuptiClockFit fit;
  CHECK(fit.add(1'000'000'000'000, 5'000'000));
  // A second point whose slope is 1e-6 ns per tick (realtime ns -> ticks seen from a single point): a switch.
  CHECK(fit.add(2'000'000'000'000, 6'000'000));
  CHECK_EQ(fit.segment_count(), 2u);
  CHECK(!fit.add(2'000'010'000'000, 16'000'000));  // 1 ns per tick: same clock
  CHECK_EQ(fit.to_mono_ns(2'000'005'000'000), 11'000'000);
  // A stamp near the first segment maps with it (single point: 1 ns per tick assumed).
  CHECK_EQ(fit.to_mono_ns(1'000'000'000'100), 5'000'100);
  // Ticks going backwards always start a new segment.
  CHECK(fit.add(10, 20'000'000));
  CHECK_EQ(fit.segment_count(), 3u);
}

void test_pool_exhaustion_counted() {
  TracerConfig cfg;
  cfg.buffer_bytes = 1024;  // 4 kernel records of 216 B each
  cfg.buffer_count = 2;
  KernelTracer t(open_fake(), cfg);
  t.start();
  int recorded = 0;
  const int64_t now_ns = mono_now_ns();
  for (int i = 0; i < 20; ++i) recorded += fake.inject(kKernel, 0, 1, "k", now_ns - kUs, now_ns, i);
  CHECK_EQ(recorded, 8);
  CHECK_EQ(fake.dropped_total(), 12ull);
  CHECK_EQ(t.stats().buffers_refused, 12u);
  CHECK_EQ(t.stats().buffers_outstanding, 2u);
  CHECK(t.flush());
  TracerSnapshot snap = t.snapshot();
  CHECK_EQ(snap.start_ns.size(), 8u);
  CHECK_EQ(snap.records_dropped, 12u);
  CHECK_EQ(snap.buffers_refused, 12u);
  // Buffers came back: recording resumes.
  CHECK_EQ(fake.inject(kKernel, 0, 1, "k", now_ns - kUs, now_ns, 99), 1);
  t.stop();
  CHECK_EQ(t.snapshot().start_ns.size(), 9u);
}

void test_capacity_and_untimed_records_counted() {
  TracerConfig cfg;
  cfg.capacity = 3;
  KernelTracer t(open_fake(), cfg);
  t.start();
  CHECK_EQ(fake.inject(kKernel, 0, 1, "k", 0, 0, 1), 1);  // CUPTI could not time it
  const int64_t now_ns = mono_now_ns();
  for (int i = 0; i < 5; ++i) fake.inject(kKernel, 0, 1, "k", now_ns - kUs, now_ns, i);
  t.stop();
  const TracerSnapshot snap = t.snapshot();
  CHECK_EQ(snap.start_ns.size(), 3u);
  CHECK_EQ(snap.records_overflow, 2u);
  CHECK_EQ(snap.records_incomplete, 1u);
}

void test_init_failure_clear_error_and_rollback() {
  auto lib = open_fake();
  // The second Enable (MEMCPY) fails: the kernel kind enabled before it must be disabled again.
  fake.fail("cuptiActivityEnable", 1, CUPTI_ERROR_INSUFFICIENT_PRIVILEGES);
  KernelTracer t(lib, TracerConfig{});
  try {
    t.start();
    CHECK(false);
  } catch (const CuptiError& e) {
    CHECK_EQ(e.call(), std::string("cuptiActivityEnable"));
    CHECK_EQ(e.code(), CUPTI_ERROR_INSUFFICIENT_PRIVILEGES);
    CHECK(std::string(e.what()).find("NVreg_RestrictProfilingToAdminUsers") != std::string::npos);
  }
  CHECK(!t.running());
  CHECK_EQ(fake.enabled(kKernel), 0);
  // Nothing is left holding CUPTI: once the cause is gone, a tracer starts.
  fake.fail("cuptiActivityEnable", 0, 0);
  t.start();
  CHECK(t.running());
  t.stop();
  fake.fail("cuptiActivityRegisterCallbacks", 0, CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED);
  try {
    t.start();
    CHECK(false);
  } catch (const CuptiError& e) {
    CHECK_EQ(e.code(), CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED);
    CHECK(e.detail().find("Nsight") != std::string::npos);
  }
}

void test_second_tracer_is_refused() {
  auto lib = open_fake();
  KernelTracer a(lib, TracerConfig{});
  KernelTracer b(lib, TracerConfig{});
  a.start();
  try {
    b.start();
    CHECK(false);
  } catch (const CuptiError& e) {
    CHECK_EQ(e.code(), wattscope::kCuptiTracerBusy);
  }
  CHECK(!b.running());
  CHECK(a.running());
  a.stop();
  b.start();
  CHECK(b.running());
}

void test_stop_without_start_and_idempotence() {
  KernelTracer t(open_fake(), TracerConfig{});
  t.stop();
  CHECK(!t.flush());
  CHECK_EQ(t.snapshot().start_ns.size(), 0u);
  CHECK_EQ(fake.call_count("cuptiActivityDisable"), 0ull);
  t.start();
  t.start();
  CHECK_EQ(fake.call_count("cuptiActivityRegisterCallbacks"), 1ull);
  t.stop();
  t.stop();
  CHECK_EQ(fake.call_count("cuptiActivityDisable"), 3ull);  // kernel, memcpy, memset: once each
}

void test_stop_with_cupti_failing() {
  auto lib = open_fake();
  std::vector<Injected> expected;
  {
    KernelTracer t(lib, TracerConfig{});
    t.start();
    sleep_ms(1);
    expected.push_back(inject_kernel_now("k", 1, 1));
    fake.fail("cuptiActivityDisable", 0, CUPTI_ERROR_UNKNOWN);
    fake.fail("cuptiActivityFlushAll", 0, CUPTI_ERROR_UNKNOWN);
    fake.fail("cuptiGetTimestamp", 0, CUPTI_ERROR_UNKNOWN);
    const int64_t t0 = mono_now_ns();
    t.stop();
    CHECK_LT(mono_now_ns() - t0, 100 * kMs);
    CHECK(!t.running());
    const auto failures = t.failures();
    CHECK_EQ(failures.size(), 5u);  // three Disables, the FlushAll, the GetTimestamp
    if (!failures.empty()) CHECK_EQ(failures[0].call, std::string("cuptiActivityDisable"));
    CHECK_EQ(t.stats().buffers_outstanding, 1u);
    // CUPTI still holds our buffer; while it does, a new recording may start (the old one is retired).
    fake.fail("cuptiActivityFlushAll", 0, 0);
    fake.fail("cuptiGetTimestamp", 0, 0);
    fake.fail("cuptiActivityDisable", 0, 0);
    KernelTracer other(lib, TracerConfig{});
    other.start();
    // CUPTI gives the old buffer back late: it is parsed into the recording it belongs to.
    CHECK_EQ(fake.flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), CUPTI_SUCCESS);
    check_records(t.snapshot(), expected);
    CHECK_EQ(other.snapshot().start_ns.size(), 0u);
    other.stop();
  }
}

void test_concurrent_flush_stop_snapshot() {
  TracerConfig cfg;
  cfg.buffer_bytes = 4096;
  cfg.buffer_count = 4;
  KernelTracer t(open_fake(), cfg);
  t.start();
  std::atomic<bool> done{false};
  std::atomic<int> recorded{0};
  std::thread producer([&] {
    for (uint32_t i = 0; !done.load(); ++i) {
      const int64_t now = mono_now_ns();
      recorded += fake.inject(kKernel, 0, i % 4, (i % 2) != 0 ? "odd" : "even", now - kUs, now, i);
    }
  });
  std::thread flusher([&] {
    while (!done.load()) t.flush();
  });
  std::thread chore([&] {  // the sampler's chore, which skips a tick when another thread holds the tracer
    while (!done.load()) t.try_flush();
  });
  std::thread reader([&] {
    while (!done.load()) {
      const TracerSnapshot s = t.snapshot();
      CHECK_EQ(s.start_ns.size(), s.end_ns.size());
      (void)t.stats();
    }
  });
  sleep_ms(50);
  std::thread stopper([&] { t.stop(); });
  stopper.join();
  done = true;
  producer.join();
  flusher.join();
  chore.join();
  reader.join();
  CHECK(!t.running());
  CHECK(!t.flush());
  const TracerSnapshot snap = t.snapshot();
  CHECK_GT(snap.start_ns.size(), 0u);
  CHECK_EQ(static_cast<uint64_t>(snap.start_ns.size()), static_cast<uint64_t>(recorded.load()));
  CHECK_EQ(fake.buffers_held(), 0u);
  CHECK_EQ(t.stats().buffers_outstanding, 0u);
  for (std::size_t i = 0; i < snap.start_ns.size(); ++i) CHECK_LE(snap.start_ns[i], snap.end_ns[i]);
}

void test_a_buffer_completed_twice_is_counted_not_parsed_again() {
  TracerConfig cfg;
  cfg.buffer_bytes = 4096;
  cfg.buffer_count = 2;
  {
    KernelTracer t(open_fake(), cfg);
    t.start();
    inject_kernel_now("k", 1, 1);
    CHECK(t.flush());
    CHECK_EQ(fake.complete_again(), 1);  // the same buffer, again: its record must not count twice
    TracerSnapshot snap = t.snapshot();
    CHECK_EQ(snap.start_ns.size(), 1u);
    CHECK_EQ(snap.buffers_duplicate, 1u);
    CHECK_EQ(t.stats().buffers_duplicate, 1u);
    inject_kernel_now("k", 1, 2);  // the pool still works: one buffer handed out at a time
    inject_kernel_now("k", 1, 3);
    t.stop();
    snap = t.snapshot();
    CHECK_EQ(snap.start_ns.size(), 3u);
    CHECK_EQ(t.stats().buffers_outstanding, 0u);
    CHECK_EQ(fake.complete_again(), 1);  // after the stop (the pool kept as a spare): still ignored
    CHECK_EQ(t.snapshot().start_ns.size(), 3u);
  }
  // A new recording of the same size reuses the retired pool (never freed while CUPTI might write to it).
  KernelTracer again(open_fake(), cfg);
  again.start();
  inject_kernel_now("k2", 1, 4);
  again.stop();
  CHECK_EQ(again.snapshot().start_ns.size(), 1u);
  CHECK_EQ(again.snapshot().buffers_duplicate, 0u);
}

void test_try_flush_flushes_unless_busy() {
  KernelTracer t(open_fake(), TracerConfig{});
  CHECK(!t.try_flush());  // not running
  t.start();
  CHECK(t.try_flush());
  CHECK(t.try_flush());
  CHECK_EQ(t.stats().flushes, 2ull);
  t.stop();
  CHECK(!t.try_flush());
}

// Another client (Kineto) stops without a forced flush and frees the buffer CUPTI still holds: our start must make
// CUPTI hand it back (to our callback, which must not touch it) before any record of ours can be written there.
alignas(8) uint8_t g_foreign_buffer[4096];
int g_foreign_completions = 0;

void foreign_request(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = g_foreign_buffer;
  *size = sizeof g_foreign_buffer;
  *max_records = 0;
}

void foreign_complete(CUcontext, uint32_t, uint8_t*, size_t, size_t) { g_foreign_completions += 1; }

void test_start_reclaims_a_buffer_another_client_left_in_cupti() {
  g_foreign_completions = 0;
  CHECK_EQ(fake.register_callbacks(foreign_request, foreign_complete), CUPTI_SUCCESS);
  CHECK_EQ(fake.enable(kKernel), CUPTI_SUCCESS);
  inject_kernel_now("foreign_kernel", 3, 1);
  CHECK_EQ(fake.disable(kKernel), CUPTI_SUCCESS);
  CHECK_EQ(fake.buffers_held(), 1u);  // the other client went away without taking it back
  KernelTracer t(open_fake(), TracerConfig{});
  t.start();
  CHECK_EQ(fake.buffers_held(), 0u);  // handed to our callback before our kinds were enabled
  CHECK_EQ(g_foreign_completions, 0);
  const Injected ours = inject_kernel_now("our_kernel", 7, 2);
  CHECK(t.flush());
  check_records(t.snapshot(), {ours});  // the foreign record was not parsed as ours
  t.stop();
  CHECK_EQ(t.stats().buffers_outstanding, 0u);
}

void test_kernel_names_are_demangled() {
  KernelTracer t(open_fake(), TracerConfig{});
  t.start();
  inject_kernel_now("_ZN2at6native18elementwise_kernelILi128ELi4EEEvii", 7, 1);
  inject_kernel_now("nvjet_sm90_tst_256x128", 7, 2);
  inject_kernel_now("_Zbroken", 7, 3);
  CHECK(t.flush());
  const TracerSnapshot snap = t.snapshot();
  CHECK_EQ(snap.names.size(), 3u);
  if (snap.names.size() == 3u) {
    CHECK_EQ(snap.names[0], std::string("void at::native::elementwise_kernel<128, 4>(int, int)"));
    CHECK_EQ(snap.names[1], std::string("nvjet_sm90_tst_256x128"));  // not mangled: as CUPTI gave it
    CHECK_EQ(snap.names[2], std::string("_Zbroken"));                // not demanglable: as CUPTI gave it
  }
  t.stop();
}

// Ranges: the kinds go on and off with the tracer; a kernel launched while an id is pushed on this thread comes
// with a (correlation, id) pair for the innermost id; API records and other clients' external kinds are skipped; a
// pop on an empty stack is CUPTI's error code, not a throw.
void test_range_pairs_follow_the_innermost_pushed_id() {
  auto lib = open_fake();
  CHECK(lib->has_ranges());
  TracerConfig config;
  config.ranges = true;
  KernelTracer t(lib, config);
  t.start();
  for (uint32_t kind : {CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION, CUPTI_ACTIVITY_KIND_RUNTIME,
                        CUPTI_ACTIVITY_KIND_DRIVER}) {
    CHECK_EQ(fake.enabled(kind), 1);
  }
  std::vector<Injected> expected;
  expected.push_back(inject_kernel_now("outside", 7, 1));
  CHECK_EQ(lib->push_range(40), CUPTI_SUCCESS);
  expected.push_back(inject_kernel_now("in_outer", 7, 2));
  CHECK_EQ(lib->push_range(41), CUPTI_SUCCESS);
  expected.push_back(inject_kernel_now("in_inner", 7, 3));
  CHECK_EQ(lib->pop_range(), CUPTI_SUCCESS);
  expected.push_back(inject_kernel_now("in_outer", 7, 4));
  CHECK_EQ(lib->pop_range(), CUPTI_SUCCESS);
  CHECK_EQ(lib->pop_range(), CUPTI_ERROR_QUEUE_EMPTY);
  CHECK(t.flush());
  const TracerSnapshot snap = t.snapshot();
  check_records(snap, expected);  // the API records were not taken for kernels
  CHECK_EQ(snap.range_correlation_id.size(), 3u);
  if (snap.range_correlation_id.size() == 3u) {
    CHECK_EQ(snap.range_correlation_id[0], 2u);
    CHECK_EQ(snap.range_id[0], 40u);
    CHECK_EQ(snap.range_correlation_id[1], 3u);
    CHECK_EQ(snap.range_id[1], 41u);
    CHECK_EQ(snap.range_correlation_id[2], 4u);
    CHECK_EQ(snap.range_id[2], 40u);
  }
  t.stop();
  CHECK_EQ(fake.enabled(CUPTI_ACTIVITY_KIND_RUNTIME), 0);
  CHECK_EQ(fake.enabled(CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION), 0);
  CHECK(t.failures().empty());
}

// Pairs have their own capacity and count: a pair past it is lost, and no record is counted as overflowing.
void test_range_pairs_past_their_capacity_are_counted_apart() {
  auto lib = open_fake();
  TracerConfig config;
  config.ranges = true;
  config.range_pair_capacity = 2;
  KernelTracer t(lib, config);
  t.start();
  CHECK_EQ(lib->push_range(9), CUPTI_SUCCESS);
  for (uint32_t c = 1; c <= 3; ++c) inject_kernel_now("k", 7, c);
  CHECK_EQ(lib->pop_range(), CUPTI_SUCCESS);
  CHECK(t.flush());
  const TracerSnapshot snap = t.snapshot();
  CHECK_EQ(snap.start_ns.size(), 3u);
  CHECK_EQ(snap.range_id.size(), 2u);
  CHECK_EQ(snap.range_pairs_lost, 1u);
  CHECK_EQ(snap.records_overflow, 0u);
  t.stop();
}

// Without the ranges option nothing but the activity kinds is enabled, and a pushed id yields no pairs.
void test_no_range_pairs_without_the_option() {
  auto lib = open_fake();
  KernelTracer t(lib, TracerConfig{});
  t.start();
  CHECK_EQ(fake.enabled(CUPTI_ACTIVITY_KIND_RUNTIME), 0);
  CHECK_EQ(lib->push_range(7), CUPTI_SUCCESS);
  inject_kernel_now("k", 7, 1);
  CHECK_EQ(lib->pop_range(), CUPTI_SUCCESS);
  CHECK(t.flush());
  CHECK_EQ(t.snapshot().range_id.size(), 0u);
  t.stop();
}

const TestCase kTests[] = {
    {"range_pairs_follow_the_innermost_pushed_id", test_range_pairs_follow_the_innermost_pushed_id},
    {"no_range_pairs_without_the_option", test_no_range_pairs_without_the_option},
    {"range_pairs_past_their_capacity_are_counted_apart", test_range_pairs_past_their_capacity_are_counted_apart},
    {"kernel_names_are_demangled", test_kernel_names_are_demangled},
    {"start_reclaims_a_buffer_another_client_left_in_cupti", test_start_reclaims_a_buffer_another_client_left_in_cupti},
    {"open_reports_version_and_path", test_open_reports_version_and_path},
    {"open_missing_library", test_open_missing_library},
    {"open_version_failure", test_open_version_failure},
    {"records_parsed_and_mapped", test_records_parsed_and_mapped},
    {"stamps_mapped_without_flush_until_stop", test_stamps_mapped_without_flush_until_stop},
    {"clock_switch_mid_run_refits", test_clock_switch_mid_run_refits},
    {"clock_switch_seen_at_stop", test_clock_switch_seen_at_stop},
    {"clock_fit_rejects_implausible_slope", test_clock_fit_rejects_implausible_slope},
    {"pool_exhaustion_counted", test_pool_exhaustion_counted},
    {"capacity_and_untimed_records_counted", test_capacity_and_untimed_records_counted},
    {"init_failure_clear_error_and_rollback", test_init_failure_clear_error_and_rollback},
    {"second_tracer_is_refused", test_second_tracer_is_refused},
    {"stop_without_start_and_idempotence", test_stop_without_start_and_idempotence},
    {"stop_with_cupti_failing", test_stop_with_cupti_failing},
    {"concurrent_flush_stop_snapshot", test_concurrent_flush_stop_snapshot},
    {"a_buffer_completed_twice_is_counted_not_parsed_again", test_a_buffer_completed_twice_is_counted_not_parsed_again},
    {"try_flush_flushes_unless_busy", test_try_flush_flushes_unless_busy},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::printf("usage: %s <path to libwattscope_fake_cupti.so>\n", argv[0]);
    return 2;
  }
  if (!load_fake(argv[1])) return 2;
  unsetenv("WATTSCOPE_CUPTI_PATH");
  return wattscope_test::run_tests(kTests, [] { fake.reset(); }, [](const char*) {});
}
