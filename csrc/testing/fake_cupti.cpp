// A fake libcupti for CI machines without a GPU: the Activity API subset wattscope calls (cupti_api.h), with
// records injected by tests (fake_cupti_control.h) in the same byte layout as CUDA 13.0's libcupti at the offsets
// the product reads. The product loads it through its real dlopen path and runs its real tracer against it.

#include "fake_cupti_control.h"

#include <wattscope/cupti_api.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#define FAKE_CUPTI_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

enum Fn : int {
  kGetVersion,
  kGetTimestamp,
  kRegisterCallbacks,
  kEnable,
  kDisable,
  kFlushAll,
  kGetNextRecord,
  kGetNumDroppedRecords,
  kPushExternalCorrelationId,
  kPopExternalCorrelationId,
  kFinalize,
  kFnCount,
};

constexpr const char* kFnNames[kFnCount] = {
    "cuptiGetVersion",       "cuptiGetTimestamp",          "cuptiActivityRegisterCallbacks",
    "cuptiActivityEnable",   "cuptiActivityDisable",       "cuptiActivityFlushAll",
    "cuptiActivityGetNextRecord", "cuptiActivityGetNumDroppedRecords", "cuptiActivityPushExternalCorrelationId",
    "cuptiActivityPopExternalCorrelationId", "cuptiFinalize",
};

int find_fn(const char* name) {
  if (name == nullptr) return -1;
  for (int i = 0; i < kFnCount; ++i) {
    if (std::strcmp(kFnNames[i], name) == 0) return i;
  }
  return -1;
}

constexpr uint32_t kKindSlots = 64;  // CUpti_ActivityKind values the fake can enable (EXTERNAL_CORRELATION is 39)

struct FailRule {
  bool armed = false;
  unsigned long long after_calls = 0;
  unsigned long long successes = 0;
  int code = 0;
};

struct HeldBuffer {
  uint8_t* data = nullptr;
  size_t size = 0;
  size_t used = 0;
};

int64_t mono_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int64_t realtime_minus_mono_ns() {
  timespec a{}, r{}, b{};
  clock_gettime(CLOCK_MONOTONIC, &a);
  clock_gettime(CLOCK_REALTIME, &r);
  clock_gettime(CLOCK_MONOTONIC, &b);
  const int64_t ma = static_cast<int64_t>(a.tv_sec) * 1000000000 + a.tv_nsec;
  const int64_t mb = static_cast<int64_t>(b.tv_sec) * 1000000000 + b.tv_nsec;
  return static_cast<int64_t>(r.tv_sec) * 1000000000 + r.tv_nsec - (ma + (mb - ma) / 2);
}

struct State {
  std::mutex mu;
  CUpti_BuffersCallbackRequestFunc request = nullptr;
  CUpti_BuffersCallbackCompleteFunc complete = nullptr;
  bool enabled[kKindSlots] = {};
  double ticks_per_ns = 1.0;
  long long offset_ticks = 0;
  uint32_t version = 130001;
  std::vector<HeldBuffer> held;  // the last one is filled; the others are full
  HeldBuffer last_completed;     // for fake_cupti_complete_again
  unsigned long long dropped_unreported = 0;
  unsigned long long dropped_total = 0;
  FailRule rules[kFnCount];
  unsigned long long calls[kFnCount] = {};
  std::set<std::string> names;  // never cleared: the addresses of its strings stand for CUPTI's per-kernel names

  void reset() {
    request = nullptr;
    complete = nullptr;
    for (bool& e : enabled) e = false;
    ticks_per_ns = 1.0;
    offset_ticks = realtime_minus_mono_ns();
    version = 130001;
    held.clear();
    last_completed = HeldBuffer{};
    dropped_unreported = 0;
    dropped_total = 0;
    for (auto& r : rules) r = FailRule{};
    for (auto& c : calls) c = 0;
  }

  uint64_t ticks_at(int64_t mono) const {
    return static_cast<uint64_t>(std::llround(ticks_per_ns * static_cast<double>(mono)) + offset_ticks);
  }

  // Counts the call and applies the failure rules; returns the code to fail with, or CUPTI_SUCCESS.
  int enter(Fn fn) {
    calls[fn] += 1;
    FailRule& r = rules[fn];
    if (!r.armed) return CUPTI_SUCCESS;
    if (r.successes >= r.after_calls) return r.code;
    r.successes += 1;
    return CUPTI_SUCCESS;
  }
};

