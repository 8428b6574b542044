// NVML failures as data. Every NVML call goes through NvmlLibrary::check (throws NvmlError) or, on the sampler
// thread, through a capture into NvmlFailure (the thread never throws). Python maps codes to typed exceptions in one
// place (wattscope/errors.py).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "wattscope/foreign_call_error.hpp"

namespace wattscope {

// Codes that mean "no value this time" rather than failure (measurement-facts §1).
bool nvml_code_is_soft(int code);
// Codes after which a device gives no more readings: the sampler stops polling it.
bool nvml_code_is_fatal_for_device(int code);

struct NvmlFailure {
  std::string call;     // NVML symbol, e.g. "nvmlDeviceGetSamples"
  int code = 0;         // nvmlReturn_t as returned
  std::string message;  // nvmlErrorString(code), or the loader's message
  int device_slot = -1; // sampler slot, -1 when not device-specific
  int64_t t_ns = 0;     // monotonic time of the failure
};

class NvmlError : public ForeignCallError {
 public:
  NvmlError(std::string call, int code, std::string message)
      : ForeignCallError("NVML", std::move(call), code, std::move(message)) {}
};

}  // namespace wattscope
