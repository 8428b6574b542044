#include "wattscope/kernel_tracer.hpp"

#include <cxxabi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <thread>
#include <unordered_map>

#include "wattscope/clock.hpp"

namespace wattscope {

// ---------------------------------------------------------------------------------------------------------------
// CuptiClockFit

double CuptiClockFit::Segment::slope() const {
  if (points.size() < 2) return 1.0;
  return static_cast<double>(points.back().mono_ns - points.front().mono_ns) /
         static_cast<double>(points.back().ticks - points.front().ticks);
}

int64_t CuptiClockFit::Segment::map(uint64_t ticks) const {
  const Point& first = points.front();
  const Point& last = points.back();
  if (ticks <= first.ticks) return first.mono_ns - std::llround(static_cast<double>(first.ticks - ticks) * slope());
  if (ticks >= last.ticks) return last.mono_ns + std::llround(static_cast<double>(ticks - last.ticks) * slope());
  const auto hi = std::upper_bound(points.begin(), points.end(), ticks,
                                   [](uint64_t t, const Point& p) { return t < p.ticks; });
  const Point& a = *(hi - 1);
  const Point& b = *hi;
  const double local = static_cast<double>(b.mono_ns - a.mono_ns) / static_cast<double>(b.ticks - a.ticks);
  return a.mono_ns + std::llround(static_cast<double>(ticks - a.ticks) * local);
}

uint64_t CuptiClockFit::Segment::distance(uint64_t ticks) const {
  if (ticks < points.front().ticks) return points.front().ticks - ticks;
  if (ticks > points.back().ticks) return ticks - points.back().ticks;
  return 0;
}

bool CuptiClockFit::add(uint64_t ticks, int64_t mono_ns) {
  const Point p{ticks, mono_ns};
  if (segments_.empty()) {
    segments_.push_back(Segment{{p}});
    return true;
  }
  Segment& s = segments_.back();
  const Point& last = s.points.back();
  bool switched = false;
  if (ticks <= last.ticks || mono_ns <= last.mono_ns) {
    switched = true;
  } else if (s.points.size() == 1) {
    const double ns_per_tick =
        static_cast<double>(mono_ns - last.mono_ns) / static_cast<double>(ticks - last.ticks);
    switched = !(ns_per_tick >= kMinNsPerTick && ns_per_tick <= kMaxNsPerTick);
  } else {
    const int64_t error_ns = s.map(ticks) - mono_ns;
    const int64_t tolerance_ns = kSwitchToleranceNs + (mono_ns - last.mono_ns) / 1000;
    switched = error_ns > tolerance_ns || error_ns < -tolerance_ns;
  }
  if (switched) {
    if (segments_.size() == kMaxSegments) {
      segments_.back() = Segment{{p}};
    } else {
      segments_.push_back(Segment{{p}});
    }
    return true;
  }
  if (s.points.size() == kMaxPoints) {
    s.points.back() = p;
  } else {
    s.points.push_back(p);
  }
  return false;
}

int64_t CuptiClockFit::to_mono_ns(uint64_t ticks) const {
  if (segments_.empty()) return 0;
  const Segment* best = &segments_.front();
  uint64_t best_distance = std::numeric_limits<uint64_t>::max();
  // Ties go to the later segment: the clock CUPTI used last.
  for (const Segment& s : segments_) {
    const uint64_t d = s.distance(ticks);
    if (d <= best_distance) {
      best_distance = d;
      best = &s;
    }
  }
  return best->map(ticks);
}

double CuptiClockFit::ns_per_tick() const { return segments_.empty() ? 0.0 : segments_.back().slope(); }

// ---------------------------------------------------------------------------------------------------------------
// TracerCore: the pool, the records and the clock fit of one recording.

namespace {

struct RawRecord {
  uint64_t start_ticks = 0;
  uint64_t end_ticks = 0;
  int32_t name_index = -1;
  uint32_t kind = 0;
  uint32_t device_id = 0;
  uint32_t stream_id = 0;
  uint32_t correlation_id = 0;
};

// Offsets that hold from CUpti_ActivityKernel4 to Kernel13 (CUDA 11.x to 13.5; measurement-facts §3).
constexpr std::size_t kKindAt = 0;
constexpr std::size_t kStartAt = 16;
constexpr std::size_t kEndAt = 24;
constexpr std::size_t kKernelDeviceAt = 40;
constexpr std::size_t kKernelStreamAt = 48;
constexpr std::size_t kKernelCorrelationAt = 92;
constexpr std::size_t kKernelNameAt = 104;
// CUpti_ActivityMemcpy* (kind u32, copyKind/srcKind/dstKind/flags u8, bytes u64, start, end, deviceId, contextId,
// streamId, correlationId) and CUpti_ActivityMemset* (kind, value u32, bytes u64, then the same) share kind, start
// and end with the kernel records but put deviceId @32, contextId @36, streamId @40, correlationId @44. Taken from
// the field order of cupti_activity.h; not yet checked against a real libcupti (no GPU in this session).
constexpr std::size_t kCopyDeviceAt = 32;
constexpr std::size_t kCopyStreamAt = 40;
constexpr std::size_t kCopyCorrelationAt = 44;
// CUpti_ActivityExternalCorrelation (kind u32, externalKind u32, externalId u64, correlationId u32, reserved u32):
// unchanged since CUDA 8.
constexpr std::size_t kExternalKindAt = 4;
constexpr std::size_t kExternalIdAt = 8;
constexpr std::size_t kExternalCorrelationAt = 16;

template <typename T>
T read_at(const uint8_t* record, std::size_t offset) {
  T v;
  // Records are 8-aligned, but memcpy keeps UBSan and strict aliasing quiet whatever the field.
  std::memcpy(&v, record + offset, sizeof v);
  return v;
}

// A pool of `words` for a new core: a retired core's spare of that size when there is one (Registry, below).
std::vector<uint64_t> take_storage(std::size_t words);

}  // namespace

struct TracerCore {
  TracerCore(std::shared_ptr<CuptiLibrary> lib_in, const TracerConfig& config)
      : lib(std::move(lib_in)),
        words_per_buffer((config.buffer_bytes + 7) / 8),
        buffer_bytes(words_per_buffer * 8),
        capacity(config.capacity),
        range_pair_capacity(config.range_pair_capacity),
        storage(take_storage(words_per_buffer * config.buffer_count)),
        busy(config.buffer_count, 0) {
    free_list.reserve(config.buffer_count);
    for (std::size_t i = config.buffer_count; i-- > 0;) {
      free_list.push_back(reinterpret_cast<uint8_t*>(storage.data() + i * words_per_buffer));
    }
  }
  // Lives in the registry while CUPTI may hold its buffers: never copied or moved.
  TracerCore(const TracerCore&) = delete;
  TracerCore& operator=(const TracerCore&) = delete;