State& state() {
  static State* s = [] {
    auto* st = new State;
    st->reset();
    return st;
  }();
  return *s;
}

uint32_t record_bytes(uint32_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
    case CUPTI_ACTIVITY_KIND_KERNEL:
      return FAKE_CUPTI_KERNEL_RECORD_BYTES;
    case CUPTI_ACTIVITY_KIND_MEMCPY:
      return FAKE_CUPTI_MEMCPY_RECORD_BYTES;
    case CUPTI_ACTIVITY_KIND_MEMSET:
      return FAKE_CUPTI_MEMSET_RECORD_BYTES;
    case CUPTI_ACTIVITY_KIND_RUNTIME:
    case CUPTI_ACTIVITY_KIND_DRIVER:
      return FAKE_CUPTI_API_RECORD_BYTES;
    case CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION:
      return FAKE_CUPTI_EXTERNAL_CORRELATION_RECORD_BYTES;
    default:
      return 0;
  }
}

template <typename T>
void write_at(uint8_t* record, size_t offset, T v) {
  std::memcpy(record + offset, &v, sizeof v);
}

// CUPTI keeps one stack of external ids per thread and kind; the fake only knows CUSTOM2 and the others' slots.
constexpr uint32_t kExternalKinds = 6;
thread_local std::vector<uint64_t> t_external_ids[kExternalKinds];

// Room for `bytes` in the held buffer, asking the product for a new one when needed (s.mu held); nullptr when it
// handed none out (the record is dropped and counted).
uint8_t* reserve(State& s, uint32_t bytes) {
  if (s.held.empty() || s.held.back().size - s.held.back().used < bytes) {
    uint8_t* data = nullptr;
    size_t size = 0;
    size_t max_records = 0;
    s.request(&data, &size, &max_records);
    if (data == nullptr || size < bytes) {
      s.dropped_unreported += 1;
      s.dropped_total += 1;
      return nullptr;
    }
    if (reinterpret_cast<uintptr_t>(data) % 8 != 0) {
      std::fprintf(stderr, "fake_cupti: buffer %p is not 8-byte aligned (CUPTI requires it)\n",
                   static_cast<void*>(data));
    }
    s.held.push_back(HeldBuffer{data, size, 0});
  }
  HeldBuffer& b = s.held.back();
  uint8_t* r = b.data + b.used;
  b.used += bytes;
  std::memset(r, 0xAB, bytes);  // garbage in the fields the product must not read
  return r;
}

// The API call behind a record, as real CUPTI writes it when DRIVER or RUNTIME is on (s.mu held): its record,
// preceded by one EXTERNAL_CORRELATION record per kind whose stack is not empty on this (the calling) thread.
// False when a buffer was refused.
bool write_api_call(State& s, uint32_t correlation_id) {
  if (!s.enabled[CUPTI_ACTIVITY_KIND_RUNTIME] && !s.enabled[CUPTI_ACTIVITY_KIND_DRIVER]) return true;
  if (s.enabled[CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION]) {
    for (uint32_t ext = 0; ext < kExternalKinds; ++ext) {
      if (t_external_ids[ext].empty()) continue;
      uint8_t* e = reserve(s, FAKE_CUPTI_EXTERNAL_CORRELATION_RECORD_BYTES);
      if (e == nullptr) return false;
      write_at<uint32_t>(e, 0, CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION);
      write_at<uint32_t>(e, 4, ext);
      write_at<uint64_t>(e, 8, t_external_ids[ext].back());
      write_at<uint32_t>(e, 16, correlation_id);
    }
  }
  uint8_t* a = reserve(s, FAKE_CUPTI_API_RECORD_BYTES);
  if (a == nullptr) return false;
  write_at<uint32_t>(a, 0, s.enabled[CUPTI_ACTIVITY_KIND_RUNTIME] ? CUPTI_ACTIVITY_KIND_RUNTIME
                                                                   : CUPTI_ACTIVITY_KIND_DRIVER);
  write_at<uint32_t>(a, 32, correlation_id);
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// CUPTI

FAKE_CUPTI_EXPORT CUptiResult cuptiGetResultString(CUptiResult result, const char** str) {
  if (str == nullptr) return CUPTI_ERROR_INVALID_PARAMETER;
  switch (result) {
    case CUPTI_SUCCESS: *str = "CUPTI_SUCCESS"; break;
    case CUPTI_ERROR_INVALID_PARAMETER: *str = "CUPTI_ERROR_INVALID_PARAMETER"; break;
    case CUPTI_ERROR_MAX_LIMIT_REACHED: *str = "CUPTI_ERROR_MAX_LIMIT_REACHED"; break;
    case CUPTI_ERROR_NOT_INITIALIZED: *str = "CUPTI_ERROR_NOT_INITIALIZED"; break;
    case CUPTI_ERROR_INSUFFICIENT_PRIVILEGES: *str = "CUPTI_ERROR_INSUFFICIENT_PRIVILEGES"; break;
    case CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED:
      *str = "CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED";
      break;
    default: *str = "CUPTI_ERROR_UNKNOWN"; break;
  }
  return CUPTI_SUCCESS;
}

FAKE_CUPTI_EXPORT CUptiResult cuptiGetVersion(uint32_t* version) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  if (const int rc = s.enter(kGetVersion); rc != CUPTI_SUCCESS) return rc;
  if (version == nullptr) return CUPTI_ERROR_INVALID_PARAMETER;
  *version = s.version;
  return CUPTI_SUCCESS;
}

