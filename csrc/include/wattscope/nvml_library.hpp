// NVML opened at run time with dlopen: the package builds and imports where there is no driver, and tests load a
// fake library through this same path. Never dlclose (others in the process may hold NVML) and init/shutdown are
// reference counted by NVML itself.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "wattscope/nvml_api.h"
#include "wattscope/nvml_error.hpp"

namespace wattscope {

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

  // The one choke point for NVML return codes on caller threads: throws NvmlError unless rc is success.
  void check(const char* call, nvmlReturn_t rc) const;
  std::string error_string(nvmlReturn_t rc) const;
  NvmlFailure capture(const char* call, nvmlReturn_t rc, int device_slot) const;

  std::string driver_version() const;
  std::string nvml_version() const;
  unsigned int device_count() const;
  nvmlDevice_t handle(unsigned int nvml_index) const;
  DeviceInfo info(unsigned int nvml_index) const;

 private:
  NvmlLibrary(void* dl, std::string path);
  void* dl_ = nullptr;
  std::string path_;
  NvmlSymbols sym_;
  bool initialized_ = false;
};

}  // namespace wattscope
