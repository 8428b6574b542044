"""The README's usage example, run against the bundled fake NVML (no GPU needed): a 100/300/150 W periodic trace on
GPU 0 and 50 W constant on GPU 1, measured for 0.5 s, printed beside the traces' analytic integrals."""

from __future__ import annotations

import time

from wattscope import PowerMeter
from wattscope.testing import FakeNvml

fake = FakeNvml.install(2)
fake.set_trace(0, [0, 0.3, 0.6], [100, 300, 150], repeat_period_s=0.9)
fake.set_trace(1, [0], [50])
with PowerMeter("all") as m:
    time.sleep(0.5)
r = m.result
print(r)
print(f"analytic: {fake.energy_j(0, r.start_ns, r.stop_ns):.4f} J and {fake.energy_j(1, r.start_ns, r.stop_ns):.4f} J")