  bool owns(const uint8_t* p) const {
    const auto* begin = reinterpret_cast<const uint8_t*>(storage.data());
    return p >= begin && p < begin + storage.size() * 8;
  }

  // From CUPTI's request callback: no allocation (free_list has its capacity from the start), no Python.
  void take(uint8_t** buffer, size_t* size) {
    std::lock_guard<std::mutex> lk(pool_mu);
    // A request that found this core active just before its stop: the pool may be on its way to the spares.
    if (retired || free_list.empty()) {
      refused += 1;
      return;
    }
    *buffer = free_list.back();
    *size = buffer_bytes;
    free_list.pop_back();
    busy[offset_of(*buffer) / buffer_bytes] = 1;
    outstanding += 1;
  }

  // From the complete callback, before parsing: whether CUPTI held this buffer. A buffer completed a second time
  // (or one never handed out) is counted and left alone: parsing it again would count its records twice, and
  // returning it twice would put it in the free list twice and let the pool go while CUPTI still holds it.
  bool accept(const uint8_t* buffer) {
    std::lock_guard<std::mutex> lk(pool_mu);
    // owns() was checked under the registry's lock, released since: a pool released meanwhile (another thread's
    // completion, a stop) is empty now, and nothing of it may be read. A pointer inside a buffer (a spare pool
    // reused with other buffer sizes) is not one we handed out either.
    const bool ours = owns(buffer);
    const std::size_t offset = ours ? offset_of(buffer) : 0;  // a pointer difference only within the pool
    if (!ours || offset % buffer_bytes != 0 || busy[offset / buffer_bytes] == 0) {
      duplicates += 1;
      return false;
    }
    busy[offset / buffer_bytes] = 0;
    return true;
  }

