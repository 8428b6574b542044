// LD_PRELOAD helper for the GPU host: on SIGABRT, SIGSEGV or SIGBUS, write the native stack to stderr before dying as
// before. glibc's heap checks abort inside free(), often at process exit, where Python's faulthandler is already off;
// this says which library's free it was. (faulthandler, when on, prints the Python stack and then chains here.)
//
//   cc -shared -fPIC -O1 -o /tmp/abort_bt.so bench/abort_backtrace.c
//   LD_PRELOAD=/tmp/abort_bt.so python3 -m pytest ...      (stage abort_trace of bench/gpu_check.sh)
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

static void on_abort(int sig) {
  void* frames[64];
  const int n = backtrace(frames, 64);
  static const char kHeader[] = "\n== native stack at a fatal signal (SIGABRT, SIGSEGV or SIGBUS) ==\n";
  (void)!write(2, kHeader, sizeof kHeader - 1);
  backtrace_symbols_fd(frames, n, 2);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  signal(SIGABRT, on_abort);
  signal(SIGSEGV, on_abort);
  signal(SIGBUS, on_abort);
}
