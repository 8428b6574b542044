// NVML opened at run time with dlopen: the package builds and imports where there is no driver, and tests load a
// fake library through this same path. Never dlclose (others in the process may hold NVML) and init/shutdown are
// reference counted by NVML itself.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "wattscope/clock.hpp"
#include "wattscope/nvml_api.h"
#include "wattscope/nvml_error.hpp"

namespace wattscope {

// Held around every call into the loaded library, on every thread (the sampler's and the callers'), and taken by
// fork() through pthread_atfork: a child never inherits NVML in the middle of a call, with NVML's internal locks
// taken and no thread left to release them. A leaf lock: nothing else is acquired while it is held (above all not
// the GIL, which the thread calling os.fork() holds while it waits for this lock).
class NvmlCallGuard {
 public:
  NvmlCallGuard();
  ~NvmlCallGuard();
  // Scoped to one stretch of calls: neither copyable nor movable.
  NvmlCallGuard(const NvmlCallGuard&) = delete;
  NvmlCallGuard& operator=(const NvmlCallGuard&) = delete;
};

// One call into the library under NvmlCallGuard.
template <typename Fn, typename... Args>
auto guarded_call(Fn fn, Args... args) {
  NvmlCallGuard guard;
  return fn(args...);
}

// Not NVML: the fake NVML (csrc/testing) exports the realtime clock it stamps samples with, so that a test can step
// it. Real NVML stamps with the kernel's CLOCK_REALTIME and has no such symbol.
typedef long long (*fake_nvml_realtime_ns_fn)(void);

struct NvmlSymbols {
  // Required: without these NvmlLibrary::open fails.
  nvmlInit_v2_fn init = nullptr;
  nvmlErrorString_fn error_string = nullptr;
  nvmlDeviceGetCount_v2_fn get_count = nullptr;
  nvmlDeviceGetHandleByIndex_v2_fn handle_by_index = nullptr;
  // Optional: a missing symbol turns that feature off.
  nvmlShutdown_fn shutdown = nullptr;
  nvmlSystemGetDriverVersion_fn driver_version = nullptr;
  nvmlSystemGetNVMLVersion_fn nvml_version = nullptr;
  nvmlDeviceGetHandleByUUID_fn handle_by_uuid = nullptr;
  nvmlDeviceGetHandleByPciBusId_v2_fn handle_by_pci = nullptr;
  nvmlDeviceGetName_fn name = nullptr;
  nvmlDeviceGetUUID_fn uuid = nullptr;
  nvmlDeviceGetPciInfo_v3_fn pci_info = nullptr;
  nvmlDeviceGetSamples_fn samples = nullptr;
  nvmlDeviceGetFieldValues_fn field_values = nullptr;
  nvmlDeviceGetPowerUsage_fn power_usage = nullptr;
  nvmlDeviceGetTotalEnergyConsumption_fn total_energy = nullptr;
  nvmlDeviceGetPowerManagementLimit_fn power_limit = nullptr;
  nvmlDeviceGetClockInfo_fn clock_info = nullptr;
  nvmlDeviceGetTemperature_fn temperature = nullptr;
  fake_nvml_realtime_ns_fn stamp_clock_ns = nullptr;  // see fake_nvml_realtime_ns_fn
};

struct DeviceInfo {
  unsigned int nvml_index = 0;
  std::string name;
  std::string uuid;
  std::string pci_bus_id;
  unsigned int power_limit_mw = 0;  // 0 when unknown
};

class NvmlLibrary {
 public:
  // Opens `path` when non-empty, else libnvidia-ml.so.1 then libnvidia-ml.so from the loader's search path, and
  // calls nvmlInit_v2. Throws NvmlError: code 12 (library not found) with the paths tried, 13 for a missing
  // required symbol, or nvmlInit's own code.
  static std::shared_ptr<NvmlLibrary> open(const std::string& path);

  ~NvmlLibrary();
  // Owns an NVML init reference: not copyable; shared through shared_ptr instead of moved.
  NvmlLibrary(const NvmlLibrary&) = delete;
  NvmlLibrary& operator=(const NvmlLibrary&) = delete;

  const NvmlSymbols& sym() const { return sym_; }
  const std::string& path() const { return path_; }

  // Every method below that calls NVML does so under NvmlCallGuard.

  // The one choke point for NVML return codes on caller threads: throws NvmlError unless rc is success.
  void check(const char* call, nvmlReturn_t rc) const;
  std::string error_string(nvmlReturn_t rc) const;
  NvmlFailure capture(const char* call, nvmlReturn_t rc, int device_slot) const;

  std::string driver_version() const;
  std::string nvml_version() const;
  unsigned int device_count() const;
  nvmlDevice_t handle(unsigned int nvml_index) const;
  DeviceInfo info(unsigned int nvml_index) const;
  // The offset between the clock NVML stamps its buffered samples with (CLOCK_REALTIME) and CLOCK_MONOTONIC.
  RealtimeOffset realtime_offset() const;

 private:
  NvmlLibrary(void* dl, std::string path);
  void* dl_ = nullptr;
  std::string path_;
  NvmlSymbols sym_;
  bool initialized_ = false;
};

}  // namespace wattscope