  // After parsing an accepted buffer. Returns true when the core is retired and CUPTI holds none of its buffers.
  bool give_back(uint8_t* buffer) {
    std::lock_guard<std::mutex> lk(pool_mu);
    free_list.push_back(buffer);
    outstanding -= 1;
    completed += 1;
    return retired && outstanding == 0;
  }

  std::size_t offset_of(const uint8_t* buffer) const {
    return static_cast<std::size_t>(buffer - reinterpret_cast<const uint8_t*>(storage.data()));
  }

  // A retired core whose buffers are all back hands its pool to the registry's spares (the records stay): a
  // window spanning many torch.profiler cycles keeps one stopped core per cycle, and the next recording reuses the
  // memory rather than giving it back to the heap, which a late write by CUPTI would corrupt (PyTorch saw exactly
  // that: pytorch/pytorch#195471). Limits: past kMaxSpares the oldest spare is freed after all; and a late or
  // duplicate completion of an old buffer reaching a pool reused at the same address is taken for the new core's.
  // Called with registry().mu held (the completion callback's owns() lookup) and takes pool_mu (accept's).
  std::vector<uint64_t> release_pool() {
    std::lock_guard<std::mutex> lk(pool_mu);
    std::vector<uint8_t*>().swap(free_list);
    return std::move(storage);
  }

  void parse(uint8_t* buffer, size_t valid_bytes, CUcontext context, uint32_t stream) {
    const CuptiSymbols& sym = lib->sym();
    std::size_t dropped_now = 0;
    const bool have_dropped = sym.dropped_records != nullptr &&
                              sym.dropped_records(context, stream, &dropped_now) == CUPTI_SUCCESS;
    std::lock_guard<std::mutex> lk(records_mu);
    if (have_dropped) dropped += dropped_now;
    if (valid_bytes == 0) return;
    CUpti_Activity* activity = nullptr;
    for (;;) {
      const CUptiResult rc = sym.next_record(buffer, valid_bytes, &activity);
      if (rc == CUPTI_ERROR_MAX_LIMIT_REACHED) break;
      if (rc != CUPTI_SUCCESS) {
        parse_errors += 1;
        break;
      }
      const auto* p = reinterpret_cast<const uint8_t*>(activity);
      RawRecord r;
      r.kind = read_at<uint32_t>(p, kKindAt);
      if (r.kind == CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION) {
        if (read_at<uint32_t>(p, kExternalKindAt) != CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM2) continue;  // Kineto's
        if (range_pairs.size() >= range_pair_capacity) {
          range_pairs_lost += 1;
        } else {
          range_pairs.emplace_back(read_at<uint32_t>(p, kExternalCorrelationAt), read_at<uint64_t>(p, kExternalIdAt));
        }
        continue;
      }
      r.start_ticks = read_at<uint64_t>(p, kStartAt);
      r.end_ticks = read_at<uint64_t>(p, kEndAt);
      if (r.kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || r.kind == CUPTI_ACTIVITY_KIND_KERNEL) {
        r.kind = CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
        r.device_id = read_at<uint32_t>(p, kKernelDeviceAt);
        r.stream_id = read_at<uint32_t>(p, kKernelStreamAt);
        r.correlation_id = read_at<uint32_t>(p, kKernelCorrelationAt);
        r.name_index = intern(read_at<const char*>(p, kKernelNameAt));
      } else if (r.kind == CUPTI_ACTIVITY_KIND_MEMCPY || r.kind == CUPTI_ACTIVITY_KIND_MEMSET) {
        r.device_id = read_at<uint32_t>(p, kCopyDeviceAt);
        r.stream_id = read_at<uint32_t>(p, kCopyStreamAt);
        r.correlation_id = read_at<uint32_t>(p, kCopyCorrelationAt);
      } else {
        continue;  // a kind someone else enabled (torch.profiler shares CUPTI's buffers): not ours to keep
      }
      if (r.start_ticks == 0 && r.end_ticks == 0) {
        incomplete += 1;
      } else if (records.size() >= capacity) {
        overflow += 1;
      } else {
        records.push_back(r);
      }
    }
  }