FAKE_CUPTI_EXPORT CUptiResult cuptiGetTimestamp(uint64_t* timestamp) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  if (const int rc = s.enter(kGetTimestamp); rc != CUPTI_SUCCESS) return rc;
  if (timestamp == nullptr) return CUPTI_ERROR_INVALID_PARAMETER;
  *timestamp = s.ticks_at(mono_ns());
  return CUPTI_SUCCESS;
}

FAKE_CUPTI_EXPORT CUptiResult cuptiActivityRegisterCallbacks(CUpti_BuffersCallbackRequestFunc request,
                                                             CUpti_BuffersCallbackCompleteFunc complete) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  if (const int rc = s.enter(kRegisterCallbacks); rc != CUPTI_SUCCESS) return rc;
  if (request == nullptr || complete == nullptr) return CUPTI_ERROR_INVALID_PARAMETER;
  s.request = request;
  s.complete = complete;
  return CUPTI_SUCCESS;
}

FAKE_CUPTI_EXPORT CUptiResult cuptiActivityEnable(uint32_t kind) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  if (const int rc = s.enter(kEnable); rc != CUPTI_SUCCESS) return rc;
  if (kind >= kKindSlots || record_bytes(kind) == 0) return CUPTI_ERROR_INVALID_KIND;
  if (s.request == nullptr) return CUPTI_ERROR_INVALID_OPERATION;  // real CUPTI needs the callbacks first too
  s.enabled[kind] = true;
  return CUPTI_SUCCESS;
}

FAKE_CUPTI_EXPORT CUptiResult cuptiActivityDisable(uint32_t kind) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  if (const int rc = s.enter(kDisable); rc != CUPTI_SUCCESS) return rc;
  if (kind >= kKindSlots || record_bytes(kind) == 0) return CUPTI_ERROR_INVALID_KIND;
  s.enabled[kind] = false;
  return CUPTI_SUCCESS;
}

namespace {

// Hands the held buffers back to the registered callback, outside the lock, as CUPTI does: all of them when `all`,
// else those holding records. `then` runs under the lock after the buffers are taken (a finalize's reset).
template <typename Then>
CUptiResult hand_back(Fn fn, bool all, Then then) {
  State& s = state();
  std::vector<HeldBuffer> done;
  CUpti_BuffersCallbackCompleteFunc complete = nullptr;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    if (const int rc = s.enter(fn); rc != CUPTI_SUCCESS) return rc;
    complete = s.complete;
    std::vector<HeldBuffer> keep;
    for (const HeldBuffer& b : s.held) (b.used > 0 || all ? done : keep).push_back(b);
    s.held = std::move(keep);
    if (!done.empty()) s.last_completed = done.back();
    then(s);
  }
  if (complete != nullptr) {
    for (const HeldBuffer& b : done) complete(nullptr, 0, b.data, b.size, b.used);
  }
  return CUPTI_SUCCESS;
}

}  // namespace

