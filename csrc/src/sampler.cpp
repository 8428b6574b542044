#include "wattscope/sampler.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>

#include "wattscope/bounded_series.hpp"
#include "wattscope/clock.hpp"

namespace wattscope {

namespace {

constexpr std::size_t kMaxFailuresKept = 256;
constexpr std::size_t kMaxOverrunsKept = 4096;
// A change of the realtime offset above this is a step (NTP slews far slower, at most 0.5 ms per second).
constexpr int64_t kClockStepNs = 1'000'000;
// A drained sample is new only when, converted, it lies more than this after the newest sample stored: one sample
// converted with two offset measurements moves by their error (µs; more would be a step), while two samples are
// ≥ 9 ms apart (measurement-facts §1).
constexpr int64_t kSameSampleNs = kClockStepNs;

std::chrono::steady_clock::time_point to_steady(int64_t mono_ns) {
  // libstdc++'s steady_clock is CLOCK_MONOTONIC: the same clock as mono_now_ns().
  return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(mono_ns));
}

int64_t sample_value_mw(int value_type, const nvmlValue_t& v) {
  switch (value_type) {
    case NVML_VALUE_TYPE_DOUBLE: return static_cast<int64_t>(v.dVal);
    case NVML_VALUE_TYPE_UNSIGNED_LONG: return static_cast<int64_t>(v.ulVal);
    case NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: return static_cast<int64_t>(v.ullVal);
    case NVML_VALUE_TYPE_SIGNED_LONG_LONG: return static_cast<int64_t>(v.sllVal);
    case NVML_VALUE_TYPE_SIGNED_INT: return static_cast<int64_t>(v.siVal);
    default: return static_cast<int64_t>(v.uiVal);  // power samples are unsigned int mW
  }
}

unsigned int bit(Series s) { return 1u << static_cast<int>(s); }

// The offset first: a drain in the same tick converts with the fresh one.
enum Task : int { kOffset, kDrain, kInstant, kAverage, kEnergy, kTelemetry, kTaskCount };

// A reading taken during a tick, stored when the tick publishes.
struct Point {
  Series series;
  int64_t t_ns;
  int64_t value;
};

}  // namespace

const char* series_name(Series s) {
  switch (s) {
    case Series::kSamplesMw: return "samples";
    case Series::kInstantMw: return "instant";
    case Series::kAverageMw: return "average";
    case Series::kEnergyMj: return "energy_counter";
    case Series::kSmClockMhz: return "sm_clock";
    case Series::kTemperatureC: return "temperature";
  }
  return "?";
}

struct DeviceState {
  DeviceState(unsigned int index, nvmlDevice_t h, int s, std::size_t capacity)
      : nvml_index(index),
        handle(h),
        slot(s),
        series{BoundedSeries<int64_t>(capacity), BoundedSeries<int64_t>(capacity), BoundedSeries<int64_t>(capacity),
               BoundedSeries<int64_t>(capacity), BoundedSeries<int64_t>(capacity), BoundedSeries<int64_t>(capacity)},
        overruns(kMaxOverrunsKept) {}

  const unsigned int nvml_index;
  const nvmlDevice_t handle;
  const int slot;

  // The sampler thread's own, never read elsewhere.
  unsigned long long last_seen_us = 0;  // newest driver stamp seen (realtime µs), handed back to the driver
  int64_t last_sample_ns = INT64_MIN;   // newest sample stored (monotonic)
  bool resync = false;                  // realtime stepped back: the next drain asks for the whole ring
  std::vector<nvmlSample_t> scratch;
  std::vector<int64_t> spacings_ns;
  // What the current tick learnt, published under one lock at its end.
  std::vector<Point> pending;
  std::vector<std::pair<int64_t, int64_t>> pending_overruns;
  uint64_t pending_samples = 0;
  int64_t pending_period_ns = 0;         // 0: no new estimate
  unsigned int pending_unsupported = 0;  // sources that answered NOT_SUPPORTED
  bool pending_lost = false;

