#include "wattscope/cupti_library.hpp"

#include <dlfcn.h>
#include <glob.h>

#include <algorithm>
#include <cstdlib>

#include "wattscope/clock.hpp"

namespace wattscope {

namespace {

template <typename Fn>
void resolve(void* dl, const char* symbol, Fn& out) {
  out = reinterpret_cast<Fn>(dlsym(dl, symbol));
}

// What to do next, for the codes a user can act on.
std::string advice(int code) {
  switch (code) {
    case CUPTI_ERROR_INSUFFICIENT_PRIVILEGES:
      return "; GPU profiling is restricted to admin users: run as root or load the nvidia module with "
             "NVreg_RestrictProfilingToAdminUsers=0";
    case CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED:
      return "; another profiler (Nsight Systems/Compute, compute-sanitizer) holds CUPTI: measure without kernel "
             "tracing, or run outside the profiler";
    case CUPTI_ERROR_NOT_INITIALIZED:
      return "; CUPTI could not initialise: check that the driver supports this libcupti (CUDA 13 needs driver "
             ">= 580, 12.x >= 525) or point WATTSCOPE_CUPTI_PATH at a matching libcupti";
    default:
      return "";
  }
}

// Path of the file a handle maps, for handles found by soname.
std::string mapped_path(void* dl, const std::string& fallback) {
  void* sym = dlsym(dl, "cuptiActivityFlushAll");
  Dl_info info{};
  if (sym != nullptr && dladdr(sym, &info) != 0 && info.dli_fname != nullptr) return info.dli_fname;
  return fallback;
}

// Newest CUDA first: "nvidia/cu13/lib" sorts after "nvidia/cu12/lib" and "cuda_cupti", and so.13 after so.12.
std::vector<std::string> glob_newest_first(const std::string& pattern) {
  std::vector<std::string> out;
  glob_t g{};
  if (glob(pattern.c_str(), 0, nullptr, &g) == 0) {
    for (std::size_t i = 0; i < g.gl_pathc; ++i) out.emplace_back(g.gl_pathv[i]);
  }
  globfree(&g);
  std::sort(out.rbegin(), out.rend());
  return out;
}

}  // namespace

std::shared_ptr<CuptiLibrary> CuptiLibrary::open(const std::string& path, const std::vector<std::string>& search_dirs) {
  for (const char* soname : {"libcupti.so.13", "libcupti.so.12"}) {
    if (void* dl = dlopen(soname, RTLD_NOW | RTLD_NOLOAD); dl != nullptr) {
      return std::shared_ptr<CuptiLibrary>(new CuptiLibrary(dl, mapped_path(dl, soname), true));
    }
  }
  std::string explicit_path = path;
  if (explicit_path.empty()) {
    const char* env = std::getenv("WATTSCOPE_CUPTI_PATH");
    if (env != nullptr) explicit_path = env;
  }
  std::vector<std::string> candidates;
  if (!explicit_path.empty()) {
    candidates.push_back(explicit_path);
  } else {
    for (const auto& dir : search_dirs) {
      for (auto& found : glob_newest_first(dir + "/nvidia/*/lib/libcupti.so*")) candidates.push_back(found);
    }
    if (const char* cuda_home = std::getenv("CUDA_HOME"); cuda_home != nullptr) {
      for (const char* sub : {"/extras/CUPTI/lib64/libcupti.so*", "/lib64/libcupti.so*"}) {
        for (auto& found : glob_newest_first(std::string(cuda_home) + sub)) candidates.push_back(found);
      }
    }
    for (const char* soname : {"libcupti.so.13", "libcupti.so.12", "libcupti.so"}) candidates.emplace_back(soname);
  }
  std::string tried;
  for (const auto& candidate : candidates) {
    // RTLD_GLOBAL like the CUDA wheels' own loading, so that a later `import torch` resolving libcupti.so.13 by
    // soname finds this copy instead of mapping a second one.
    void* dl = dlopen(candidate.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (dl != nullptr) return std::shared_ptr<CuptiLibrary>(new CuptiLibrary(dl, mapped_path(dl, candidate), false));
    const char* why = dlerror();
    tried += "\n  " + candidate + ": " + (why != nullptr ? why : "not found");
  }
  throw CuptiError("dlopen", kCuptiLibraryNotFound,
                   "could not load CUPTI (needed for kernel tracing only); install the CUDA wheels "
                   "(pip install nvidia-cuda-cupti-cu12, or torch with CUDA) or set WATTSCOPE_CUPTI_PATH; tried:" +
                       tried);
}

CuptiLibrary::CuptiLibrary(void* dl, std::string path, bool reused)
    : dl_(dl), path_(std::move(path)), reused_(reused) {
  // CUDA 13.2's libcupti dies with SIGSEGV in its very first call (cuptiGetVersion) when no CUDA driver can be
  // loaded: every CPU-only machine with a CUDA build of torch installed (CI found it). So nothing is called before
  // libcuda.so.1 loads. The bundled fake CUPTI, recognised by its control symbol, needs no driver.
  if (dlsym(dl_, "fake_cupti_reset") == nullptr && dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL) == nullptr) {
    throw CuptiError("dlopen", kCuptiNoDriver,
                     "no CUDA driver (libcuda.so.1) could be loaded, and CUPTI cannot run without one: kernel "
                     "tracing needs an NVIDIA GPU and driver (energy measurement does not)");
  }
  resolve(dl_, "cuptiGetResultString", sym_.result_string);
  resolve(dl_, "cuptiGetTimestamp", sym_.get_timestamp);
  resolve(dl_, "cuptiActivityRegisterCallbacks", sym_.register_callbacks);
  resolve(dl_, "cuptiActivityEnable", sym_.enable);
  resolve(dl_, "cuptiActivityDisable", sym_.disable);
  resolve(dl_, "cuptiActivityFlushAll", sym_.flush_all);
  resolve(dl_, "cuptiActivityGetNextRecord", sym_.next_record);
  for (const auto& [symbol, present] :
       {std::pair{"cuptiGetResultString", sym_.result_string != nullptr},
        std::pair{"cuptiGetTimestamp", sym_.get_timestamp != nullptr},
        std::pair{"cuptiActivityRegisterCallbacks", sym_.register_callbacks != nullptr},
        std::pair{"cuptiActivityEnable", sym_.enable != nullptr},
        std::pair{"cuptiActivityDisable", sym_.disable != nullptr},
        std::pair{"cuptiActivityFlushAll", sym_.flush_all != nullptr},
        std::pair{"cuptiActivityGetNextRecord", sym_.next_record != nullptr}}) {
    if (!present) {
      throw CuptiError("dlsym", kCuptiSymbolMissing,
                       std::string(symbol) + " is missing from " + path_ + " (not libcupti, or too old?)");
    }
  }
  resolve(dl_, "cuptiGetVersion", sym_.get_version);
  resolve(dl_, "cuptiActivityGetNumDroppedRecords", sym_.dropped_records);
  resolve(dl_, "cuptiActivityPushExternalCorrelationId", sym_.push_external_id);
  resolve(dl_, "cuptiActivityPopExternalCorrelationId", sym_.pop_external_id);
  resolve(dl_, "cuptiFinalize", sym_.finalize);
  if (sym_.get_version != nullptr) check("cuptiGetVersion", sym_.get_version(&version_));
}

CUptiResult CuptiLibrary::push_range(uint64_t id) const {
  if (!has_ranges()) return kCuptiSymbolMissing;
  return sym_.push_external_id(CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM2, id);
}

CUptiResult CuptiLibrary::finalize() const {
  return sym_.finalize == nullptr ? kCuptiSymbolMissing : sym_.finalize();
}

CUptiResult CuptiLibrary::pop_range() const {
  if (!has_ranges()) return kCuptiSymbolMissing;
  uint64_t last = 0;
  return sym_.pop_external_id(CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM2, &last);
}

std::string CuptiLibrary::error_string(CUptiResult rc) const {
  const char* s = nullptr;
  if (sym_.result_string == nullptr || sym_.result_string(rc, &s) != CUPTI_SUCCESS || s == nullptr) {
    return "unknown CUPTI error";
  }
  return s;
}

void CuptiLibrary::check(const char* call, CUptiResult rc) const {
  if (rc != CUPTI_SUCCESS) throw CuptiError(call, rc, error_string(rc) + advice(rc));
}

CuptiFailure CuptiLibrary::capture(const char* call, CUptiResult rc) const {
  return CuptiFailure{call, rc, error_string(rc) + advice(rc), mono_now_ns()};
}

}  // namespace wattscope
