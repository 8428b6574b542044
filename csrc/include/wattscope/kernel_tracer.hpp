// GPU activity (kernels, memcpy, memset) timestamped on CLOCK_MONOTONIC, through CUPTI's Activity API.
//
// CUPTI's activity state is process-global: one KernelTracer records at a time. Buffers come from a fixed pool
// allocated before tracing starts; CUPTI's request callback runs inside CUDA calls on application threads, so it
// neither allocates nor touches Python: when the pool is empty it hands out nothing and counts the refusal (CUPTI
// then drops those records and says how many). No cuptiSubscribe handle is ever held (it would make torch.profiler
// silently record no GPU events), and a tracer never finalizes CUPTI (only the interpreter's exit hook may:
// CuptiLibrary::finalize).
//
// Clock: CUPTI stamps records with CLOCK_REALTIME ns by default, but with TSC ticks after a torch.profiler session
// (Kineto installs its own timestamp callback). Records keep their raw stamps; CuptiClockFit maps them to
// CLOCK_MONOTONIC from (clock_gettime, cuptiGetTimestamp, clock_gettime) triples taken at start, at every flush
// and at stop, and starts a new segment of the fit when the clock CUPTI uses changes.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "wattscope/cupti_library.hpp"

namespace wattscope {

// Piecewise-linear map from CUPTI timestamps to CLOCK_MONOTONIC ns. Within a segment (one CUPTI clock) it
// interpolates between the points and extrapolates with the segment's mean slope; a segment with a single point
// assumes 1 ns per tick (the default CLOCK_REALTIME), so KernelTracer gives every new segment a second point 1 ms
// after its first. A raw stamp is mapped with the segment whose tick range is
// nearest to it: realtime ns (~1.7e18) and TSC ticks (uptime × GHz, ~1e14) are far apart, so records stamped after
// a clock switch but before the next point still find their segment.
class CuptiClockFit {
 public:
  struct Point {
    uint64_t ticks = 0;
    int64_t mono_ns = 0;
  };
  // Bounds: a segment keeps at most this many points (a further one replaces the last, which keeps extrapolation
  // right); past kMaxSegments a switch replaces the last segment. 4096 points are ~7 min of flushes every 100 ms,
  // more at the usual slower flush rates; 64 segments are 32 torch.profiler sessions in one recording.
  static constexpr std::size_t kMaxPoints = 4096;
  static constexpr std::size_t kMaxSegments = 64;
  // A new point more than this far from the current segment's prediction means the clock switched: a few
  // brackets' worth of error plus 1e-3 of the time since the last point (NTP slews realtime by at most 5e-4).
  static constexpr int64_t kSwitchToleranceNs = 50'000;
  // Plausible ns per tick for a fresh segment's second point: realtime ns (1.0) or TSC ticks of a 0.05–20 GHz
  // counter.
  static constexpr double kMinNsPerTick = 0.05;
  static constexpr double kMaxNsPerTick = 20.0;

  // Adds a point; returns true when it started a new segment (a clock switch, or the first point).
  bool add(uint64_t ticks, int64_t mono_ns);
  int64_t to_mono_ns(uint64_t ticks) const;
  std::size_t segment_count() const { return segments_.size(); }
  // Slope of the latest segment (1.0 while it has a single point); 0 before any point.
  double ns_per_tick() const;