  // Guarded by Impl::mu. Once the device is added only the sampler thread writes them (under mu), so it may read
  // them without the lock.
  unsigned int supported = 0;
  std::array<BoundedSeries<int64_t>, kSeriesCount> series;
  BoundedSeries<int64_t> overruns;  // t = last sample before the overrun, value = first after (both mono ns)
  uint64_t samples_total = 0;
  int64_t sample_period_ns = 0;
  bool lost = false;

  bool has(Series s) const { return (supported & bit(s)) != 0; }
  // On the sampler thread during a tick: also what the tick itself found out.
  bool polls(Series s) const { return !lost && !pending_lost && has(s) && (pending_unsupported & bit(s)) == 0; }
  int best_source() const {
    for (int i = 0; i < kPowerSourceCount; ++i)
      if ((supported & (1u << i)) != 0) return i;
    return -1;
  }
};

struct Sampler::Impl {
  Impl(std::shared_ptr<NvmlLibrary> lib, SamplerConfig cfg) : nvml(std::move(lib)), config(cfg) {
    offset = nvml->realtime_offset();
  }

  const std::shared_ptr<NvmlLibrary> nvml;
  const SamplerConfig config;

  mutable std::mutex mu;
  std::condition_variable wake_cv;  // wakes the thread: stop, drain or counter request
  std::condition_variable data_cv;  // wakes wait_covered: new data or the thread ended
  std::thread thread;
  bool running = false;
  bool stop_requested = false;
  bool drain_requested = false;
  bool energy_requested = false;  // request_counter(), or a result waiting for a counter reading after its window
  int holds = 0;
  int64_t last_release_ns = 0;
  std::vector<std::shared_ptr<DeviceState>> devices;
  std::vector<NvmlFailure> failures;
  SamplerStats stats;
  RealtimeOffset offset;  // written by the thread (and the constructor), read under mu
  std::function<void()> chore;  // set_chore(); copied under mu, run without it
  int64_t chore_period_ns = 0;
  int64_t chore_due_ns = 0;

  // The sampler thread's scratch for one tick.
  std::vector<std::shared_ptr<DeviceState>> polled;
  std::vector<NvmlFailure> pending_failures;

  void start_locked();
  void run();
  void run_task(int task, DeviceState& dev, int64_t offset_ns);
  void drain(DeviceState& dev, int64_t offset_ns);
  void note_failure(DeviceState& dev, const char* call, nvmlReturn_t rc);
  void publish_locked();
  bool covered_locked(int64_t t_ns, int series) const {
    for (const auto& dev : devices) {
      if (dev->lost) continue;
      const int wanted = series < 0 ? dev->best_source() : series;
      if (wanted < 0 || !dev->has(static_cast<Series>(wanted))) continue;
      if (dev->series[wanted].last_t_ns() < t_ns) return false;
    }
    return true;
  }
};

void Sampler::Impl::note_failure(DeviceState& dev, const char* call, nvmlReturn_t rc) {
  if (nvml_code_is_fatal_for_device(rc)) dev.pending_lost = true;
  pending_failures.push_back(nvml->capture(call, rc, dev.slot));
}

void Sampler::Impl::publish_locked() {
  for (const auto& dev_ptr : polled) {
    DeviceState& dev = *dev_ptr;
    for (const Point& p : dev.pending) dev.series[static_cast<int>(p.series)].push(p.t_ns, p.value);
    dev.pending.clear();
    for (const auto& [from_ns, to_ns] : dev.pending_overruns) dev.overruns.push(from_ns, to_ns);
    stats.overruns += dev.pending_overruns.size();
    dev.pending_overruns.clear();
    dev.samples_total += dev.pending_samples;
    dev.pending_samples = 0;
    if (dev.pending_period_ns > 0) dev.sample_period_ns = dev.pending_period_ns;
    dev.pending_period_ns = 0;
    dev.supported &= ~dev.pending_unsupported;
    dev.pending_unsupported = 0;
    dev.lost = dev.lost || dev.pending_lost;
    dev.pending_lost = false;
  }
  for (NvmlFailure& f : pending_failures) {
    if (failures.size() < kMaxFailuresKept) {
      failures.push_back(std::move(f));
    } else {
      ++stats.failures_dropped;
    }
  }
  pending_failures.clear();
}

