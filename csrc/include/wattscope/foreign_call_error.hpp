#pragma once
// A failed call into a library wattscope loads at run time (NVML, CUPTI): the symbol, its raw return code and the
// library's own words, kept apart so the Python layer can map codes to typed errors in one place.

#include <stdexcept>
#include <string>
#include <utility>

namespace wattscope {

class ForeignCallError : public std::runtime_error {
 public:
  // library names the code space in the message, e.g. "NVML code 15".
  ForeignCallError(const std::string& library, std::string call, int code, std::string message)
      : std::runtime_error(call + " failed: " + message + " (" + library + " code " + std::to_string(code) + ")"),
        call_(std::move(call)),
        code_(code),
        detail_(std::move(message)) {}
  const std::string& call() const { return call_; }
  int code() const { return code_; }
  const std::string& detail() const { return detail_; }

 private:
  std::string call_;
  int code_;
  std::string detail_;
};

}  // namespace wattscope