FAKE_CUPTI_EXPORT CUptiResult cuptiActivityFlushAll(uint32_t flag) {
  return hand_back(kFlushAll, (flag & CUPTI_ACTIVITY_FLAG_FLUSH_FORCED) != 0, [](State&) {});
}

// As CUPTI documents it: every buffer still held goes back to the registered callback, then the activity state is
// gone (kinds off, callbacks forgotten) until the next call re-initialises it.
FAKE_CUPTI_EXPORT CUptiResult cuptiFinalize(void) {
  return hand_back(kFinalize, true, [](State& s) {
    for (bool& e : s.enabled) e = false;
    s.request = nullptr;
    s.complete = nullptr;
  });
}

FAKE_CUPTI_EXPORT CUptiResult cuptiActivityGetNextRecord(uint8_t* buffer, size_t valid_bytes,
                                                         CUpti_Activity** record) {
  {
    State& s = state();
    std::lock_guard<std::mutex> lk(s.mu);
    if (const int rc = s.enter(kGetNextRecord); rc != CUPTI_SUCCESS) return rc;
  }
  if (buffer == nullptr || record == nullptr) return CUPTI_ERROR_INVALID_PARAMETER;
  size_t offset = 0;
  if (*record != nullptr) {
    const auto* current = reinterpret_cast<const uint8_t*>(*record);
    uint32_t kind = 0;
    std::memcpy(&kind, current, sizeof kind);
    offset = static_cast<size_t>(current - buffer) + record_bytes(kind);
  }
  if (offset >= valid_bytes) return CUPTI_ERROR_MAX_LIMIT_REACHED;
  *record = reinterpret_cast<CUpti_Activity*>(buffer + offset);
  return CUPTI_SUCCESS;
}

FAKE_CUPTI_EXPORT CUptiResult cuptiActivityGetNumDroppedRecords(CUcontext /*context*/, uint32_t /*stream*/,
                                                                size_t* dropped) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  if (const int rc = s.enter(kGetNumDroppedRecords); rc != CUPTI_SUCCESS) return rc;
  if (dropped == nullptr) return CUPTI_ERROR_INVALID_PARAMETER;
  *dropped = static_cast<size_t>(s.dropped_unreported);
  s.dropped_unreported = 0;
  return CUPTI_SUCCESS;
}

// ---------------------------------------------------------------------------------------------------------------
// Control

FAKE_CUPTI_EXPORT void fake_cupti_reset(void) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  s.reset();
  for (auto& ids : t_external_ids) ids.clear();  // the calling thread's: other threads' are theirs to pop
}

FAKE_CUPTI_EXPORT void fake_cupti_set_clock(double ticks_per_ns, long long offset_ticks) {
  if (!(ticks_per_ns > 0.0) || !std::isfinite(ticks_per_ns)) {
    std::fprintf(stderr, "fake_cupti: set_clock needs a finite ticks_per_ns > 0, got %g\n", ticks_per_ns);
    return;
  }
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  s.ticks_per_ns = ticks_per_ns;
  s.offset_ticks = offset_ticks;
}

FAKE_CUPTI_EXPORT unsigned long long fake_cupti_ticks_at(long long mono_ns_value) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  return s.ticks_at(mono_ns_value);
}

FAKE_CUPTI_EXPORT int fake_cupti_inject(unsigned int kind, unsigned int device_id, unsigned int stream_id,
                                        const char* name, long long start_mono_ns, long long end_mono_ns,
                                        unsigned int correlation_id) {
  const uint32_t bytes = record_bytes(kind);
  if (bytes == 0) {
    std::fprintf(stderr, "fake_cupti: inject of unknown kind %u\n", kind);
    return 0;
  }
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  if (kind >= kKindSlots || !s.enabled[kind] || s.request == nullptr) return 0;
  if (!write_api_call(s, correlation_id)) return 0;
  uint8_t* r = reserve(s, bytes);
  if (r == nullptr) return 0;
  const bool untimed = start_mono_ns == 0 && end_mono_ns == 0;
  write_at<uint32_t>(r, 0, kind);
  write_at<uint64_t>(r, 16, untimed ? 0 : s.ticks_at(start_mono_ns));
  write_at<uint64_t>(r, 24, untimed ? 0 : s.ticks_at(end_mono_ns));
  if (kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || kind == CUPTI_ACTIVITY_KIND_KERNEL) {
    const char* stable = name != nullptr ? s.names.insert(name).first->c_str() : nullptr;
    write_at<uint32_t>(r, 40, device_id);
    write_at<uint32_t>(r, 44, 1);  // contextId
    write_at<uint32_t>(r, 48, stream_id);
    write_at<uint32_t>(r, 92, correlation_id);
    write_at<int64_t>(r, 96, 1);  // gridId
    write_at<const char*>(r, 104, stable);
  } else {
    write_at<uint64_t>(r, 8, 4096);  // bytes
    write_at<uint32_t>(r, 32, device_id);
    write_at<uint32_t>(r, 36, 1);  // contextId
    write_at<uint32_t>(r, 40, stream_id);
    write_at<uint32_t>(r, 44, correlation_id);
  }
  return 1;
}