 private:
  struct Segment {
    std::vector<Point> points;  // ticks strictly increasing
    double slope() const;
    int64_t map(uint64_t ticks) const;
    uint64_t distance(uint64_t ticks) const;
  };
  std::vector<Segment> segments_;
};

struct TracerConfig {
  std::size_t buffer_bytes = 4u << 20;  // per buffer: ~19k kernel records of 216 B
  std::size_t buffer_count = 8;
  std::size_t capacity = 1u << 22;      // records kept per recording; further ones are counted in records_overflow
  bool memcpy = true;
  bool memset = true;
  // User ranges: also enable DRIVER, RUNTIME and EXTERNAL_CORRELATION, so that every API call made while a range id
  // is pushed (CuptiLibrary::push_range) yields a (correlation id, range id) pair. A kernel's correlation id is its
  // launching call's, which ties it to the innermost range open on the launching thread. The API records themselves
  // are skipped; they cost a record per CUDA call.
  bool ranges = false;
  // Pairs kept per recording: CUPTI writes one for every API call inside a range (launches, and the calls around
  // them: cudaGetLastError, allocator and event calls), so they outnumber the kernel records several times over.
  std::size_t range_pair_capacity = 1u << 23;
};

// One recording's records, mapped to CLOCK_MONOTONIC. name_index indexes names (kernels) or is -1 (memcpy,
// memset). kind is CUPTI's: 10 kernel, 1 memcpy, 2 memset.
struct TracerSnapshot {
  std::vector<int64_t> start_ns;
  std::vector<int64_t> end_ns;
  std::vector<int32_t> name_index;
  std::vector<uint32_t> kind;
  std::vector<uint32_t> device_id;
  std::vector<uint32_t> stream_id;
  std::vector<uint32_t> correlation_id;
  std::vector<std::string> names;
  // (correlation id, range id) pairs from EXTERNAL_CORRELATION records (TracerConfig::ranges), in arrival order.
  std::vector<uint32_t> range_correlation_id;
  std::vector<uint64_t> range_id;
  uint64_t range_pairs_lost = 0;    // pairs parsed while `range_pair_capacity` was full (not dropped records)
  uint64_t buffers_refused = 0;     // request callbacks answered with no buffer (pool empty)
  uint64_t buffers_duplicate = 0;   // completions of a buffer CUPTI did not hold (ignored: see TracerCore::accept)
  uint64_t records_dropped = 0;     // records CUPTI reports dropped (cuptiActivityGetNumDroppedRecords)
  uint64_t records_overflow = 0;    // records parsed while `capacity` was full
  uint64_t records_incomplete = 0;  // records with start = end = 0 (CUPTI could not time them)
  std::size_t clock_segments = 0;
};

struct TracerStats {
  bool running = false;
  uint64_t flushes = 0;
  uint64_t buffers_completed = 0;
  uint64_t buffers_refused = 0;
  std::size_t buffers_outstanding = 0;  // handed to CUPTI and not returned yet
  uint64_t buffers_duplicate = 0;
  std::size_t records = 0;
  std::size_t clock_segments = 0;
  double ns_per_tick = 0.0;
  uint64_t parse_errors = 0;      // cuptiActivityGetNextRecord failures (the rest of that buffer is lost)
  uint64_t failures_dropped = 0;  // failures past kMaxFailures
};

struct TracerCore;  // buffers and records; outlives the tracer while CUPTI still holds its buffers

class KernelTracer {
 public:
  KernelTracer(std::shared_ptr<CuptiLibrary> cupti, TracerConfig config);
  // Stops (never throws).
  ~KernelTracer();
  // Owns process-global CUPTI state through callbacks that find it by address: neither copyable nor movable.
  KernelTracer(const KernelTracer&) = delete;
  KernelTracer& operator=(const KernelTracer&) = delete;

  // Begins a new recording (the previous one's records are discarded): registers the buffer callbacks, force-flushes
  // (so CUPTI lets go of buffers an earlier client left in it), enables CONCURRENT_KERNEL (and MEMCPY, MEMSET as
  // configured) and takes the first clock point. No-op while running.
  // Throws CuptiError (kCuptiTracerBusy when another KernelTracer is running); on failure nothing stays enabled.
  void start();
  // Disables the kinds, force-flushes and takes the last clock point. No-op when not running. Never throws: CUPTI
  // failures go to failures(), and buffers CUPTI keeps are parsed if it ever returns them.
  void stop();
  // cuptiActivityFlushAll (forced or not) and a clock point. Returns false when not running. Safe from any thread,
  // concurrently with stop(); never throws (failures go to failures()).
  bool flush(bool forced = false);
  // The sampler's periodic chore: flush(false), skipped at once (returning false) when another thread is in
  // start/stop/flush: it must not wait behind a window's forced flush.
  bool try_flush();
  bool running() const;

  // The current (or last) recording so far. Records still inside CUPTI's buffers appear after the next flush.
  TracerSnapshot snapshot() const;
  TracerStats stats() const;
  std::vector<CuptiFailure> failures() const;

  static constexpr std::size_t kMaxFailures = 64;

 private:
  bool flush_locked(bool forced);  // control_mu_ held
  void record_failure(CuptiFailure f);
  // A (monotonic, CUPTI, monotonic) triple into the clock fit; a cuptiGetTimestamp failure throws CuptiError when
  // throw_on_failure, else goes to failures().
  void take_clock_point(bool throw_on_failure);

  std::shared_ptr<CuptiLibrary> cupti_;
  TracerConfig config_;
  mutable std::mutex control_mu_;  // start/stop/flush; never held by a CUPTI callback
  std::shared_ptr<TracerCore> core_;
  std::vector<uint32_t> enabled_kinds_;
  bool running_ = false;
  std::atomic<uint64_t> flushes_{0};
  mutable std::mutex failures_mu_;
  std::vector<CuptiFailure> failures_;
  uint64_t failures_dropped_ = 0;
};

}  // namespace wattscope
