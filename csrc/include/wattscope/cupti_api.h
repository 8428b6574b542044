// The subset of CUPTI that wattscope calls, declared here so that nothing from CUDA is needed at build time.
// Signatures and constants follow cupti_result.h / cupti_activity.h (CUDA 12.x and 13.x); the library is opened
// with dlopen (cupti_library.hpp). Activity records are NOT declared as structs: their layout depends on the libcupti
// that is loaded, so kernel_tracer.cpp reads the few fields it needs at offsets that are stable across versions
// (docs/measurement-facts.md §3).
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

typedef int CUptiResult;
typedef struct CUctx_st* CUcontext;
// Opaque: records are read by offset, never through a declared layout.
typedef struct CUpti_Activity_st CUpti_Activity;

enum : int {
  CUPTI_SUCCESS = 0,
  CUPTI_ERROR_INVALID_PARAMETER = 1,
  CUPTI_ERROR_INVALID_OPERATION = 7,
  CUPTI_ERROR_OUT_OF_MEMORY = 8,
  CUPTI_ERROR_MAX_LIMIT_REACHED = 12,  // cuptiActivityGetNextRecord: no more records in the buffer
  CUPTI_ERROR_NOT_INITIALIZED = 15,
  CUPTI_ERROR_QUEUE_EMPTY = 18,  // cuptiActivityPopExternalCorrelationId on an empty stack
  CUPTI_ERROR_INVALID_KIND = 21,
  CUPTI_ERROR_NOT_SUPPORTED = 27,
  CUPTI_ERROR_INSUFFICIENT_PRIVILEGES = 35,
  CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED = 39,  // another profiler (Nsight, a sanitizer) holds CUPTI
  CUPTI_ERROR_UNKNOWN = 999,
};

// CUpti_ActivityKind values used here.
enum : uint32_t {
  CUPTI_ACTIVITY_KIND_MEMCPY = 1,
  CUPTI_ACTIVITY_KIND_MEMSET = 2,
  CUPTI_ACTIVITY_KIND_KERNEL = 3,  // serializes kernels: never enabled, parsed like CONCURRENT_KERNEL if seen
  CUPTI_ACTIVITY_KIND_DRIVER = 4,
  CUPTI_ACTIVITY_KIND_RUNTIME = 5,
  CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL = 10,
  CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION = 39,
};

// CUpti_ExternalCorrelationKind: Kineto (torch.profiler) uses CUSTOM0 and CUSTOM1; wattscope's ranges use CUSTOM2.
enum : uint32_t { CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM2 = 5 };

// CUpti_ActivityFlag for cuptiActivityFlushAll.
enum : uint32_t { CUPTI_ACTIVITY_FLAG_FLUSH_FORCED = 1u << 0 };

typedef void (*CUpti_BuffersCallbackRequestFunc)(uint8_t** buffer, size_t* size, size_t* maxNumRecords);
typedef void (*CUpti_BuffersCallbackCompleteFunc)(CUcontext context, uint32_t streamId, uint8_t* buffer, size_t size,
                                                   size_t validSize);

typedef CUptiResult (*cuptiGetVersion_fn)(uint32_t* version);
typedef CUptiResult (*cuptiGetResultString_fn)(CUptiResult result, const char** str);
typedef CUptiResult (*cuptiGetTimestamp_fn)(uint64_t* timestamp);
typedef CUptiResult (*cuptiActivityRegisterCallbacks_fn)(CUpti_BuffersCallbackRequestFunc request,
                                                         CUpti_BuffersCallbackCompleteFunc complete);
typedef CUptiResult (*cuptiActivityEnable_fn)(uint32_t kind);
typedef CUptiResult (*cuptiActivityDisable_fn)(uint32_t kind);
typedef CUptiResult (*cuptiActivityFlushAll_fn)(uint32_t flag);
typedef CUptiResult (*cuptiActivityGetNextRecord_fn)(uint8_t* buffer, size_t validBufferSizeBytes,
                                                     CUpti_Activity** record);
typedef CUptiResult (*cuptiActivityGetNumDroppedRecords_fn)(CUcontext context, uint32_t streamId, size_t* dropped);
typedef CUptiResult (*cuptiActivityPushExternalCorrelationId_fn)(uint32_t kind, uint64_t id);
typedef CUptiResult (*cuptiActivityPopExternalCorrelationId_fn)(uint32_t kind, uint64_t* lastId);
typedef CUptiResult (*cuptiFinalize_fn)(void);

}  // extern "C"