void Sampler::Impl::drain(DeviceState& dev, int64_t offset_ns) {
  const auto& sym = nvml->sym();
  int value_type = NVML_VALUE_TYPE_UNSIGNED_INT;
  // One call into a buffer larger than the driver's ring (120 on H100) instead of asking for the count first: each
  // call costs ~0.25 ms of CPU on H100, the thread's main cost. A larger ring makes the buffer grow once.
  if (dev.scratch.size() < 256) dev.scratch.resize(256);
  unsigned int count = static_cast<unsigned int>(dev.scratch.size());
  // After realtime stepped back, the driver's new stamps are older than the last one seen and would pass for repeats
  // until realtime caught up (the ring overrunning meanwhile): ask for the whole ring and keep what is new by its
  // monotonic stamp.
  const unsigned long long last_seen_us = dev.resync ? 0 : dev.last_seen_us;
  const nvmlReturn_t rc = guarded_call(sym.samples, dev.handle, int{NVML_TOTAL_POWER_SAMPLES}, last_seen_us,
                                       &value_type, &count, dev.scratch.data());
  if (rc == NVML_ERROR_INSUFFICIENT_SIZE) {
    dev.scratch.resize(std::max<std::size_t>(count, dev.scratch.size()) * 2);
    return;  // the next drain reads it all
  }
  // Nothing newer; or the ring grew between the two calls, and the next drain collects it.
  if (rc == NVML_ERROR_NOT_FOUND || (rc == NVML_SUCCESS && count == 0)) return;
  if (rc != NVML_SUCCESS) {
    if (rc == NVML_ERROR_NOT_SUPPORTED) dev.pending_unsupported |= bit(Series::kSamplesMw);
    if (!nvml_code_is_soft(rc)) note_failure(dev, "nvmlDeviceGetSamples", rc);
    return;
  }
  dev.resync = false;
  // The driver returns its ring in order on the GPUs we know; sorting ≤ 120 stamps costs nothing and removes the
  // assumption.
  std::sort(dev.scratch.begin(), dev.scratch.begin() + count,
            [](const nvmlSample_t& a, const nvmlSample_t& b) { return a.timeStamp < b.timeStamp; });

  const int64_t period_ns = dev.sample_period_ns > 0 ? dev.sample_period_ns : config.default_sample_period_ns;
  dev.spacings_ns.clear();
  unsigned long long newest_us = last_seen_us;
  int64_t prev_ns = dev.last_sample_ns;
  bool first = true;
  for (unsigned int i = 0; i < count; ++i) {
    const nvmlSample_t& s = dev.scratch[i];
    if (s.timeStamp <= newest_us) continue;  // returned by an earlier call too
    newest_us = s.timeStamp;
    const int64_t t_ns = static_cast<int64_t>(s.timeStamp) * 1000 - offset_ns;
    if (prev_ns != INT64_MIN) {
      if (t_ns <= prev_ns + kSameSampleNs) continue;  // stored already: read again after a clock step
      const int64_t spacing_ns = t_ns - prev_ns;
      dev.spacings_ns.push_back(spacing_ns);
      // Observable only here: the oldest sample the ring still had came long after the last one read, so the ring
      // wrapped since the previous drain (or while no thread ran) and the samples between are lost.
      if (first && static_cast<double>(spacing_ns) > config.overrun_factor * static_cast<double>(period_ns)) {
        dev.pending_overruns.emplace_back(prev_ns, t_ns);
      }
    }
    first = false;
    dev.pending.push_back({Series::kSamplesMw, t_ns, sample_value_mw(value_type, s.sampleValue)});
    ++dev.pending_samples;
    prev_ns = t_ns;
  }
  dev.last_seen_us = newest_us;
  dev.last_sample_ns = prev_ns;
  if (dev.spacings_ns.size() >= 8) {
    // Median of the batch: robust to the jitter (9-35 ms under load) and to an occasional hole.
    auto mid = dev.spacings_ns.begin() + static_cast<std::ptrdiff_t>(dev.spacings_ns.size() / 2);
    std::nth_element(dev.spacings_ns.begin(), mid, dev.spacings_ns.end());
    dev.pending_period_ns = *mid;
  }
}