  // CUPTI keeps one name string per kernel function for the life of its module: intern by pointer, copy once,
  // demangled as torch.profiler and Nsight show it ("void at::native::...<8, ...>(...)", not "_ZN2at6native...").
  int32_t intern(const char* name) {
    if (name == nullptr) return -1;
    const auto [it, inserted] = name_ids.try_emplace(name, static_cast<int32_t>(names.size()));
    if (inserted) names.push_back(demangled(name));
    return it->second;
  }

  static std::string demangled(const char* name) {
    // Only mangled function names: __cxa_demangle also reads type encodings, and would turn a kernel named "f" or
    // "i" (extern "C") into "float" or "int".
    if (std::strncmp(name, "_Z", 2) != 0) return name;
    int status = 0;
    char* out = abi::__cxa_demangle(name, nullptr, nullptr, &status);
    if (status != 0 || out == nullptr) return name;  // not a mangled C++ name (extern "C", cuBLAS's nvjet_*)
    std::string readable(out);
    std::free(out);
    return readable;
  }

  const std::shared_ptr<CuptiLibrary> lib;
  const std::size_t words_per_buffer;
  const std::size_t buffer_bytes;
  const std::size_t capacity;
  const std::size_t range_pair_capacity;
  std::vector<uint64_t> storage;  // uint64_t: every buffer starts 8-byte aligned, as CUPTI requires

  std::mutex pool_mu;  // after registry().mu when both are held
  std::vector<uint8_t> busy;  // per buffer: handed to CUPTI and not completed yet
  std::vector<uint8_t*> free_list;
  std::size_t outstanding = 0;
  uint64_t refused = 0;
  uint64_t completed = 0;
  uint64_t duplicates = 0;  // completions of a buffer CUPTI did not hold (accept())
  bool retired = false;

  mutable std::mutex records_mu;
  std::vector<RawRecord> records;
  std::vector<std::pair<uint32_t, uint64_t>> range_pairs;  // (correlation id, range id)
  uint64_t range_pairs_lost = 0;
  std::unordered_map<const char*, int32_t> name_ids;
  std::vector<std::string> names;
  uint64_t dropped = 0;
  uint64_t overflow = 0;
  uint64_t incomplete = 0;
  uint64_t parse_errors = 0;

