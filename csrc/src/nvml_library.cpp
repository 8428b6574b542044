#include "wattscope/nvml_library.hpp"

#include <dlfcn.h>
#include <pthread.h>

#include <mutex>

namespace wattscope {

namespace {

// See NvmlCallGuard. Constant-initialised, and never destroyed in a way that matters (a trivial destructor on
// Linux), so a thread still inside NVML while static destructors run at exit finds it usable.
std::mutex g_nvml_call_mu;
std::once_flag g_atfork_once;

void install_atfork() {
  std::call_once(g_atfork_once, [] {
    pthread_atfork([] { g_nvml_call_mu.lock(); }, [] { g_nvml_call_mu.unlock(); },
                   [] { g_nvml_call_mu.unlock(); });
  });
}

template <typename Fn>
void resolve(void* dl, const char* symbol, Fn& out) {
  out = reinterpret_cast<Fn>(dlsym(dl, symbol));
}

}  // namespace

NvmlCallGuard::NvmlCallGuard() { g_nvml_call_mu.lock(); }
NvmlCallGuard::~NvmlCallGuard() { g_nvml_call_mu.unlock(); }

std::shared_ptr<NvmlLibrary> NvmlLibrary::open(const std::string& path) {
  std::vector<std::string> candidates;
  if (!path.empty()) {
    candidates.push_back(path);
  } else {
    candidates = {"libnvidia-ml.so.1", "libnvidia-ml.so"};
  }
  install_atfork();
  std::string tried;
  for (const auto& candidate : candidates) {
    // RTLD_LOCAL: our symbols never shadow another copy of NVML that the process (or pynvml) uses.
    void* dl = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (dl != nullptr) {
      std::shared_ptr<NvmlLibrary> lib(new NvmlLibrary(dl, candidate));
      lib->check("nvmlInit_v2", guarded_call(lib->sym_.init));
      lib->initialized_ = true;
      return lib;
    }
    const char* why = dlerror();
    tried += "\n  " + candidate + ": " + (why != nullptr ? why : "not found");
  }
  throw NvmlError("dlopen", NVML_ERROR_LIBRARY_NOT_FOUND, "could not load the NVML library; tried:" + tried);
}

NvmlLibrary::NvmlLibrary(void* dl, std::string path) : dl_(dl), path_(std::move(path)) {
  resolve(dl_, "nvmlInit_v2", sym_.init);
  resolve(dl_, "nvmlErrorString", sym_.error_string);
  resolve(dl_, "nvmlDeviceGetCount_v2", sym_.get_count);
  resolve(dl_, "nvmlDeviceGetHandleByIndex_v2", sym_.handle_by_index);
  for (const auto& [symbol, present] : {std::pair{"nvmlInit_v2", sym_.init != nullptr},
                                        std::pair{"nvmlErrorString", sym_.error_string != nullptr},
                                        std::pair{"nvmlDeviceGetCount_v2", sym_.get_count != nullptr},
                                        std::pair{"nvmlDeviceGetHandleByIndex_v2", sym_.handle_by_index != nullptr}}) {
    if (!present) {
      throw NvmlError("dlsym", NVML_ERROR_FUNCTION_NOT_FOUND,
                      std::string(symbol) + " is missing from " + path_ + " (driver too old or not NVML?)");
    }
  }
  resolve(dl_, "nvmlShutdown", sym_.shutdown);
  resolve(dl_, "nvmlSystemGetDriverVersion", sym_.driver_version);
  resolve(dl_, "nvmlSystemGetNVMLVersion", sym_.nvml_version);
  resolve(dl_, "nvmlDeviceGetHandleByUUID", sym_.handle_by_uuid);
  resolve(dl_, "nvmlDeviceGetHandleByPciBusId_v2", sym_.handle_by_pci);
  resolve(dl_, "nvmlDeviceGetName", sym_.name);
  resolve(dl_, "nvmlDeviceGetUUID", sym_.uuid);
  resolve(dl_, "nvmlDeviceGetPciInfo_v3", sym_.pci_info);
  resolve(dl_, "nvmlDeviceGetSamples", sym_.samples);
  resolve(dl_, "nvmlDeviceGetFieldValues", sym_.field_values);
  resolve(dl_, "nvmlDeviceGetPowerUsage", sym_.power_usage);
  resolve(dl_, "nvmlDeviceGetTotalEnergyConsumption", sym_.total_energy);
  resolve(dl_, "nvmlDeviceGetPowerManagementLimit", sym_.power_limit);
  resolve(dl_, "nvmlDeviceGetClockInfo", sym_.clock_info);
  resolve(dl_, "nvmlDeviceGetTemperature", sym_.temperature);
  resolve(dl_, "fake_nvml_realtime_ns", sym_.stamp_clock_ns);
}

NvmlLibrary::~NvmlLibrary() {
  // Balance our nvmlInit; NVML counts references, so other users in the process keep theirs. No dlclose: another
  // component may still call into the same mapping.
  if (initialized_ && sym_.shutdown != nullptr) guarded_call(sym_.shutdown);
}

std::string NvmlLibrary::error_string(nvmlReturn_t rc) const {
  const char* s = sym_.error_string != nullptr ? guarded_call(sym_.error_string, rc) : nullptr;
  return s != nullptr ? std::string(s) : "unknown NVML error";
}

void NvmlLibrary::check(const char* call, nvmlReturn_t rc) const {
  if (rc != NVML_SUCCESS) throw NvmlError(call, rc, error_string(rc));
}

NvmlFailure NvmlLibrary::capture(const char* call, nvmlReturn_t rc, int device_slot) const {
  return NvmlFailure{call, rc, error_string(rc), device_slot, mono_now_ns()};
}

std::string NvmlLibrary::driver_version() const {
  if (sym_.driver_version == nullptr) return {};
  char buf[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE] = {};
  check("nvmlSystemGetDriverVersion", guarded_call(sym_.driver_version, buf, unsigned{sizeof buf}));
  return buf;
}

std::string NvmlLibrary::nvml_version() const {
  if (sym_.nvml_version == nullptr) return {};
  char buf[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE] = {};
  check("nvmlSystemGetNVMLVersion", guarded_call(sym_.nvml_version, buf, unsigned{sizeof buf}));
  return buf;
}

unsigned int NvmlLibrary::device_count() const {
  unsigned int n = 0;
  check("nvmlDeviceGetCount_v2", guarded_call(sym_.get_count, &n));
  return n;
}

nvmlDevice_t NvmlLibrary::handle(unsigned int nvml_index) const {
  nvmlDevice_t h = nullptr;
  check("nvmlDeviceGetHandleByIndex_v2", guarded_call(sym_.handle_by_index, nvml_index, &h));
  return h;
}

DeviceInfo NvmlLibrary::info(unsigned int nvml_index) const {
  DeviceInfo out;
  out.nvml_index = nvml_index;
  nvmlDevice_t h = handle(nvml_index);
  if (sym_.name != nullptr) {
    char buf[NVML_DEVICE_NAME_BUFFER_SIZE] = {};
    check("nvmlDeviceGetName", guarded_call(sym_.name, h, buf, unsigned{sizeof buf}));
    out.name = buf;
  }
  if (sym_.uuid != nullptr) {
    char buf[NVML_DEVICE_UUID_BUFFER_SIZE] = {};
    check("nvmlDeviceGetUUID", guarded_call(sym_.uuid, h, buf, unsigned{sizeof buf}));
    out.uuid = buf;
  }
  if (sym_.pci_info != nullptr) {
    nvmlPciInfo_t pci{};
    check("nvmlDeviceGetPciInfo_v3", guarded_call(sym_.pci_info, h, &pci));
    out.pci_bus_id = pci.busId;
  }
  if (sym_.power_limit != nullptr) {
    unsigned int mw = 0;
    // Not supported on some boards (vGPU): the limit is informative only.
    if (guarded_call(sym_.power_limit, h, &mw) == NVML_SUCCESS) out.power_limit_mw = mw;
  }
  return out;
}

RealtimeOffset NvmlLibrary::realtime_offset() const {
  if (sym_.stamp_clock_ns == nullptr) return measure_realtime_offset();
  // Guarded once around all the brackets (a call into the loaded library like any other), so the lock does not
  // widen them.
  NvmlCallGuard guard;
  return measure_realtime_offset(7, sym_.stamp_clock_ns);
}

}  // namespace wattscope
