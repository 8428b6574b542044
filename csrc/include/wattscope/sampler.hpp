// The native sampler: one thread that drains NVML's buffered power samples and polls the other power sources of
// every added GPU on their own cadences, stamping everything on CLOCK_MONOTONIC ns. It never touches Python and
// never throws: failures are recorded and handed out by failures().
//
// Default cadences (SamplerConfig): buffered samples drained every 250 ms, instant field 20 Hz, average field 10 Hz,
// SM clock and temperature 1 Hz, energy counter every 5 s plus on request_counter(), realtime offset 1 Hz. Each tick
// takes the lock once: it reads what to poll, makes the NVML calls unlocked, and publishes the results at once.
//
// Lifecycle: acquire() starts the thread if needed and holds it; release() lets go. With no holder left the thread
// lingers (so a result can still collect the samples that cover a window's end) and then exits by itself; data is
// kept, and the next acquire() starts a new thread that continues where the last one stopped.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "wattscope/nvml_error.hpp"
#include "wattscope/nvml_library.hpp"

namespace wattscope {

// Series recorded per device. The first four are power sources, in order of preference.
enum class Series : int {
  kSamplesMw = 0,   // nvmlDeviceGetSamples(TOTAL_POWER): ~20 ms sensor samples, stamped by the driver
  kInstantMw = 1,   // field 186, stamped at query time
  kAverageMw = 2,   // field 185 (1 s moving average on Ampere+), stamped at query time
  kEnergyMj = 3,    // nvmlDeviceGetTotalEnergyConsumption, cumulative, stamped mid-call
  kSmClockMhz = 4,
  kTemperatureC = 5,
};
constexpr int kSeriesCount = 6;
constexpr int kPowerSourceCount = 4;
const char* series_name(Series s);

struct SamplerConfig {
  // The driver's ring holds ~120 samples: ~2.4 s at 20 ms, ~1.1 s when load brings the spacing down to ~9 ms (H100).
  // 250 ms loses none even then; results ask for an extra drain, so their latency does not depend on it.
  int64_t drain_period_ns = 250'000'000;
  int64_t instant_period_ns = 50'000'000;     // the field changes every ~100 ms
  int64_t average_period_ns = 100'000'000;
  // ~4 ms of CPU per call on H100 (at 1 Hz ~0.37 % of a core): a slow background cadence, plus a reading on every
  // request_counter(), which callers make at a window's edges so that the counter brackets windows closely.
  int64_t energy_period_ns = 5'000'000'000;
  int64_t telemetry_period_ns = 1'000'000'000;  // SM clock and temperature: slow signals
  int64_t offset_period_ns = 1'000'000'000;   // re-measure realtime - monotonic; a clock step is seen within this
  int64_t linger_ns = 3'000'000'000;          // keep sampling this long after the last release
  int64_t default_sample_period_ns = 20'000'000;  // until the stream's own spacing is known
  // The first sample of a drain more than overrun_factor × the period after the last one stored: the driver's ring
  // wrapped between two drains and the samples in between are lost.
  double overrun_factor = 2.5;
  std::size_t capacity = 1u << 20;            // points per series (~5.8 h of 20 ms samples)
  bool poll_energy = true;                    // false: no counter reading at all, requested ones included
  bool poll_instant = true;
};

struct SeriesCopy {
  std::vector<int64_t> t_ns;
  std::vector<int64_t> value;
};

struct DeviceSnapshot {
  std::array<SeriesCopy, kSeriesCount> series;
  std::array<uint64_t, kSeriesCount> dropped{};
  unsigned int supported_mask = 0;     // bit i: Series(i) works on this device
  // Ring overruns that reach into the snapshot's range: from the last sample stored before one to the first after.
  // Only the sampler can see them (at drain time); holes in the stream itself, a sensor that skipped samples, are
  // found from the spacing by wattscope/energy.py, the one definition of a gap in a measurement.
  std::vector<int64_t> overrun_from_ns;
  std::vector<int64_t> overrun_to_ns;
  uint64_t overruns = 0;               // every ring overrun of this device so far
  uint64_t samples_total = 0;
  int64_t sample_period_ns = 0;        // median spacing of the buffered samples
  bool lost = false;                   // a fatal NVML error stopped polling this device
};

struct SamplerStats {
  bool running = false;
  uint64_t ticks = 0;
  uint64_t missed_deadlines = 0;
  uint64_t drains = 0;
  uint64_t threads_started = 0;
  int64_t thread_cpu_ns = 0;   // summed over every thread run so far, the chore's share excluded
  int64_t chore_cpu_ns = 0;    // CPU the chore (set_chore) took on this thread: its owner's cost
  int64_t thread_wall_ns = 0;
  int64_t realtime_offset_ns = 0;
  int64_t realtime_offset_uncertainty_ns = 0;
  // Realtime jumped against monotonic by more than 1 ms. After a step back the next drain asks the driver for its
  // whole ring (its new stamps are older than the last one seen) and keeps the samples newer than those stored.
  uint64_t clock_steps = 0;
  uint64_t overruns = 0;       // ring overruns, every device together (see DeviceSnapshot)
  uint64_t failures_dropped = 0;
};

class Sampler {
 public:
  Sampler(std::shared_ptr<NvmlLibrary> nvml, SamplerConfig config);
  ~Sampler();
  // Owns a thread and its synchronisation state: neither copyable nor movable.
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // Probes which sources the device offers (on the caller's thread; throws NvmlError if it has none or is lost)
  // and adds it to the polled set. Returns its slot. Adding the same NVML index twice returns the same slot.
  int add_device(unsigned int nvml_index);
  int device_count() const;

  void acquire();
  void release();
  void stop();  // stops and joins now, whatever the holders; acquire() starts it again
  void request_drain();
  // Asks the thread to read the energy counter of every live device now (it wakes at once; the reading is stamped
  // within ~1 ms plus the call's own ~4 ms on H100, per device). Returns at once: the caller never makes the NVML
  // call. Requests made while a reading is under way are served by another reading after it.
  void request_counter();
  // Blocks until every live device has a reading stamped at or after t_ns, or the timeout; returns whether it was
  // covered. `series` < 0 waits for each device's best power source, else for that Series where supported.
  // Call without the GIL.
  bool wait_covered(int64_t t_ns, int64_t timeout_ns, int series = -1);
  // Runs `chore` on the sampler thread at the first tick after it is set, then every period_ns, with no lock held,
  // after the tick's readings are published (its CPU goes to stats().chore_cpu_ns); an empty function removes it. One chore at a time: the kernel tracer's
  // periodic flush, which must not run on an application thread (CUPTI's buffer callbacks run inside it) nor need
  // a thread of its own. The chore must not throw and must not call back into this Sampler.
  void set_chore(std::function<void()> chore, int64_t period_ns);

  DeviceSnapshot snapshot(int slot, int64_t from_ns, int64_t to_ns) const;
  std::vector<NvmlFailure> failures() const;
  SamplerStats stats() const;
  const SamplerConfig& config() const;

 private:
  struct Impl;
  void check_owner() const;
  std::unique_ptr<Impl> impl_;
  int owner_pid_;
};

}  // namespace wattscope
