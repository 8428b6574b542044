// The least a CUPTI kernel tracer can cost: a bare Activity API client for bench/kernel_overhead_bench.py's
// `cupti_floor` mode. It enables the kinds a kernel meter enables (CONCURRENT_KERNEL, MEMCPY, MEMSET), hands CUPTI
// 4 MB buffers from a fixed pool, counts the kernel records in the buffers CUPTI returns and does nothing else: no
// periodic flush, no clock points, no parsing, no sampler. Its slowdown next to PowerMeter(kernels=True)'s, in one
// run, says how much of the kernel meter's cost is CUPTI's own and how much is wattscope's.
//
//   cc -shared -fPIC -O2 -o /tmp/cupti_floor.so bench/cupti_floor.c -ldl -lpthread   (the bench builds it itself)
//
// It uses the libcupti already loaded in the process (torch's, or the one a kernel meter loaded), never a second
// copy. Buffers are never freed: CUPTI may still write into a buffer it has handed back after a teardown
// (pytorch/pytorch#195471), so the pool lives as long as the process.
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

enum { kKindMemcpy = 1, kKindMemset = 2, kKindConcurrentKernel = 10, kFlushForced = 1 };
enum { kBufferBytes = 4 << 20, kBuffers = 16 };

typedef int (*RegisterFn)(void (*)(uint8_t**, size_t*, size_t*), void (*)(void*, uint32_t, uint8_t*, size_t, size_t));
typedef int (*KindFn)(uint32_t);
typedef int (*FlushFn)(uint32_t);
typedef int (*NextRecordFn)(uint8_t*, size_t, void**);

static RegisterFn register_callbacks;
static KindFn enable, disable;
static FlushFn flush_all;
static NextRecordFn next_record;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint8_t* pool[kBuffers];
static int free_list[kBuffers];
static int n_free;
static uint64_t kernels, refused;

static const uint32_t kinds[] = {kKindConcurrentKernel, kKindMemcpy, kKindMemset};
enum { kNumKinds = sizeof kinds / sizeof kinds[0] };

static void on_request(uint8_t** buffer, size_t* size, size_t* max_records) {
  pthread_mutex_lock(&mu);
  if (n_free == 0) {
    ++refused;
    *buffer = NULL;
    *size = 0;
  } else {
    *buffer = pool[free_list[--n_free]];
    *size = kBufferBytes;
  }
  pthread_mutex_unlock(&mu);
  *max_records = 0;
}

static void on_complete(void* ctx, uint32_t stream, uint8_t* buffer, size_t size, size_t valid) {
  (void)ctx, (void)stream, (void)size;
  uint64_t n = 0;
  void* record = NULL;
  while (next_record(buffer, valid, &record) == 0) n += *(const uint32_t*)record == kKindConcurrentKernel;
  pthread_mutex_lock(&mu);
  kernels += n;
  for (int i = 0; i < kBuffers; ++i) {
    if (pool[i] == buffer) free_list[n_free++] = i;
  }
  pthread_mutex_unlock(&mu);
}

// 0 on success; -1: no libcupti loaded in this process; -2: a symbol is missing; -3: out of memory.
int floor_load(void) {
  void* dl = dlopen("libcupti.so.13", RTLD_NOW | RTLD_NOLOAD);
  if (dl == NULL) dl = dlopen("libcupti.so.12", RTLD_NOW | RTLD_NOLOAD);
  if (dl == NULL) return -1;
  register_callbacks = (RegisterFn)dlsym(dl, "cuptiActivityRegisterCallbacks");
  enable = (KindFn)dlsym(dl, "cuptiActivityEnable");
  disable = (KindFn)dlsym(dl, "cuptiActivityDisable");
  flush_all = (FlushFn)dlsym(dl, "cuptiActivityFlushAll");
  next_record = (NextRecordFn)dlsym(dl, "cuptiActivityGetNextRecord");
  if (!register_callbacks || !enable || !disable || !flush_all || !next_record) return -2;
  for (int i = 0; i < kBuffers; ++i) {
    if (pool[i] == NULL && (pool[i] = aligned_alloc(8, kBufferBytes)) == NULL) return -3;
    free_list[i] = i;
  }
  n_free = kBuffers;
  return 0;
}

// 0 on success, else the failing CUPTI call's result code.
int floor_start(void) {
  int rc = register_callbacks(on_request, on_complete);
  if (rc != 0) return rc;
  flush_all(kFlushForced);  // hand back anything a client before us left inside CUPTI, before counting
  pthread_mutex_lock(&mu);
  kernels = refused = 0;
  pthread_mutex_unlock(&mu);
  for (int i = 0; i < kNumKinds; ++i) {
    if ((rc = enable(kinds[i])) != 0) return rc;
  }
  return 0;
}

// Disables the kinds and flushes; returns the kernel records counted since floor_start (refused buffers: *refused).
uint64_t floor_stop(uint64_t* refused_out) {
  for (int i = 0; i < kNumKinds; ++i) disable(kinds[i]);
  flush_all(kFlushForced);
  pthread_mutex_lock(&mu);
  const uint64_t n = kernels;
  *refused_out = refused;
  pthread_mutex_unlock(&mu);
  return n;
}