void Sampler::Impl::run_task(int task, DeviceState& dev, int64_t offset_ns) {
  const auto& sym = nvml->sym();
  switch (task) {
    case kDrain:
      if (dev.polls(Series::kSamplesMw)) drain(dev, offset_ns);
      return;
    case kInstant:
    case kAverage: {
      const Series s = task == kInstant ? Series::kInstantMw : Series::kAverageMw;
      if (!dev.polls(s)) return;
      nvmlFieldValue_t fv{};
      fv.fieldId = task == kInstant ? NVML_FI_DEV_POWER_INSTANT : NVML_FI_DEV_POWER_AVERAGE;
      nvmlReturn_t rc;
      int64_t t_ns;
      {
        NvmlCallGuard guard;
        const int64_t t0 = mono_now_ns();
        rc = sym.field_values(dev.handle, 1, &fv);
        t_ns = t0 + (mono_now_ns() - t0) / 2;
      }
      if (rc == NVML_SUCCESS) rc = fv.nvmlReturn;
      if (rc == NVML_SUCCESS) {
        dev.pending.push_back({s, t_ns, sample_value_mw(fv.valueType, fv.value)});
      } else if (!nvml_code_is_soft(rc)) {
        note_failure(dev, "nvmlDeviceGetFieldValues", rc);
      }
      return;
    }
    case kEnergy: {
      if (!dev.polls(Series::kEnergyMj)) return;
      unsigned long long mj = 0;
      nvmlReturn_t rc;
      int64_t t_ns;
      {
        NvmlCallGuard guard;
        const int64_t t0 = mono_now_ns();
        rc = sym.total_energy(dev.handle, &mj);
        t_ns = t0 + (mono_now_ns() - t0) / 2;  // the call takes ~4 ms on H100: stamp its middle
      }
      if (rc == NVML_SUCCESS) {
        dev.pending.push_back({Series::kEnergyMj, t_ns, static_cast<int64_t>(mj)});
      } else if (!nvml_code_is_soft(rc)) {
        note_failure(dev, "nvmlDeviceGetTotalEnergyConsumption", rc);
      }
      return;
    }
    case kTelemetry: {
      unsigned int mhz = 0;
      unsigned int celsius = 0;
      nvmlReturn_t rc_clock = NVML_ERROR_NOT_SUPPORTED;
      nvmlReturn_t rc_temp = NVML_ERROR_NOT_SUPPORTED;
      int64_t t_ns;
      {
        NvmlCallGuard guard;
        t_ns = mono_now_ns();
        if (dev.polls(Series::kSmClockMhz)) rc_clock = sym.clock_info(dev.handle, NVML_CLOCK_SM, &mhz);
        if (dev.polls(Series::kTemperatureC)) rc_temp = sym.temperature(dev.handle, NVML_TEMPERATURE_GPU, &celsius);
      }
      if (rc_clock == NVML_SUCCESS) dev.pending.push_back({Series::kSmClockMhz, t_ns, mhz});
      else if (!nvml_code_is_soft(rc_clock)) note_failure(dev, "nvmlDeviceGetClockInfo", rc_clock);
      if (rc_temp == NVML_SUCCESS) dev.pending.push_back({Series::kTemperatureC, t_ns, celsius});
      else if (!nvml_code_is_soft(rc_temp)) note_failure(dev, "nvmlDeviceGetTemperature", rc_temp);
      return;
    }
    default:
      return;
  }
}