  mutable std::mutex clock_mu;
  CuptiClockFit clock;
};

namespace {

// CUPTI's callbacks carry no user pointer, so they find the recording here: `active` hands out buffers, and `cores`
// lists every recording whose buffers CUPTI may still hold (a stop whose flush failed leaves some there; they are
// parsed whenever CUPTI returns them). Never destroyed: CUPTI may call back from its own thread during exit.
struct Registry {
  std::mutex mu;
  std::shared_ptr<TracerCore> active;
  std::vector<std::shared_ptr<TracerCore>> cores;
  // Pools of retired cores, for the next ones (TracerCore::release_pool, take_storage); at most kMaxSpares.
  std::vector<std::vector<uint64_t>> spares;
};

constexpr std::size_t kMaxSpares = 4;

Registry& registry() {
  static Registry* r = new Registry;
  return *r;
}

void erase_core(Registry& reg, const TracerCore* core) {
  reg.cores.erase(std::remove_if(reg.cores.begin(), reg.cores.end(),
                                 [core](const std::shared_ptr<TracerCore>& c) { return c.get() == core; }),
                  reg.cores.end());
}

void on_buffer_request(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = nullptr;
  *size = 0;
  *max_records = 0;  // as many as fit
  Registry& reg = registry();
  std::shared_ptr<TracerCore> core;
  {
    std::lock_guard<std::mutex> lk(reg.mu);
    core = reg.active;
  }
  if (core != nullptr) core->take(buffer, size);
}

void keep_spare(Registry& reg, std::vector<uint64_t> pool) {
  // Called with reg.mu held. Past kMaxSpares the oldest goes back to the heap: a pool of a size no recording asks
  // for any more (tests shrink the pool), retired long ago.
  reg.spares.push_back(std::move(pool));
  if (reg.spares.size() > kMaxSpares) reg.spares.erase(reg.spares.begin());
}

void on_buffer_complete(CUcontext context, uint32_t stream, uint8_t* buffer, size_t /*size*/, size_t valid_bytes) {
  Registry& reg = registry();
  std::shared_ptr<TracerCore> core;
  {
    std::lock_guard<std::mutex> lk(reg.mu);
    for (const auto& c : reg.cores) {
      if (c->owns(buffer)) {
        core = c;
        break;
      }
    }
  }
  // Not one of ours: a buffer another client (Kineto) left inside CUPTI, handed back by the forced flush at our
  // start. Its owner may have freed it: do not read it; CUPTI no longer holds it either.
  if (core == nullptr || !core->accept(buffer)) return;
  core->parse(buffer, valid_bytes, context, stream);
  if (core->give_back(buffer)) {
    std::lock_guard<std::mutex> lk(reg.mu);
    erase_core(reg, core.get());
    keep_spare(reg, core->release_pool());
  }
}

// Stops handing out the core's buffers and forgets it once CUPTI holds none of them.
void retire(const std::shared_ptr<TracerCore>& core) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lk(reg.mu);
  if (reg.active == core) reg.active.reset();
  bool idle = false;
  {
    std::lock_guard<std::mutex> pool(core->pool_mu);
    core->retired = true;
    idle = core->outstanding == 0;
  }
  if (idle) {
    erase_core(reg, core.get());
    keep_spare(reg, core->release_pool());
  }
}

std::vector<uint64_t> take_storage(std::size_t words) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lk(reg.mu);
  for (auto it = reg.spares.begin(); it != reg.spares.end(); ++it) {
    if (it->size() == words) {
      std::vector<uint64_t> pool = std::move(*it);
      reg.spares.erase(it);
      return pool;
    }
  }
  return std::vector<uint64_t>(words);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// KernelTracer

KernelTracer::KernelTracer(std::shared_ptr<CuptiLibrary> cupti, TracerConfig config)
    : cupti_(std::move(cupti)), config_(config) {
  if (cupti_ == nullptr) throw std::invalid_argument("KernelTracer needs a loaded CUPTI library");
  if (config_.buffer_bytes < 1024 || config_.buffer_count == 0 || config_.capacity == 0) {
    throw std::invalid_argument("KernelTracer: buffer_bytes must be >= 1024, buffer_count and capacity >= 1");
  }
}

KernelTracer::~KernelTracer() { stop(); }

void KernelTracer::start() {
  std::lock_guard<std::mutex> lk(control_mu_);
  if (running_) return;
  auto core = std::make_shared<TracerCore>(cupti_, config_);
  {
    Registry& reg = registry();
    std::lock_guard<std::mutex> reg_lk(reg.mu);
    if (reg.active != nullptr) {
      throw CuptiError("KernelTracer.start", kCuptiTracerBusy,
                       "another kernel tracer is recording in this process (CUPTI's activity state is "
                       "process-global): stop it first");
    }
    reg.active = core;
    reg.cores.push_back(core);
  }
  core_ = core;
  {
    std::lock_guard<std::mutex> f(failures_mu_);
    failures_.clear();
    failures_dropped_ = 0;
  }
  flushes_ = 0;
  const CuptiSymbols& sym = cupti_->sym();
  try {
    cupti_->check("cuptiActivityRegisterCallbacks", sym.register_callbacks(on_buffer_request, on_buffer_complete));
    // A client before us (torch.profiler's Kineto) may have left a buffer inside CUPTI and freed it: enabling now
    // would make CUPTI write our records into freed memory. A forced flush hands every such buffer to our complete
    // callback, which ignores buffers it did not hand out, so CUPTI lets go of them first.
    if (const CUptiResult rc = sym.flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED); rc != CUPTI_SUCCESS) {
      record_failure(cupti_->capture("cuptiActivityFlushAll", rc));  // a clean-up step: not a reason to fail
    }
    std::vector<uint32_t> kinds{CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL};
    if (config_.memcpy) kinds.push_back(CUPTI_ACTIVITY_KIND_MEMCPY);
    if (config_.memset) kinds.push_back(CUPTI_ACTIVITY_KIND_MEMSET);
    if (config_.ranges) {
      if (!cupti_->has_ranges()) {
        throw CuptiError("KernelTracer.start", kCuptiSymbolMissing,
                         "this libcupti has no cuptiActivityPushExternalCorrelationId: user ranges need CUPTI "
                         "from CUDA 8 or later");
      }
      // Launches reach the driver either through the runtime (torch's cudaLaunchKernel) or directly (Triton's
      // cuLaunchKernel); a kernel carries the correlation id of the call that launched it, so both kinds are on.
      for (uint32_t kind : {CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION, CUPTI_ACTIVITY_KIND_RUNTIME,
                            CUPTI_ACTIVITY_KIND_DRIVER}) {
        kinds.push_back(kind);
      }
    }
    for (uint32_t kind : kinds) {
      cupti_->check("cuptiActivityEnable", sym.enable(kind));
      enabled_kinds_.push_back(kind);
    }
    take_clock_point(true);
  } catch (...) {
    // Leave CUPTI as we found it; the forced flush brings back any buffer handed out meanwhile.
    for (uint32_t kind : enabled_kinds_) sym.disable(kind);
    enabled_kinds_.clear();
    {
      Registry& reg = registry();
      std::lock_guard<std::mutex> reg_lk(reg.mu);
      reg.active.reset();
    }
    sym.flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    retire(core);
    throw;
  }
  running_ = true;
}