FAKE_CUPTI_EXPORT CUptiResult cuptiActivityPushExternalCorrelationId(uint32_t kind, uint64_t id) {
  {
    State& s = state();
    std::lock_guard<std::mutex> lk(s.mu);
    if (const int rc = s.enter(kPushExternalCorrelationId); rc != CUPTI_SUCCESS) return rc;
  }
  if (kind == 0 || kind >= kExternalKinds) return CUPTI_ERROR_INVALID_KIND;
  t_external_ids[kind].push_back(id);
  return CUPTI_SUCCESS;
}

FAKE_CUPTI_EXPORT CUptiResult cuptiActivityPopExternalCorrelationId(uint32_t kind, uint64_t* last_id) {
  {
    State& s = state();
    std::lock_guard<std::mutex> lk(s.mu);
    if (const int rc = s.enter(kPopExternalCorrelationId); rc != CUPTI_SUCCESS) return rc;
  }
  if (kind == 0 || kind >= kExternalKinds) return CUPTI_ERROR_INVALID_KIND;
  if (t_external_ids[kind].empty()) return CUPTI_ERROR_QUEUE_EMPTY;
  if (last_id != nullptr) *last_id = t_external_ids[kind].back();
  t_external_ids[kind].pop_back();
  return CUPTI_SUCCESS;
}

FAKE_CUPTI_EXPORT int fake_cupti_api_call(unsigned int correlation_id) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  if (s.request == nullptr) return 0;
  return write_api_call(s, correlation_id) ? 1 : 0;
}

FAKE_CUPTI_EXPORT unsigned int fake_cupti_external_depth(unsigned int kind) {
  return kind < kExternalKinds ? static_cast<unsigned int>(t_external_ids[kind].size()) : 0u;
}

FAKE_CUPTI_EXPORT void fake_cupti_fail(const char* function, unsigned int after_calls, int code) {
  const int fn = find_fn(function);
  if (fn < 0) {
    std::fprintf(stderr, "fake_cupti: fail: unknown function '%s'\n", function != nullptr ? function : "(null)");
    return;
  }
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  s.rules[fn] = code == 0 ? FailRule{} : FailRule{true, after_calls, 0, code};
}

FAKE_CUPTI_EXPORT unsigned long long fake_cupti_call_count(const char* function) {
  const int fn = find_fn(function);
  if (fn < 0) {
    std::fprintf(stderr, "fake_cupti: call_count: unknown function '%s'\n",
                 function != nullptr ? function : "(null)");
    return 0;
  }
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  return s.calls[fn];
}

FAKE_CUPTI_EXPORT int fake_cupti_complete_again(void) {
  State& s = state();
  HeldBuffer b;
  CUpti_BuffersCallbackCompleteFunc complete = nullptr;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    b = s.last_completed;
    complete = s.complete;
  }
  if (b.data == nullptr || complete == nullptr) return 0;
  complete(nullptr, 0, b.data, b.size, b.used);
  return 1;
}

FAKE_CUPTI_EXPORT int fake_cupti_enabled(unsigned int kind) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  return kind < kKindSlots && s.enabled[kind] ? 1 : 0;
}

FAKE_CUPTI_EXPORT unsigned int fake_cupti_buffers_held(void) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  return static_cast<unsigned int>(s.held.size());
}

FAKE_CUPTI_EXPORT unsigned long long fake_cupti_dropped_total(void) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  return s.dropped_total;
}

FAKE_CUPTI_EXPORT void fake_cupti_set_version(unsigned int version) {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  s.version = version;
}