void Sampler::Impl::run() {
  const int64_t cpu_start_ns = thread_cpu_ns();
  const int64_t wall_start_ns = mono_now_ns();
  const std::array<int64_t, kTaskCount> period_ns = {config.offset_period_ns,  config.drain_period_ns,
                                                     config.instant_period_ns, config.average_period_ns,
                                                     config.energy_period_ns,  config.telemetry_period_ns};
  const std::array<bool, kTaskCount> enabled = {true, true, config.poll_instant, true, config.poll_energy, true};
  std::array<int64_t, kTaskCount> due_ns;
  due_ns.fill(wall_start_ns);

  // The lock is taken once per tick: held from publishing one tick's results, through the wait, to reading what the
  // next tick must do; every NVML call happens with it released.
  std::unique_lock<std::mutex> lk(mu);
  const int64_t cpu_before_ns = stats.thread_cpu_ns;
  int64_t chore_cpu_ns = 0;  // this thread run's CPU spent in the chore, kept out of thread_cpu_ns
  const int64_t wall_before_ns = stats.thread_wall_ns;
  RealtimeOffset current_offset = offset;
  while (!stop_requested) {
    const int64_t now_ns = mono_now_ns();
    if (holds == 0 && now_ns - last_release_ns > config.linger_ns) break;
    const bool drain_now = drain_requested;
    const bool energy_now = energy_requested;
    drain_requested = false;
    energy_requested = false;
    polled.clear();
    for (const auto& dev : devices)
      if (!dev->lost) polled.push_back(dev);
    std::function<void()> chore_now;
    if (chore && now_ns >= chore_due_ns) {
      chore_now = chore;
      chore_due_ns = now_ns + chore_period_ns;
    }
    lk.unlock();

    uint64_t drains = 0;
    uint64_t missed = 0;
    uint64_t steps = 0;
    for (int task = 0; task < kTaskCount; ++task) {
      if (!enabled[task]) continue;
      const bool due = now_ns >= due_ns[task] || (task == kDrain && drain_now) || (task == kEnergy && energy_now);
      if (!due) continue;
      if (task == kOffset) {
        const RealtimeOffset fresh = nvml->realtime_offset();
        if (std::llabs(fresh.offset_ns - current_offset.offset_ns) > kClockStepNs) {
          ++steps;
          if (fresh.offset_ns < current_offset.offset_ns)
            for (const auto& dev : polled) dev->resync = true;
        }
        current_offset = fresh;
      } else {
        for (const auto& dev : polled) run_task(task, *dev, current_offset.offset_ns);
        if (task == kDrain) ++drains;
      }
      if (now_ns >= due_ns[task]) {
        // Absolute deadlines: the schedule never drifts with the work done; late ticks are counted and skipped.
        due_ns[task] += period_ns[task];
        if (due_ns[task] <= now_ns) {
          const int64_t behind = (now_ns - due_ns[task]) / period_ns[task] + 1;
          due_ns[task] += behind * period_ns[task];
          missed += static_cast<uint64_t>(behind);
        }
      }
    }

    const int64_t cpu_ns = thread_cpu_ns();
    lk.lock();
    publish_locked();
    offset = current_offset;
    stats.drains += drains;
    stats.missed_deadlines += missed;
    stats.clock_steps += steps;
    ++stats.ticks;
    stats.thread_cpu_ns = cpu_before_ns + (cpu_ns - cpu_start_ns - chore_cpu_ns);
    stats.thread_wall_ns = wall_before_ns + (mono_now_ns() - wall_start_ns);
    data_cv.notify_all();
    if (chore_now) {
      // After publishing: the tick's readings and whoever waits on them do not wait for the chore (a CUPTI flush
      // parses every record since the last). Its CPU is the chore's owner's cost, counted apart.
      lk.unlock();
      const int64_t chore_start_ns = thread_cpu_ns();
      chore_now();
      // Released before the lock: the lambda's own shared_ptr may be the last reference to the tracer, whose
      // destructor (stop) then runs here.
      chore_now = nullptr;
      const int64_t spent_ns = thread_cpu_ns() - chore_start_ns;
      lk.lock();
      chore_cpu_ns += spent_ns;
      stats.chore_cpu_ns += spent_ns;
    }
    int64_t wake_ns = INT64_MAX;
    for (int task = 0; task < kTaskCount; ++task)
      if (enabled[task]) wake_ns = std::min(wake_ns, due_ns[task]);
    if (holds == 0) wake_ns = std::min(wake_ns, last_release_ns + config.linger_ns + 1);
    if (chore) wake_ns = std::min(wake_ns, chore_due_ns);
    wake_cv.wait_until(lk, to_steady(wake_ns),
                       [this] {
                         return stop_requested || drain_requested || energy_requested || (chore && chore_due_ns == 0);
                       });
  }
  running = false;
  stats.thread_cpu_ns = cpu_before_ns + (thread_cpu_ns() - cpu_start_ns - chore_cpu_ns);
  stats.thread_wall_ns = wall_before_ns + (mono_now_ns() - wall_start_ns);
  data_cv.notify_all();
}