void KernelTracer::stop() {
  std::lock_guard<std::mutex> lk(control_mu_);
  if (!running_) return;
  const CuptiSymbols& sym = cupti_->sym();
  for (uint32_t kind : enabled_kinds_) {
    if (const CUptiResult rc = sym.disable(kind); rc != CUPTI_SUCCESS) {
      record_failure(cupti_->capture("cuptiActivityDisable", rc));
    }
  }
  enabled_kinds_.clear();
  {
    Registry& reg = registry();
    std::lock_guard<std::mutex> reg_lk(reg.mu);
    if (reg.active == core_) reg.active.reset();
  }
  if (const CUptiResult rc = sym.flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED); rc != CUPTI_SUCCESS) {
    record_failure(cupti_->capture("cuptiActivityFlushAll", rc));
  }
  take_clock_point(false);
  retire(core_);
  running_ = false;
}

bool KernelTracer::flush(bool forced) {
  std::lock_guard<std::mutex> lk(control_mu_);
  return flush_locked(forced);
}

bool KernelTracer::try_flush() {
  std::unique_lock<std::mutex> lk(control_mu_, std::try_to_lock);
  return lk.owns_lock() && flush_locked(false);
}

bool KernelTracer::flush_locked(bool forced) {
  if (!running_) return false;
  if (const CUptiResult rc = cupti_->sym().flush_all(forced ? uint32_t{CUPTI_ACTIVITY_FLAG_FLUSH_FORCED} : uint32_t{0});
      rc != CUPTI_SUCCESS) {
    record_failure(cupti_->capture("cuptiActivityFlushAll", rc));
  }
  take_clock_point(false);
  flushes_ += 1;
  return true;
}

bool KernelTracer::running() const {
  std::lock_guard<std::mutex> lk(control_mu_);
  return running_;
}

