// wattscope._core: the private compiled module. The public API lives in python/wattscope and wraps these types by
// composition.
#include <pybind11/pybind11.h>

#include "wattscope/clock.hpp"
#include "wattscope/cupti_library.hpp"
#include "wattscope/nvml_error.hpp"

namespace py = pybind11;

namespace wattscope::bindings {
void register_nvml(py::module_& m);
void register_sampler(py::module_& m);
void register_tracer(py::module_& m);
}  // namespace wattscope::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "wattscope native core (private): NVML loader and the power sampler thread";

  // The one place native errors become Python ones: wattscope.errors chooses the typed exception and its advice.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const wattscope::NvmlError& e) {
      py::object make = py::module_::import("wattscope.errors").attr("nvml_error");
      py::object exc = make(e.call(), e.code(), e.detail());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    } catch (const wattscope::CuptiError& e) {
      // No CUPTI-specific class yet: a WattscopeError that keeps the call and the raw code.
      py::object exc = py::module_::import("wattscope.errors").attr("WattscopeError")(e.what());
      exc.attr("call") = e.call();
      exc.attr("code") = e.code();
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    }
  });

  m.def("mono_ns", &wattscope::mono_now_ns, "CLOCK_MONOTONIC in ns: the one clock of every wattscope timestamp.");
  wattscope::bindings::register_nvml(m);
  wattscope::bindings::register_sampler(m);
  wattscope::bindings::register_tracer(m);
}