void Sampler::Impl::start_locked() {
  if (running) return;
  // A thread that ended by lingering out is finished but still joinable; joining it returns at once.
  if (thread.joinable()) thread.join();
  stop_requested = false;
  running = true;
  ++stats.threads_started;
  thread = std::thread([this] { run(); });
}

Sampler::Sampler(std::shared_ptr<NvmlLibrary> nvml, SamplerConfig config)
    : impl_(std::make_unique<Impl>(std::move(nvml), config)), owner_pid_(static_cast<int>(getpid())) {}

Sampler::~Sampler() {
  if (static_cast<int>(getpid()) != owner_pid_) {
    // A forked child: the thread does not exist here and the parent's mutex/condition variable state was copied
    // mid-use; destroying them could block. Leak the state (the child has its own sampler if it measures).
    (void)impl_.release();
    return;
  }
  stop();
}

void Sampler::check_owner() const {
  if (static_cast<int>(getpid()) != owner_pid_)
    throw std::runtime_error("this sampler belongs to the parent process; a forked child must start its own");
}

int Sampler::add_device(unsigned int nvml_index) {
  check_owner();
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    for (const auto& dev : impl_->devices)
      if (dev->nvml_index == nvml_index) return dev->slot;
  }
  const NvmlLibrary& lib = *impl_->nvml;
  const auto& sym = lib.sym();
  nvmlDevice_t h = lib.handle(nvml_index);

  unsigned int supported = 0;
  // Readings taken while probing are kept: they precede the first window, so even the first measurement after
  // the device is added has a counter reading before its start (the thread's first poll comes after it).
  struct Probed {
    Series series;
    int64_t value;
  };
  std::vector<Probed> probed;
  const int64_t probe_t_ns = mono_now_ns();
  auto fatal_or_soft = [&](const char* call, nvmlReturn_t rc) {
    // Probing: unsupported or denied means "not this source"; a lost GPU means no device at all.
    if (nvml_code_is_fatal_for_device(rc)) lib.check(call, rc);
  };
  if (sym.samples != nullptr) {
    int type = 0;
    unsigned int count = 0;
    const nvmlReturn_t rc = guarded_call(sym.samples, h, int{NVML_TOTAL_POWER_SAMPLES}, 0ull, &type, &count,
                                         static_cast<nvmlSample_t*>(nullptr));
    if (rc == NVML_SUCCESS || rc == NVML_ERROR_NOT_FOUND) supported |= 1u << static_cast<int>(Series::kSamplesMw);
    fatal_or_soft("nvmlDeviceGetSamples", rc);
  }
  if (sym.field_values != nullptr) {
    nvmlFieldValue_t fv[2] = {};
    fv[0].fieldId = NVML_FI_DEV_POWER_INSTANT;
    fv[1].fieldId = NVML_FI_DEV_POWER_AVERAGE;
    const nvmlReturn_t rc = guarded_call(sym.field_values, h, 2, fv);
    fatal_or_soft("nvmlDeviceGetFieldValues", rc);
    for (int i = 0; i < 2; ++i) {
      if (rc != NVML_SUCCESS || fv[i].nvmlReturn != NVML_SUCCESS) continue;
      const Series s = i == 0 ? Series::kInstantMw : Series::kAverageMw;
      supported |= 1u << static_cast<int>(s);
      probed.push_back({s, sample_value_mw(fv[i].valueType, fv[i].value)});
    }
  }
  if (sym.total_energy != nullptr) {
    unsigned long long mj = 0;
    const nvmlReturn_t rc = guarded_call(sym.total_energy, h, &mj);
    fatal_or_soft("nvmlDeviceGetTotalEnergyConsumption", rc);
    if (rc == NVML_SUCCESS) {
      supported |= 1u << static_cast<int>(Series::kEnergyMj);
      probed.push_back({Series::kEnergyMj, static_cast<int64_t>(mj)});
    }
  }
  if (sym.clock_info != nullptr) {
    unsigned int mhz = 0;
    const nvmlReturn_t rc = guarded_call(sym.clock_info, h, int{NVML_CLOCK_SM}, &mhz);
    if (rc == NVML_SUCCESS) supported |= 1u << static_cast<int>(Series::kSmClockMhz);
  }
  if (sym.temperature != nullptr) {
    unsigned int celsius = 0;
    if (guarded_call(sym.temperature, h, int{NVML_TEMPERATURE_GPU}, &celsius) == NVML_SUCCESS)
      supported |= 1u << static_cast<int>(Series::kTemperatureC);
  }
  if ((supported & ((1u << kPowerSourceCount) - 1)) == 0) {
    throw NvmlError("probe", NVML_ERROR_NOT_SUPPORTED,
                    "GPU " + std::to_string(nvml_index) +
                        " offers no power reading (buffered samples, instant, average and energy counter all "
                        "unsupported or denied); vGPU and MIG instances often hide them");
  }

  std::lock_guard<std::mutex> lk(impl_->mu);
  const int slot = static_cast<int>(impl_->devices.size());
  auto dev = std::make_shared<DeviceState>(nvml_index, h, slot, impl_->config.capacity);
  dev->supported = supported;
  for (const Probed& p : probed) dev->series[static_cast<int>(p.series)].push(probe_t_ns, p.value);
  impl_->devices.push_back(std::move(dev));
  impl_->drain_requested = true;
  impl_->wake_cv.notify_all();
  return slot;
}

