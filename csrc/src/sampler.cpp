#include "wattscope/sampler.hpp"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "wattscope/bounded_series.hpp"
#include "wattscope/clock.hpp"

namespace wattscope {

namespace {

constexpr std::size_t kMaxFailuresKept = 256;
constexpr int64_t kClockStepNs = 1'000'000;

// Held around every NVML call the sampler thread makes, and taken by fork() (pthread_atfork), so a child process
// never inherits NVML in the middle of one of our calls (its internal locks would stay taken in the child).
std::mutex g_nvml_call_mu;
std::once_flag g_atfork_once;

void install_atfork() {
  std::call_once(g_atfork_once, [] {
    pthread_atfork([] { g_nvml_call_mu.lock(); }, [] { g_nvml_call_mu.unlock(); },
                   [] { g_nvml_call_mu.unlock(); });
  });
}

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

enum Task : int { kDrain, kInstant, kAverage, kEnergy, kTelemetry, kOffset, kTaskCount };

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
        gaps(4096) {}

  const unsigned int nvml_index;
  const nvmlDevice_t handle;
  const int slot;

  // Touched by the sampler thread only.
  unsigned long long last_seen_us = 0;
  std::vector<nvmlSample_t> scratch;

  // Guarded by Impl::mu.
  unsigned int supported = 0;
  std::array<BoundedSeries<int64_t>, kSeriesCount> series;
  BoundedSeries<int64_t> gaps;  // t = gap start, value = gap end (both mono ns)
  uint64_t samples_total = 0;
  int64_t sample_period_ns = 0;
  bool lost = false;

  bool has(Series s) const { return (supported & (1u << static_cast<int>(s))) != 0; }
  void drop_support(Series s) { supported &= ~(1u << static_cast<int>(s)); }
  int best_source() const {
    for (int i = 0; i < kPowerSourceCount; ++i)
      if ((supported & (1u << i)) != 0) return i;
    return -1;
  }
};

struct Sampler::Impl {
  Impl(std::shared_ptr<NvmlLibrary> lib, SamplerConfig cfg) : nvml(std::move(lib)), config(cfg) {
    offset = measure_realtime_offset();
  }

  const std::shared_ptr<NvmlLibrary> nvml;
  const SamplerConfig config;

  mutable std::mutex mu;
  std::condition_variable wake_cv;  // wakes the thread: stop or drain request
  std::condition_variable data_cv;  // wakes wait_covered: new data or the thread ended
  std::thread thread;
  bool running = false;
  bool stop_requested = false;
  bool drain_requested = false;
  bool energy_requested = false;  // a result waits for a counter reading after its window
  int holds = 0;
  int64_t last_release_ns = 0;
  std::vector<std::shared_ptr<DeviceState>> devices;
  std::vector<NvmlFailure> failures;
  SamplerStats stats;
  RealtimeOffset offset;  // written by the thread (and the constructor), read under mu

