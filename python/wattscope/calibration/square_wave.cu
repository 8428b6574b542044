// The calibration load: a power square wave timed on the GPU itself.
//
// Every thread follows one schedule of absolute %globaltimer instants (ns): busy inside [edges[2k], edges[2k+1]),
// quiet elsewhere, exit at end_ns. Busy is chains of dependent FMAs on every SM; quiet is __nanosleep in short
// slices, so the SMs stay resident (clocks up, nothing to launch) and only the arithmetic switches on and off.
// Timing on the GPU's own clock keeps the edges exact to a few µs whatever the host does meanwhile; the host maps
// its CLOCK_MONOTONIC onto %globaltimer with ws_read_globaltimer (see load.py).
//
// Compiled by nvcc at build time into a fatbin when the build has a CUDA compiler, else by NVRTC at run time:
// so it includes no header and uses only built-ins.

#define WS_FMA_CHAINS 8      // independent chains per thread: enough to fill the FMA pipes of every SM partition
#define WS_FMA_STEPS 64      // steps per busy chunk, ~2 µs at full clocks: the timer is checked between chunks
#define WS_SLEEP_SLICE_NS 20000u  // longest nap while quiet: an edge is caught within ~this

__device__ __forceinline__ unsigned long long ws_globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

extern "C" __global__ void ws_read_globaltimer(unsigned long long* out) { *out = ws_globaltimer_ns(); }

// span_ns[0]: the latest start among the blocks (when the whole grid was running), span_ns[1]: the latest exit.
// limit_ns bounds each block's life whatever end_ns says, so a wrong clock offset cannot leave a kernel spinning.
// sink is written only on an impossible value, so that the compiler keeps the arithmetic.
extern "C" __global__ void ws_schedule(const unsigned long long* edges_ns, int n_edges, unsigned long long end_ns,
                                       unsigned long long limit_ns, unsigned long long* span_ns, float* sink) {
  const unsigned long long start_ns = ws_globaltimer_ns();
  if (threadIdx.x == 0) atomicMax(&span_ns[0], start_ns);
  const unsigned long long stop_ns = end_ns < start_ns + limit_ns ? end_ns : start_ns + limit_ns;

  float acc[WS_FMA_CHAINS];
#pragma unroll
  for (int c = 0; c < WS_FMA_CHAINS; ++c) acc[c] = 1.0f + 1e-3f * (threadIdx.x + c);
  const float mul = 0.999999f;
  const float add = 1e-6f;

  int next = 0;  // index of the first edge still ahead; busy while an odd number of edges lie behind
  for (;;) {
    const unsigned long long now_ns = ws_globaltimer_ns();
    if (now_ns >= stop_ns) break;
    while (next < n_edges && __ldg(&edges_ns[next]) <= now_ns) ++next;
    if (next & 1) {
#pragma unroll
      for (int i = 0; i < WS_FMA_STEPS; ++i) {
#pragma unroll
        for (int c = 0; c < WS_FMA_CHAINS; ++c) acc[c] = fmaf(acc[c], mul, add);
      }
    } else {
      unsigned long long until_ns = next < n_edges ? __ldg(&edges_ns[next]) : stop_ns;
      if (until_ns > stop_ns) until_ns = stop_ns;
      const unsigned long long wait_ns = until_ns - now_ns;
      __nanosleep(wait_ns < WS_SLEEP_SLICE_NS ? static_cast<unsigned>(wait_ns) : WS_SLEEP_SLICE_NS);
    }
  }

  float total = 0.0f;
#pragma unroll
  for (int c = 0; c < WS_FMA_CHAINS; ++c) total += acc[c];
  if (total == -1.0f) sink[0] = total;
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(&span_ns[1], ws_globaltimer_ns());
}