void Sampler::set_chore(std::function<void()> chore, int64_t period_ns) {
  check_owner();
  if (chore && period_ns <= 0) throw std::invalid_argument("Sampler::set_chore: period_ns must be positive");
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->chore = std::move(chore);
  impl_->chore_period_ns = period_ns;
  impl_->chore_due_ns = 0;  // due at the next tick
  impl_->wake_cv.notify_all();
}

int Sampler::device_count() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return static_cast<int>(impl_->devices.size());
}

void Sampler::acquire() {
  check_owner();
  std::unique_lock<std::mutex> lk(impl_->mu);
  ++impl_->holds;
  // A stop() in progress: let its thread end before starting another (two threads would share per-device state).
  impl_->data_cv.wait(lk, [this] { return !(impl_->running && impl_->stop_requested); });
  impl_->start_locked();
}

void Sampler::release() {
  check_owner();
  std::lock_guard<std::mutex> lk(impl_->mu);
  if (impl_->holds > 0) --impl_->holds;
  impl_->last_release_ns = mono_now_ns();
}

void Sampler::stop() {
  if (static_cast<int>(getpid()) != owner_pid_) return;
  std::thread to_join;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->stop_requested = true;
    impl_->wake_cv.notify_all();
    to_join = std::move(impl_->thread);
  }
  if (to_join.joinable()) to_join.join();
}

