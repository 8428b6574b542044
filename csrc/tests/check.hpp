// The native tests' small harness (no test framework): CHECK* record a failure and print `file:line: expr`,
// run_tests prints one line per test and a last line `N passed, M failed`, and returns the exit status.
// Thread-safe checks: the concurrency tests check from several threads. One header per test executable.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>

#include "wattscope/clock.hpp"

namespace wattscope_test {

inline std::atomic<int> g_failed_checks{0};
inline std::mutex g_print_mu;

inline void report_failure(const char* file, int line, const std::string& what) {
  g_failed_checks.fetch_add(1);
  std::lock_guard<std::mutex> lk(g_print_mu);
  std::printf("%s:%d: %s\n", file, line, what.c_str());
  std::fflush(stdout);
}

template <typename T>
std::string to_text(const T& v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

struct TestCase {
  const char* name;
  void (*fn)();
};

// before: resets the fake; after: checks what every test must leave behind (may report failures).
template <typename Tests>
int run_tests(const Tests& tests, const std::function<void()>& before, const std::function<void(const char*)>& after) {
  int passed = 0;
  int failed = 0;
  for (const TestCase& tc : tests) {
    const int failures_before = g_failed_checks.load();
    const int64_t t0 = wattscope::mono_now_ns();
    before();
    try {
      tc.fn();
    } catch (const std::exception& e) {
      report_failure(__FILE__, __LINE__, std::string(tc.name) + ": unexpected exception: " + e.what());
    } catch (...) {
      report_failure(__FILE__, __LINE__, std::string(tc.name) + ": unexpected non-std exception");
    }
    after(tc.name);
    const bool ok = g_failed_checks.load() == failures_before;
    (ok ? passed : failed) += 1;
    std::printf("%s %s (%.0f ms)\n", ok ? "PASS" : "FAIL", tc.name,
                static_cast<double>(wattscope::mono_now_ns() - t0) / 1e6);
    std::fflush(stdout);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed > 0 ? 1 : 0;
}

}  // namespace wattscope_test

#define CHECK(expr)                                                              \
  do {                                                                           \
    if (!(expr)) ::wattscope_test::report_failure(__FILE__, __LINE__, #expr);    \
  } while (0)

// Also prints both operands. Operands must have comparable types (-Wsign-compare is an error here).
#define CHECK_OP(a, op, b)                                                                                     \
  do {                                                                                                         \
    const auto check_a_ = (a);                                                                                 \
    const auto check_b_ = (b);                                                                                 \
    if (!(check_a_ op check_b_))                                                                               \
      ::wattscope_test::report_failure(__FILE__, __LINE__,                                                     \
                                       std::string(#a " " #op " " #b " (") +                                   \
                                           ::wattscope_test::to_text(check_a_) + " vs " +                      \
                                           ::wattscope_test::to_text(check_b_) + ")");                         \
  } while (0)
#define CHECK_EQ(a, b) CHECK_OP(a, ==, b)
#define CHECK_NE(a, b) CHECK_OP(a, !=, b)
#define CHECK_LT(a, b) CHECK_OP(a, <, b)
#define CHECK_LE(a, b) CHECK_OP(a, <=, b)
#define CHECK_GT(a, b) CHECK_OP(a, >, b)
#define CHECK_GE(a, b) CHECK_OP(a, >=, b)
