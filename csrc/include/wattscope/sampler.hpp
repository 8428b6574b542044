// The native sampler: one thread that drains NVML's buffered power samples and polls the other power sources of
// every added GPU on their own cadences, stamping everything on CLOCK_MONOTONIC ns. It never touches Python and
// never throws: failures are recorded and handed out by failures().
//
// Lifecycle: acquire() starts the thread if needed and holds it; release() lets go. With no holder left the thread
// lingers (so a result can still collect the samples that cover a window's end) and then exits by itself; data is
// kept, and the next acquire() starts a new thread that continues where the last one stopped.
#pragma once

#include <array>
#include <cstdint>
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
  int64_t drain_period_ns = 100'000'000;      // ring of ~120 × 20 ms = 2.4 s on H100: 100 ms drains lose none;
                                              // results ask for an extra drain, so latency does not depend on it
  int64_t instant_period_ns = 50'000'000;     // the field changes every ~100 ms
  int64_t average_period_ns = 100'000'000;
  // ~4 ms of CPU per call on H100 (measured: 10 Hz cost 5 % of a core): 1 Hz keeps the thread under 0.5 %;
  // the counter is only a cross-check, interpolated at the window edges.
  int64_t energy_period_ns = 1'000'000'000;
  int64_t telemetry_period_ns = 500'000'000;  // SM clock and temperature
  int64_t offset_period_ns = 1'000'000'000;   // re-measure realtime - monotonic
  int64_t linger_ns = 3'000'000'000;          // keep sampling this long after the last release
  int64_t default_sample_period_ns = 20'000'000;  // until the stream's own spacing is known
  double gap_factor = 2.5;                    // a spacing above gap_factor × period is a gap
  std::size_t capacity = 1u << 20;            // points per series (~5.8 h of 20 ms samples)
  bool poll_energy = true;
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
  std::vector<int64_t> gap_from_ns;    // holes in the buffered-sample stream (driver ring overran or dropped)
  std::vector<int64_t> gap_to_ns;
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
  int64_t thread_cpu_ns = 0;   // summed over every thread run so far
  int64_t thread_wall_ns = 0;
  int64_t realtime_offset_ns = 0;
  int64_t realtime_offset_uncertainty_ns = 0;
  uint64_t clock_steps = 0;    // realtime jumped against monotonic by more than 1 ms
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
  // Blocks until every live device has a reading stamped at or after t_ns, or the timeout; returns whether it was
  // covered. `series` < 0 waits for each device's best power source, else for that Series where supported.
  // Call without the GIL.
  bool wait_covered(int64_t t_ns, int64_t timeout_ns, int series = -1);

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