void KernelTracer::take_clock_point(bool throw_on_failure) {
  // A segment that has just begun (the first point, or a clock switch) gets a second point 1 ms later: with one
  // point its slope is a guess (1 ns per tick), and records stamped between the switch and the next flush are
  // extrapolated with it.
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    // The tightest of a few (monotonic, CUPTI, monotonic) brackets, as for NVML's realtime offset (clock.cpp).
    uint64_t best_ticks = 0;
    int64_t best_mono_ns = 0;
    int64_t best_half_ns = std::numeric_limits<int64_t>::max();
    for (int i = 0; i < 5; ++i) {
      uint64_t ticks = 0;
      const int64_t before = mono_now_ns();
      const CUptiResult rc = cupti_->sym().get_timestamp(&ticks);
      const int64_t after = mono_now_ns();
      if (rc != CUPTI_SUCCESS) {
        if (throw_on_failure) cupti_->check("cuptiGetTimestamp", rc);
        record_failure(cupti_->capture("cuptiGetTimestamp", rc));
        return;
      }
      if ((after - before) / 2 < best_half_ns) {
        best_half_ns = (after - before) / 2;
        best_mono_ns = before + best_half_ns;
        best_ticks = ticks;
      }
    }
    std::lock_guard<std::mutex> clk(core_->clock_mu);
    if (!core_->clock.add(best_ticks, best_mono_ns)) return;
  }
}

void KernelTracer::record_failure(CuptiFailure f) {
  std::lock_guard<std::mutex> lk(failures_mu_);
  if (failures_.size() < kMaxFailures) {
    failures_.push_back(std::move(f));
  } else {
    failures_dropped_ += 1;
  }
}

TracerSnapshot KernelTracer::snapshot() const {
  std::shared_ptr<TracerCore> core;
  {
    std::lock_guard<std::mutex> lk(control_mu_);
    core = core_;
  }
  TracerSnapshot out;
  if (core == nullptr) return out;
  CuptiClockFit clock;
  {
    std::lock_guard<std::mutex> clk(core->clock_mu);
    clock = core->clock;
  }
  out.clock_segments = clock.segment_count();
  {
    std::lock_guard<std::mutex> pool(core->pool_mu);
    out.buffers_refused = core->refused;
    out.buffers_duplicate = core->duplicates;
  }
  std::lock_guard<std::mutex> rec(core->records_mu);
  const std::size_t n = core->records.size();
  out.start_ns.resize(n);
  out.end_ns.resize(n);
  out.name_index.resize(n);
  out.kind.resize(n);
  out.device_id.resize(n);
  out.stream_id.resize(n);
  out.correlation_id.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const RawRecord& r = core->records[i];
    out.start_ns[i] = clock.to_mono_ns(r.start_ticks);
    out.end_ns[i] = clock.to_mono_ns(r.end_ticks);
    out.name_index[i] = r.name_index;
    out.kind[i] = r.kind;
    out.device_id[i] = r.device_id;
    out.stream_id[i] = r.stream_id;
    out.correlation_id[i] = r.correlation_id;
  }
  out.names = core->names;
  out.range_correlation_id.reserve(core->range_pairs.size());
  out.range_id.reserve(core->range_pairs.size());
  for (const auto& [correlation, id] : core->range_pairs) {
    out.range_correlation_id.push_back(correlation);
    out.range_id.push_back(id);
  }
  out.range_pairs_lost = core->range_pairs_lost;
  out.records_dropped = core->dropped;
  out.records_overflow = core->overflow;
  out.records_incomplete = core->incomplete;
  return out;
}

TracerStats KernelTracer::stats() const {
  TracerStats st;
  std::shared_ptr<TracerCore> core;
  {
    std::lock_guard<std::mutex> lk(control_mu_);
    st.running = running_;
    core = core_;
  }
  st.flushes = flushes_.load();
  {
    std::lock_guard<std::mutex> lk(failures_mu_);
    st.failures_dropped = failures_dropped_;
  }
  if (core == nullptr) return st;
  {
    std::lock_guard<std::mutex> pool(core->pool_mu);
    st.buffers_completed = core->completed;
    st.buffers_refused = core->refused;
    st.buffers_outstanding = core->outstanding;
    st.buffers_duplicate = core->duplicates;
  }
  {
    std::lock_guard<std::mutex> rec(core->records_mu);
    st.records = core->records.size();
    st.parse_errors = core->parse_errors;
  }
  std::lock_guard<std::mutex> clk(core->clock_mu);
  st.clock_segments = core->clock.segment_count();
  st.ns_per_tick = core->clock.ns_per_tick();
  return st;
}

std::vector<CuptiFailure> KernelTracer::failures() const {
  std::lock_guard<std::mutex> lk(failures_mu_);
  return failures_;
}

}  // namespace wattscope
