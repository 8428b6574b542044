#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "wattscope/nvml_library.hpp"

namespace py = pybind11;

namespace wattscope::bindings {

void register_nvml(py::module_& m) {
  py::class_<NvmlLibrary, std::shared_ptr<NvmlLibrary>>(m, "Nvml")
      .def(py::init([](const std::string& path) { return NvmlLibrary::open(path); }), py::arg("path") = "",
           "Load NVML (path, or the loader's search path when empty) and initialise it.")
      .def_property_readonly("path", &NvmlLibrary::path)
      .def("driver_version", &NvmlLibrary::driver_version)
      .def("nvml_version", &NvmlLibrary::nvml_version)
      .def("device_count", &NvmlLibrary::device_count)
      .def("device_info", [](const NvmlLibrary& lib, unsigned int index) {
        const DeviceInfo d = lib.info(index);
        py::dict out;
        out["nvml_index"] = d.nvml_index;
        out["name"] = d.name;
        out["uuid"] = d.uuid;
        out["pci_bus_id"] = d.pci_bus_id;
        out["power_limit_mw"] = d.power_limit_mw;
        return out;
      });
}

}  // namespace wattscope::bindings
