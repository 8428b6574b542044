// CUPTI opened at run time with dlopen, reusing the copy already in the process when there is one (import torch
// loads libcupti.so.13 on CUDA-13 builds): two copies of CUPTI in one process fight over the same driver state
// (docs/measurement-facts.md §3). Never dlclose, and cuptiFinalize only at process exit (finalize()): torch.profiler
// or another component may use the same mapping after us.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "wattscope/cupti_api.h"
#include "wattscope/foreign_call_error.hpp"

namespace wattscope {

// Not a CUPTI code: the library (or a required symbol) could not be loaded.
constexpr int kCuptiLibraryNotFound = -1;
constexpr int kCuptiSymbolMissing = -2;
// Not a CUPTI code: another wattscope KernelTracer already owns CUPTI's process-global activity state.
constexpr int kCuptiTracerBusy = -3;
// Not a CUPTI code: no CUDA driver could be loaded, and CUPTI must not be called without one.
constexpr int kCuptiNoDriver = -4;

struct CuptiFailure {
  std::string call;     // CUPTI symbol, e.g. "cuptiActivityFlushAll"
  int code = 0;         // CUptiResult as returned
  std::string message;  // cuptiGetResultString(code) and what to do next
  int64_t t_ns = 0;     // monotonic time of the failure
};

class CuptiError : public ForeignCallError {
 public:
  CuptiError(std::string call, int code, std::string message)
      : ForeignCallError("CUPTI", std::move(call), code, std::move(message)) {}
};

struct CuptiSymbols {
  // Required: without these CuptiLibrary::open fails.
  cuptiGetResultString_fn result_string = nullptr;
  cuptiGetTimestamp_fn get_timestamp = nullptr;
  cuptiActivityRegisterCallbacks_fn register_callbacks = nullptr;
  cuptiActivityEnable_fn enable = nullptr;
  cuptiActivityDisable_fn disable = nullptr;
  cuptiActivityFlushAll_fn flush_all = nullptr;
  cuptiActivityGetNextRecord_fn next_record = nullptr;
  // Optional.
  cuptiGetVersion_fn get_version = nullptr;
  cuptiActivityGetNumDroppedRecords_fn dropped_records = nullptr;
  cuptiActivityPushExternalCorrelationId_fn push_external_id = nullptr;  // both or neither: ranges need them
  cuptiActivityPopExternalCorrelationId_fn pop_external_id = nullptr;
  cuptiFinalize_fn finalize = nullptr;
};

class CuptiLibrary {
 public:
  // Loads CUPTI, first match wins:
  //   1. a libcupti.so.13 or .so.12 already loaded in the process (RTLD_NOLOAD): reused, never a second copy;
  //   2. `path` when non-empty, else $WATTSCOPE_CUPTI_PATH when set (a failure here is final: no silent fallback);
  //   3. <dir>/nvidia/*/lib/libcupti.so* for each of `search_dirs` (site-packages: the pip CUDA wheels), newest
  //      CUDA first, then $CUDA_HOME/extras/CUPTI/lib64 and $CUDA_HOME/lib64, then the loader's own search path.
  // Throws CuptiError (kCuptiLibraryNotFound with every place tried, kCuptiSymbolMissing, or cuptiGetVersion's code).
  static std::shared_ptr<CuptiLibrary> open(const std::string& path, const std::vector<std::string>& search_dirs);

  // Shared, never copied: the handle is process-global state that is never closed.
  CuptiLibrary(const CuptiLibrary&) = delete;
  CuptiLibrary& operator=(const CuptiLibrary&) = delete;
  ~CuptiLibrary() = default;

  const CuptiSymbols& sym() const { return sym_; }
  const std::string& path() const { return path_; }
  // True when step 1 found a copy someone else loaded.
  bool reused() const { return reused_; }
  // cuptiGetVersion: 18–28 for CUDA 12.x, xxyyzz for 13.x (130001 = 13.0 update 1); 0 when the symbol is absent.
  uint32_t version() const { return version_; }

  // User ranges (kernel_tracer.hpp, TracerConfig::ranges): push `id` on the calling thread's CUSTOM2 stack of
  // external correlation ids, or pop the top one. Every CUDA API call the thread makes meanwhile is correlated with
  // it. Return CUPTI's code (no throw: these sit on the user's hot path); kCuptiSymbolMissing when this libcupti
  // lacks them.
  CUptiResult push_range(uint64_t id) const;
  CUptiResult pop_range() const;
  bool has_ranges() const { return sym_.push_external_id != nullptr && sym_.pop_external_id != nullptr; }

  // cuptiFinalize: detach CUPTI from the process, every subscriber and activity kind with it. For the interpreter's
  // exit only, after every tracer has stopped: torch.profiler's Kineto leaves a callback subscriber behind when it
  // does not tear CUPTI down itself, and the CUDA context's release at exit then calls into Kineto after its
  // singleton was destroyed (a double free, H100 session 8). CUPTI's code; kCuptiSymbolMissing when absent.
  CUptiResult finalize() const;

  // The one choke point for CUPTI return codes: throws CuptiError unless rc is CUPTI_SUCCESS.
  void check(const char* call, CUptiResult rc) const;
  // The same information as data, for paths that must not throw (stop, destructors, the flusher).
  CuptiFailure capture(const char* call, CUptiResult rc) const;
  std::string error_string(CUptiResult rc) const;

 private:
  CuptiLibrary(void* dl, std::string path, bool reused);
  void* dl_ = nullptr;
  std::string path_;
  bool reused_ = false;
  uint32_t version_ = 0;
  CuptiSymbols sym_;
};

}  // namespace wattscope