  void start_locked();
  void run();
  void run_task(int task, DeviceState& dev, int64_t offset_ns);
  void drain(DeviceState& dev, int64_t offset_ns);
  void record_failure(DeviceState* dev, const char* call, nvmlReturn_t rc);
  void push(DeviceState& dev, Series s, int64_t t_ns, int64_t value) {
    std::lock_guard<std::mutex> lk(mu);
    dev.series[static_cast<int>(s)].push(t_ns, value);
  }
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

void Sampler::Impl::record_failure(DeviceState* dev, const char* call, nvmlReturn_t rc) {
  NvmlFailure f = nvml->capture(call, rc, dev != nullptr ? dev->slot : -1);
  std::lock_guard<std::mutex> lk(mu);
  if (dev != nullptr && nvml_code_is_fatal_for_device(rc)) dev->lost = true;
  if (failures.size() < kMaxFailuresKept) {
    failures.push_back(std::move(f));
  } else {
    ++stats.failures_dropped;
  }
}

void Sampler::Impl::drain(DeviceState& dev, int64_t offset_ns) {
  const auto& sym = nvml->sym();
  int value_type = NVML_VALUE_TYPE_UNSIGNED_INT;
  // One call into a buffer larger than the driver's ring (120 on H100) instead of asking for the count first: each
  // call costs ~0.25 ms of CPU on H100, the thread's main cost. A larger ring makes the buffer grow once.
  if (dev.scratch.size() < 256) dev.scratch.resize(256);
  unsigned int count = static_cast<unsigned int>(dev.scratch.size());
  nvmlReturn_t rc;
  {
    std::lock_guard<std::mutex> call_lk(g_nvml_call_mu);
    rc = sym.samples(dev.handle, NVML_TOTAL_POWER_SAMPLES, dev.last_seen_us, &value_type, &count, dev.scratch.data());
  }
  if (rc == NVML_ERROR_INSUFFICIENT_SIZE) {
    dev.scratch.resize(std::max<std::size_t>(count, dev.scratch.size()) * 2);
    return;  // the next drain reads it all
  }
  // Nothing newer; or the ring grew between the two calls, and the next drain collects it.
  if (rc == NVML_ERROR_NOT_FOUND || (rc == NVML_SUCCESS && count == 0)) return;
  if (rc != NVML_SUCCESS) {
    if (rc == NVML_ERROR_NOT_SUPPORTED) {
      std::lock_guard<std::mutex> lk(mu);
      dev.drop_support(Series::kSamplesMw);
    }
    if (!nvml_code_is_soft(rc)) record_failure(&dev, "nvmlDeviceGetSamples", rc);
    return;
  }
  // The driver returns its ring in order on the GPUs we know; sorting ≤ 120 stamps costs nothing and removes the
  // assumption.
  std::sort(dev.scratch.begin(), dev.scratch.begin() + count,
            [](const nvmlSample_t& a, const nvmlSample_t& b) { return a.timeStamp < b.timeStamp; });

  std::vector<int64_t> spacings_ns;
  spacings_ns.reserve(count);
  std::lock_guard<std::mutex> lk(mu);
  auto& samples = dev.series[static_cast<int>(Series::kSamplesMw)];
  unsigned long long prev_us = dev.last_seen_us;
  for (unsigned int i = 0; i < count; ++i) {
    const nvmlSample_t& s = dev.scratch[i];
    if (s.timeStamp <= prev_us) continue;  // duplicates across calls
    const int64_t t_ns = static_cast<int64_t>(s.timeStamp) * 1000 - offset_ns;
    if (prev_us != 0) {
      const int64_t spacing_ns = static_cast<int64_t>(s.timeStamp - prev_us) * 1000;
      spacings_ns.push_back(spacing_ns);
      const int64_t period_ns = dev.sample_period_ns > 0 ? dev.sample_period_ns : config.default_sample_period_ns;
      if (static_cast<double>(spacing_ns) > config.gap_factor * static_cast<double>(period_ns)) {
        dev.gaps.push(static_cast<int64_t>(prev_us) * 1000 - offset_ns, t_ns);
      }
    }
    samples.push(t_ns, sample_value_mw(value_type, s.sampleValue));
    ++dev.samples_total;
    prev_us = s.timeStamp;
  }
  dev.last_seen_us = prev_us;
  if (spacings_ns.size() >= 8) {
    // Median of the batch: robust to the jitter (9-35 ms under load) and to an occasional gap.
    auto mid = spacings_ns.begin() + static_cast<std::ptrdiff_t>(spacings_ns.size() / 2);
    std::nth_element(spacings_ns.begin(), mid, spacings_ns.end());
    dev.sample_period_ns = *mid;
  }
}

void Sampler::Impl::run_task(int task, DeviceState& dev, int64_t offset_ns) {
  const auto& sym = nvml->sym();
  switch (task) {
    case kDrain:
      if (dev.has(Series::kSamplesMw)) drain(dev, offset_ns);
      return;
    case kInstant:
    case kAverage: {
      const Series s = task == kInstant ? Series::kInstantMw : Series::kAverageMw;
      if (!dev.has(s)) return;
      nvmlFieldValue_t fv{};
      fv.fieldId = task == kInstant ? NVML_FI_DEV_POWER_INSTANT : NVML_FI_DEV_POWER_AVERAGE;
      nvmlReturn_t rc;
      int64_t t_ns;
      {
        std::lock_guard<std::mutex> call_lk(g_nvml_call_mu);
        const int64_t t0 = mono_now_ns();
        rc = sym.field_values(dev.handle, 1, &fv);
        t_ns = t0 + (mono_now_ns() - t0) / 2;
      }
      if (rc == NVML_SUCCESS) rc = fv.nvmlReturn;
      if (rc == NVML_SUCCESS) {
        push(dev, s, t_ns, sample_value_mw(fv.valueType, fv.value));
      } else if (!nvml_code_is_soft(rc)) {
        record_failure(&dev, "nvmlDeviceGetFieldValues", rc);
      }
      return;
    }
    case kEnergy: {
      if (!dev.has(Series::kEnergyMj)) return;
      unsigned long long mj = 0;
      nvmlReturn_t rc;
      int64_t t_ns;
      {
        std::lock_guard<std::mutex> call_lk(g_nvml_call_mu);
        const int64_t t0 = mono_now_ns();
        rc = sym.total_energy(dev.handle, &mj);
        t_ns = t0 + (mono_now_ns() - t0) / 2;  // the call takes ~4 ms on H100: stamp its middle
      }
      if (rc == NVML_SUCCESS) {
        push(dev, Series::kEnergyMj, t_ns, static_cast<int64_t>(mj));
      } else if (!nvml_code_is_soft(rc)) {
        record_failure(&dev, "nvmlDeviceGetTotalEnergyConsumption", rc);
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
        std::lock_guard<std::mutex> call_lk(g_nvml_call_mu);
        t_ns = mono_now_ns();
        if (dev.has(Series::kSmClockMhz)) rc_clock = sym.clock_info(dev.handle, NVML_CLOCK_SM, &mhz);
        if (dev.has(Series::kTemperatureC)) rc_temp = sym.temperature(dev.handle, NVML_TEMPERATURE_GPU, &celsius);
      }
      if (rc_clock == NVML_SUCCESS) push(dev, Series::kSmClockMhz, t_ns, mhz);
      else if (!nvml_code_is_soft(rc_clock)) record_failure(&dev, "nvmlDeviceGetClockInfo", rc_clock);
      if (rc_temp == NVML_SUCCESS) push(dev, Series::kTemperatureC, t_ns, celsius);
      else if (!nvml_code_is_soft(rc_temp)) record_failure(&dev, "nvmlDeviceGetTemperature", rc_temp);
      return;
    }
    default:
      return;
  }
}

void Sampler::Impl::run() {
  const int64_t cpu_start_ns = thread_cpu_ns();
  const int64_t wall_start_ns = mono_now_ns();
  int64_t cpu_before_ns, wall_before_ns;
  {
    std::lock_guard<std::mutex> g(mu);
    cpu_before_ns = stats.thread_cpu_ns;
    wall_before_ns = stats.thread_wall_ns;
  }
  const std::array<int64_t, kTaskCount> period_ns = {config.drain_period_ns,  config.instant_period_ns,
                                                     config.average_period_ns, config.energy_period_ns,
                                                     config.telemetry_period_ns, config.offset_period_ns};
  const std::array<bool, kTaskCount> enabled = {true, config.poll_instant, true, config.poll_energy, true, true};
  std::array<int64_t, kTaskCount> due_ns;
  due_ns.fill(wall_start_ns);

  std::unique_lock<std::mutex> lk(mu);
  int64_t offset_ns = offset.offset_ns;
  while (!stop_requested) {
    const int64_t now_ns = mono_now_ns();
    if (holds == 0 && now_ns - last_release_ns > config.linger_ns) break;
    const bool drain_now = drain_requested;
    const bool energy_now = energy_requested;
    drain_requested = false;
    energy_requested = false;
    std::vector<std::shared_ptr<DeviceState>> polled;
    for (const auto& dev : devices)
      if (!dev->lost) polled.push_back(dev);
    lk.unlock();

    for (int task = 0; task < kTaskCount; ++task) {
      if (!enabled[task]) continue;
      const bool due = now_ns >= due_ns[task] || (task == kDrain && drain_now) || (task == kEnergy && energy_now);
      if (!due) continue;
      if (task == kOffset) {
        const RealtimeOffset fresh = measure_realtime_offset();
        std::lock_guard<std::mutex> g(mu);
        if (std::llabs(fresh.offset_ns - offset.offset_ns) > kClockStepNs) ++stats.clock_steps;
        offset = fresh;
        offset_ns = fresh.offset_ns;
      } else {
        for (const auto& dev : polled) {
          bool lost;
          {
            std::lock_guard<std::mutex> g(mu);
            lost = dev->lost;
          }
          if (!lost) run_task(task, *dev, offset_ns);
        }
      }
      if (task == kDrain) {
        std::lock_guard<std::mutex> g(mu);
        ++stats.drains;
      }
      if (now_ns >= due_ns[task]) {
        // Absolute deadlines: the schedule never drifts with the work done; late ticks are counted and skipped.
        due_ns[task] += period_ns[task];
        if (due_ns[task] <= now_ns) {
          const int64_t behind = (now_ns - due_ns[task]) / period_ns[task] + 1;
          due_ns[task] += behind * period_ns[task];
          std::lock_guard<std::mutex> g(mu);
          stats.missed_deadlines += static_cast<uint64_t>(behind);
        }
      }
    }

    const int64_t cpu_ns = thread_cpu_ns();
    lk.lock();
    ++stats.ticks;
    stats.thread_cpu_ns = cpu_before_ns + (cpu_ns - cpu_start_ns);
    stats.thread_wall_ns = wall_before_ns + (mono_now_ns() - wall_start_ns);
    data_cv.notify_all();
    int64_t wake_ns = INT64_MAX;
    for (int task = 0; task < kTaskCount; ++task)
      if (enabled[task]) wake_ns = std::min(wake_ns, due_ns[task]);
    if (holds == 0) wake_ns = std::min(wake_ns, last_release_ns + config.linger_ns + 1);
    wake_cv.wait_until(lk, to_steady(wake_ns), [this] { return stop_requested || drain_requested; });
  }
  running = false;
  stats.thread_cpu_ns = cpu_before_ns + (thread_cpu_ns() - cpu_start_ns);
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
    : impl_(std::make_unique<Impl>(std::move(nvml), config)), owner_pid_(static_cast<int>(getpid())) {
  install_atfork();
}

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
    const nvmlReturn_t rc = sym.samples(h, NVML_TOTAL_POWER_SAMPLES, 0, &type, &count, nullptr);
    if (rc == NVML_SUCCESS || rc == NVML_ERROR_NOT_FOUND) supported |= 1u << static_cast<int>(Series::kSamplesMw);
    fatal_or_soft("nvmlDeviceGetSamples", rc);
  }
  if (sym.field_values != nullptr) {
    nvmlFieldValue_t fv[2] = {};
    fv[0].fieldId = NVML_FI_DEV_POWER_INSTANT;
    fv[1].fieldId = NVML_FI_DEV_POWER_AVERAGE;
    const nvmlReturn_t rc = sym.field_values(h, 2, fv);
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
    const nvmlReturn_t rc = sym.total_energy(h, &mj);
    fatal_or_soft("nvmlDeviceGetTotalEnergyConsumption", rc);
    if (rc == NVML_SUCCESS) {
      supported |= 1u << static_cast<int>(Series::kEnergyMj);
      probed.push_back({Series::kEnergyMj, static_cast<int64_t>(mj)});
    }
  }
  if (sym.clock_info != nullptr) {
    unsigned int mhz = 0;
    const nvmlReturn_t rc = sym.clock_info(h, NVML_CLOCK_SM, &mhz);
    if (rc == NVML_SUCCESS) supported |= 1u << static_cast<int>(Series::kSmClockMhz);
  }
  if (sym.temperature != nullptr) {
    unsigned int celsius = 0;
    if (sym.temperature(h, NVML_TEMPERATURE_GPU, &celsius) == NVML_SUCCESS)
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
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->drain_requested = true;
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
  std::vector<int64_t> gap_from;
  std::vector<int64_t> gap_to;
  dev.gaps.copy_range(INT64_MIN, to_ns, 0, gap_from, gap_to);
  for (std::size_t i = 0; i < gap_from.size(); ++i) {
    if (gap_to[i] < from_ns) continue;  // ended before the window
    out.gap_from_ns.push_back(gap_from[i]);
    out.gap_to_ns.push_back(gap_to[i]);
  }
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