void Sampler::request_drain() {
  check_owner();
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->drain_requested = true;
  }
  // Outside the lock: the woken thread would otherwise block at once on the mutex the caller still holds.
  impl_->wake_cv.notify_all();
}

void Sampler::request_counter() {
  check_owner();
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->energy_requested = true;
  }
  // Outside the lock, as in request_drain: the caller (a window's edge) pays for one wake-up and nothing more.
  impl_->wake_cv.notify_all();
}

bool Sampler::wait_covered(int64_t t_ns, int64_t timeout_ns, int series) {
  if (series >= kSeriesCount) throw std::out_of_range("no such series");
  acquire();
  const int64_t deadline_ns = mono_now_ns() + timeout_ns;
  bool covered;
  {
    std::unique_lock<std::mutex> lk(impl_->mu);
    impl_->drain_requested = true;
    if (series == static_cast<int>(Series::kEnergyMj)) impl_->energy_requested = true;
    impl_->wake_cv.notify_all();
    covered = impl_->data_cv.wait_until(lk, to_steady(deadline_ns), [&] { return impl_->covered_locked(t_ns, series); });
  }
  release();
  return covered;
}

DeviceSnapshot Sampler::snapshot(int slot, int64_t from_ns, int64_t to_ns) const {
  check_owner();
  std::lock_guard<std::mutex> lk(impl_->mu);
  if (slot < 0 || slot >= static_cast<int>(impl_->devices.size())) throw std::out_of_range("no such sampler slot");
  const DeviceState& dev = *impl_->devices[static_cast<std::size_t>(slot)];
  DeviceSnapshot out;
  for (int i = 0; i < kSeriesCount; ++i) {
    // Two points of margin: the sample before the window (its interval reaches in) and one more for the
    // uncertainty's view of the power step at the edge.
    dev.series[i].copy_range(from_ns, to_ns, 2, out.series[i].t_ns, out.series[i].value);
    out.dropped[i] = dev.series[i].dropped();
  }
  std::vector<int64_t> overrun_from;
  std::vector<int64_t> overrun_to;
  dev.overruns.copy_range(INT64_MIN, to_ns, 0, overrun_from, overrun_to);
  for (std::size_t i = 0; i < overrun_from.size(); ++i) {
    if (overrun_to[i] < from_ns) continue;  // ended before the range
    out.overrun_from_ns.push_back(overrun_from[i]);
    out.overrun_to_ns.push_back(overrun_to[i]);
  }
  out.overruns = dev.overruns.size() + dev.overruns.dropped();
  out.supported_mask = dev.supported;
  out.samples_total = dev.samples_total;
  out.sample_period_ns = dev.sample_period_ns;
  out.lost = dev.lost;
  return out;
}

std::vector<NvmlFailure> Sampler::failures() const {
  check_owner();
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->failures;
}

SamplerStats Sampler::stats() const {
  check_owner();
  std::lock_guard<std::mutex> lk(impl_->mu);
  SamplerStats s = impl_->stats;
  s.running = impl_->running;
  s.realtime_offset_ns = impl_->offset.offset_ns;
  s.realtime_offset_uncertainty_ns = impl_->offset.uncertainty_ns;
  return s;
}

const SamplerConfig& Sampler::config() const { return impl_->config; }

}  // namespace wattscope
