"""Energy inside the tools people already run: `wattscope run -- <command>` (runner.py, command.py, with kernel
tracing injected into Python children by child_tracing.py), sub-windows of a measurement (windows.py) and the
results file that `wattscope compare` reads (results_file.py). The pytest plugin is ``wattscope.pytest_plugin``."""
