#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "numpy_owned.hpp"
#include "wattscope/sampler.hpp"

namespace py = pybind11;

namespace wattscope::bindings {

namespace {

SamplerConfig config_from_kwargs(const py::kwargs& kw) {
  SamplerConfig c;
  for (const auto& item : kw) {
    const std::string key = py::str(item.first);
    const py::handle v = item.second;
    if (key == "drain_period_ns") c.drain_period_ns = v.cast<int64_t>();
    else if (key == "instant_period_ns") c.instant_period_ns = v.cast<int64_t>();
    else if (key == "average_period_ns") c.average_period_ns = v.cast<int64_t>();
    else if (key == "energy_period_ns") c.energy_period_ns = v.cast<int64_t>();
    else if (key == "telemetry_period_ns") c.telemetry_period_ns = v.cast<int64_t>();
    else if (key == "offset_period_ns") c.offset_period_ns = v.cast<int64_t>();
    else if (key == "linger_ns") c.linger_ns = v.cast<int64_t>();
    else if (key == "default_sample_period_ns") c.default_sample_period_ns = v.cast<int64_t>();
    else if (key == "overrun_factor") c.overrun_factor = v.cast<double>();
    else if (key == "capacity") c.capacity = v.cast<std::size_t>();
    else if (key == "poll_energy") c.poll_energy = v.cast<bool>();
    else if (key == "poll_instant") c.poll_instant = v.cast<bool>();
    else throw py::type_error("unknown sampler option: " + key);
  }
  for (int64_t p : {c.drain_period_ns, c.instant_period_ns, c.average_period_ns, c.energy_period_ns,
                    c.telemetry_period_ns, c.offset_period_ns}) {
    if (p <= 0) throw py::value_error("sampler periods must be positive");
  }
  return c;
}

py::dict snapshot_to_dict(DeviceSnapshot&& s) {
  py::dict out;
  for (int i = 0; i < kSeriesCount; ++i) {
    const char* name = series_name(static_cast<Series>(i));
    py::dict series;
    series["t_ns"] = to_numpy(std::move(s.series[i].t_ns));
    series["value"] = to_numpy(std::move(s.series[i].value));
    series["dropped"] = s.dropped[i];
    series["supported"] = (s.supported_mask & (1u << i)) != 0;
    out[name] = series;
  }
  out["overrun_from_ns"] = to_numpy(std::move(s.overrun_from_ns));
  out["overrun_to_ns"] = to_numpy(std::move(s.overrun_to_ns));
  out["overruns"] = s.overruns;
  out["samples_total"] = s.samples_total;
  out["sample_period_ns"] = s.sample_period_ns;
  out["lost"] = s.lost;
  return out;
}

}  // namespace

void register_sampler(py::module_& m) {
  py::class_<Sampler>(m, "Sampler")
      .def(py::init([](std::shared_ptr<NvmlLibrary> nvml, const py::kwargs& kw) {
             return std::make_unique<Sampler>(std::move(nvml), config_from_kwargs(kw));
           }),
           py::arg("nvml"))
      .def("add_device", &Sampler::add_device, py::arg("nvml_index"))
      .def("device_count", &Sampler::device_count)
      .def("acquire", &Sampler::acquire)
      .def("release", &Sampler::release)
      .def("stop", &Sampler::stop, py::call_guard<py::gil_scoped_release>())
      .def("request_drain", &Sampler::request_drain)
      .def("request_counter", &Sampler::request_counter,
           "Ask the thread for an energy-counter reading of every GPU now; returns at once (never calls NVML).")
      .def(
          "wait_covered",
          [](Sampler& s, int64_t t_ns, int64_t timeout_ns, const std::string& series) {
            // By name, so Python never repeats the native enum's numbering; "" = each device's best power source.
            int index = -1;
            for (int i = 0; i < kSeriesCount && !series.empty(); ++i)
              if (series == series_name(static_cast<Series>(i))) index = i;
            if (!series.empty() && index < 0) throw py::value_error("unknown series: " + series);
            py::gil_scoped_release nogil;
            return s.wait_covered(t_ns, timeout_ns, index);
          },
          py::arg("t_ns"), py::arg("timeout_ns"), py::arg("series") = "")
      .def(
          "snapshot",
          [](const Sampler& s, int slot, int64_t from_ns, int64_t to_ns) {
            DeviceSnapshot snap;
            {
              py::gil_scoped_release nogil;
              snap = s.snapshot(slot, from_ns, to_ns);
            }
            return snapshot_to_dict(std::move(snap));
          },
          py::arg("slot"), py::arg("from_ns"), py::arg("to_ns"))
      .def("failures",
           [](const Sampler& s) {
             py::list out;
             for (const auto& f : s.failures()) {
               py::dict d;
               d["call"] = f.call;
               d["code"] = f.code;
               d["message"] = f.message;
               d["slot"] = f.device_slot;
               d["t_ns"] = f.t_ns;
               out.append(d);
             }
             return out;
           })
      .def("stats", [](const Sampler& s) {
        const SamplerStats st = s.stats();
        py::dict d;
        d["running"] = st.running;
        d["ticks"] = st.ticks;
        d["missed_deadlines"] = st.missed_deadlines;
        d["drains"] = st.drains;
        d["threads_started"] = st.threads_started;
        d["thread_cpu_ns"] = st.thread_cpu_ns;
        d["chore_cpu_ns"] = st.chore_cpu_ns;
        d["thread_wall_ns"] = st.thread_wall_ns;
        d["realtime_offset_ns"] = st.realtime_offset_ns;
        d["realtime_offset_uncertainty_ns"] = st.realtime_offset_uncertainty_ns;
        d["clock_steps"] = st.clock_steps;
        d["overruns"] = st.overruns;
        d["failures_dropped"] = st.failures_dropped;
        return d;
      });
}

}  // namespace wattscope::bindings
