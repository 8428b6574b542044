#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>

#include "numpy_owned.hpp"
#include "wattscope/cupti_library.hpp"
#include "wattscope/kernel_tracer.hpp"
#include "wattscope/sampler.hpp"

namespace py = pybind11;

namespace wattscope::bindings {

namespace {

TracerConfig tracer_config_from_kwargs(const py::kwargs& kw) {
  TracerConfig c;
  for (const auto& item : kw) {
    const std::string key = py::str(item.first);
    const py::handle v = item.second;
    if (key == "buffer_bytes") c.buffer_bytes = v.cast<std::size_t>();
    else if (key == "buffer_count") c.buffer_count = v.cast<std::size_t>();
    else if (key == "capacity") c.capacity = v.cast<std::size_t>();
    else if (key == "memcpy") c.memcpy = v.cast<bool>();
    else if (key == "memset") c.memset = v.cast<bool>();
    else if (key == "ranges") c.ranges = v.cast<bool>();
    else if (key == "range_pair_capacity") c.range_pair_capacity = v.cast<std::size_t>();
    else throw py::type_error("unknown kernel tracer option: " + key);
  }
  return c;
}

// Default search folders: every sys.path entry, which holds the site-packages where the CUDA wheels put
// nvidia/*/lib/libcupti.so.*.
std::vector<std::string> sys_path() {
  std::vector<std::string> out;
  for (const py::handle entry : py::module_::import("sys").attr("path")) {
    if (py::isinstance<py::str>(entry)) out.push_back(entry.cast<std::string>());
  }
  return out;
}

py::dict snapshot_to_dict(TracerSnapshot&& s) {
  py::dict out;
  out["start_ns"] = to_numpy(std::move(s.start_ns));
  out["end_ns"] = to_numpy(std::move(s.end_ns));
  out["name_index"] = to_numpy(std::move(s.name_index));
  out["kind"] = to_numpy(std::move(s.kind));
  out["device_id"] = to_numpy(std::move(s.device_id));
  out["stream_id"] = to_numpy(std::move(s.stream_id));
  out["correlation_id"] = to_numpy(std::move(s.correlation_id));
  out["names"] = s.names;
  out["range_correlation_id"] = to_numpy(std::move(s.range_correlation_id));
  out["range_id"] = to_numpy(std::move(s.range_id));
  out["range_pairs_lost"] = s.range_pairs_lost;
  out["buffers_refused"] = s.buffers_refused;
  out["buffers_duplicate"] = s.buffers_duplicate;
  out["records_dropped"] = s.records_dropped;
  out["records_overflow"] = s.records_overflow;
  out["records_incomplete"] = s.records_incomplete;
  out["clock_segments"] = s.clock_segments;
  return out;
}

}  // namespace

void register_tracer(py::module_& m) {
  py::class_<CuptiLibrary, std::shared_ptr<CuptiLibrary>>(m, "Cupti")
      .def(py::init([](const std::string& path, std::optional<std::vector<std::string>> search_dirs) {
             return CuptiLibrary::open(path, search_dirs ? *search_dirs : sys_path());
           }),
           py::arg("path") = "", py::arg("search_dirs") = py::none(),
           "Load CUPTI: a copy already in the process, else path (or $WATTSCOPE_CUPTI_PATH), else a search of "
           "search_dirs (default sys.path) for nvidia/*/lib/libcupti.so*, $CUDA_HOME, the loader's path.")
      .def_property_readonly("path", &CuptiLibrary::path)
      .def_property_readonly("reused", &CuptiLibrary::reused)
      .def_property_readonly("version", &CuptiLibrary::version)
      .def_property_readonly("has_ranges", &CuptiLibrary::has_ranges)
      // Hot path of every user range: no GIL release (the calls take well under a microsecond), no exception.
      .def("push_range", &CuptiLibrary::push_range, py::arg("range_id"),
           "Push range_id on this thread's CUSTOM2 external-correlation stack; returns CUPTI's code (0: success).")
      .def("pop_range", &CuptiLibrary::pop_range,
           "Pop this thread's innermost range id; returns CUPTI's code (0: success).")
      .def("finalize", &CuptiLibrary::finalize, py::call_guard<py::gil_scoped_release>(),
           "cuptiFinalize, at the interpreter's exit only (kernel_session.detach_at_exit); returns CUPTI's code.");

  // Held by shared_ptr so that the sampler's flush chore can refer to a tracer weakly (set_tracer_flush).
  py::class_<KernelTracer, std::shared_ptr<KernelTracer>>(m, "KernelTracer")
      .def(py::init([](std::shared_ptr<CuptiLibrary> cupti, const py::kwargs& kw) {
             return std::make_shared<KernelTracer>(std::move(cupti), tracer_config_from_kwargs(kw));
           }),
           py::arg("cupti"))
      .def("start", &KernelTracer::start, py::call_guard<py::gil_scoped_release>())
      .def("stop", &KernelTracer::stop, py::call_guard<py::gil_scoped_release>())
      .def("flush", &KernelTracer::flush, py::arg("forced") = false, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("running", &KernelTracer::running)
      .def("snapshot",
           [](const KernelTracer& t) {
             TracerSnapshot snap;
             {
               py::gil_scoped_release nogil;
               snap = t.snapshot();
             }
             return snapshot_to_dict(std::move(snap));
           })
      .def("failures",
           [](const KernelTracer& t) {
             py::list out;
             for (const auto& f : t.failures()) {
               py::dict d;
               d["call"] = f.call;
               d["code"] = f.code;
               d["message"] = f.message;
               d["t_ns"] = f.t_ns;
               out.append(d);
             }
             return out;
           })
      .def("stats", [](const KernelTracer& t) {
        const TracerStats st = t.stats();
        py::dict d;
        d["running"] = st.running;
        d["flushes"] = st.flushes;
        d["buffers_completed"] = st.buffers_completed;
        d["buffers_refused"] = st.buffers_refused;
        d["buffers_outstanding"] = st.buffers_outstanding;
        d["buffers_duplicate"] = st.buffers_duplicate;
        d["records"] = st.records;
        d["clock_segments"] = st.clock_segments;
        d["ns_per_tick"] = st.ns_per_tick;
        d["parse_errors"] = st.parse_errors;
        d["failures_dropped"] = st.failures_dropped;
        return d;
      });

  m.def(
      "set_tracer_flush",
      [](Sampler& sampler, std::shared_ptr<KernelTracer> tracer, double period_s) {
        if (!tracer) {
          sampler.set_chore(nullptr, 0);
          return;
        }
        if (!std::isfinite(period_s) || period_s <= 0) throw py::value_error("period_s must be a positive number");
        // Weak: the sampler must not keep a stopped tracer (and its CUPTI state) alive; flush() on a stopped
        // tracer is a no-op, and a tracer destroyed meanwhile is skipped.
        std::weak_ptr<KernelTracer> weak = tracer;
        sampler.set_chore(
            [weak] {
              if (auto t = weak.lock()) t->try_flush();
            },
            static_cast<int64_t>(period_s * 1e9));
      },
      py::arg("sampler"), py::arg("tracer"), py::arg("period_s") = 0.25,
      "Have the sampler thread flush the tracer's CUPTI buffers every period_s (None: stop), so a long window never "
      "runs out of them.");
}

}  // namespace wattscope::bindings
