// Control API of the fake CUPTI library (libwattscope_fake_cupti.so).
//
// The product loads the fake through CuptiLibrary::open(path) (or WATTSCOPE_CUPTI_PATH), the real dlopen path;
// tests open the same file (ctypes.CDLL / dlopen returns the loaded instance) and drive it with these functions.
// Thread-safe: every function may be called while CUPTI calls are in flight.
//
// Model: injected records go into the buffer the fake holds, requested from the product's request callback when
// the current one lacks room (as CUPTI does, on the thread that produces the record); a request answered with no
// buffer drops the record and counts it for cuptiActivityGetNumDroppedRecords. cuptiActivityFlushAll hands every
// held buffer that has records to the complete callback (forced: the empty ones too), on the calling thread, with
// no lock of the fake held. Records are only made for enabled kinds.
//
// Clock: cuptiGetTimestamp and injected stamps read ticks = round(ticks_per_ns * CLOCK_MONOTONIC ns) + offset_ticks.
// After reset: 1 tick per ns and offset = CLOCK_REALTIME - CLOCK_MONOTONIC, as real CUPTI's default clock.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

#define FAKE_CUPTI_API __attribute__((visibility("default")))

// Sizes of the records the fake writes (Kernel10's 216 B; the others are the fake's choice). The product never
// assumes a size: it walks buffers with cuptiActivityGetNextRecord.
#define FAKE_CUPTI_KERNEL_RECORD_BYTES 216u
#define FAKE_CUPTI_MEMCPY_RECORD_BYTES 88u
#define FAKE_CUPTI_MEMSET_RECORD_BYTES 72u
#define FAKE_CUPTI_API_RECORD_BYTES 40u                   // CUpti_ActivityAPI
#define FAKE_CUPTI_EXTERNAL_CORRELATION_RECORD_BYTES 24u  // CUpti_ActivityExternalCorrelation

// Forgets held buffers (without completing them), the callbacks, enabled kinds, failure rules, call counts,
// dropped counts and the calling thread's external-correlation stacks; restores the default clock and version
// 130001.
FAKE_CUPTI_API void fake_cupti_reset(void);

// ticks_per_ns > 0. Switching mid-run models torch.profiler installing its TSC timestamp callback.
FAKE_CUPTI_API void fake_cupti_set_clock(double ticks_per_ns, long long offset_ticks);
// The ticks the clock reads at monotonic time mono_ns.
FAKE_CUPTI_API unsigned long long fake_cupti_ticks_at(long long mono_ns);

// Appends one record of `kind` (10 kernel, 1 memcpy, 2 memset) stamped with the current clock at the given
// monotonic times; start_mono_ns == end_mono_ns == 0 writes raw zero stamps (a record CUPTI could not time). `name`
// is copied once per distinct string and the copy's address is stable for the life of the process, as CUPTI's
// per-function names are. Returns 1 when recorded, 0 when the kind is disabled or no buffer was handed out.
// With RUNTIME (or DRIVER) enabled, a record is preceded by its launching call's API record, and with
// EXTERNAL_CORRELATION also enabled by one external correlation record per kind whose id stack is not empty on the
// calling thread (cuptiActivityPushExternalCorrelationId), as CUPTI writes them for a launch on that thread.
FAKE_CUPTI_API int fake_cupti_inject(unsigned int kind, unsigned int device_id, unsigned int stream_id,
                                     const char* name, long long start_mono_ns, long long end_mono_ns,
                                     unsigned int correlation_id);

// After `after_calls` further successful calls of `function` (an exported cupti* name), every call returns `code`
// (sticky until reset; code 0 removes the rule). cuptiGetResultString cannot be failed.
FAKE_CUPTI_API void fake_cupti_fail(const char* function, unsigned int after_calls, int code);
// Calls of `function` so far, whatever they returned.
FAKE_CUPTI_API unsigned long long fake_cupti_call_count(const char* function);
// Completes the buffer the last flush completed once more, with the same valid bytes: a CUPTI that hands a buffer
// back twice. Returns 0 when no buffer was completed yet.
FAKE_CUPTI_API int fake_cupti_complete_again(void);
// 1 when `kind` is enabled.
FAKE_CUPTI_API int fake_cupti_enabled(unsigned int kind);
// Buffers the fake holds (handed out by the product, not yet completed).
FAKE_CUPTI_API unsigned int fake_cupti_buffers_held(void);
// Records dropped since reset (no buffer handed out), whether or not the product has asked for them yet.
FAKE_CUPTI_API unsigned long long fake_cupti_dropped_total(void);
// An API call that launches nothing (cudaGetLastError, an allocation): with RUNTIME or DRIVER enabled its record,
// and its external correlation records as for fake_cupti_inject. Returns 1 when written (or nothing to write).
FAKE_CUPTI_API int fake_cupti_api_call(unsigned int correlation_id);
// Ids on the calling thread's external-correlation stack of `kind` (5: CUSTOM2).
FAKE_CUPTI_API unsigned int fake_cupti_external_depth(unsigned int kind);
// What cuptiGetVersion returns.
FAKE_CUPTI_API void fake_cupti_set_version(unsigned int version);

#ifdef __cplusplus
}  // extern "C"
#endif
