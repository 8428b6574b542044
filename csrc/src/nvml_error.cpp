#include "wattscope/nvml_error.hpp"

#include "wattscope/nvml_api.h"

namespace wattscope {

bool nvml_code_is_soft(int code) {
  return code == NVML_ERROR_NOT_SUPPORTED || code == NVML_ERROR_NOT_FOUND || code == NVML_ERROR_NO_DATA ||
         code == NVML_ERROR_NOT_READY;
}

bool nvml_code_is_fatal_for_device(int code) {
  return code == NVML_ERROR_DRIVER_NOT_LOADED || code == NVML_ERROR_GPU_IS_LOST ||
         code == NVML_ERROR_RESET_REQUIRED || code == NVML_ERROR_LIB_RM_VERSION_MISMATCH ||
         code == NVML_ERROR_UNINITIALIZED;
}

}  // namespace wattscope
