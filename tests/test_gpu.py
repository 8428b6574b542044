"""On a real NVIDIA GPU (skipped elsewhere)."""

from __future__ import annotations

import time

import pytest

import wattscope
from wattscope import PowerMeter, _session

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def real_nvml(monkeypatch):
    monkeypatch.delenv("WATTSCOPE_NVML_PATH", raising=False)
    _session.reset()
    yield
    _session.reset()


def test_buffered_samples_are_the_source_and_arrive_at_the_sensor_rate():
    with PowerMeter(0) as m:
        time.sleep(2.0)
    g = m.result.gpus[0]
    assert g.source == "samples"
    assert 0.005 < g.sample_period_s < 0.2
    assert g.gaps == 0 and m.result.coverage > 0.99
    assert g.energy_j > 0 and g.counter_energy_j is not None


def test_load_draws_more_than_idle_and_counter_agrees():
    torch = pytest.importorskip("torch")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    with PowerMeter(0) as idle:
        time.sleep(1.0)
    with PowerMeter(0) as busy:
        t_end = time.monotonic() + 3.0
        while time.monotonic() < t_end:
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()
    assert busy.result.mean_power_w > idle.result.mean_power_w * 1.3
    b = busy.result.gpus[0]
    assert b.counter_energy_j == pytest.approx(b.energy_j, rel=0.03)


def test_cuda_index_maps_to_torch_uuid():
    torch = pytest.importorskip("torch")
    torch.cuda.init()
    gpu = wattscope.list_gpus()
    uuid0 = "gpu-" + str(torch.cuda.get_device_properties(0).uuid).lower()
    assert [g.uuid.lower() for g in gpu if g.cuda_index == 0] == [uuid0]


def test_cuda_visible_devices_maps_index_0_to_the_named_physical_gpu():
    # Run only where there are two GPUs (nvidia-h200-x2): a child told CUDA_VISIBLE_DEVICES=1 must meter physical
    # GPU 1 as its cuda:0, by UUID, and sample it.
    import os
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    uuid1 = "gpu-" + str(torch.cuda.get_device_properties(1).uuid).lower()
    child = (
        "import time, wattscope\n"
        "from wattscope import PowerMeter\n"
        "print([g.uuid.lower() for g in wattscope.list_gpus() if g.cuda_index == 0][0])\n"
        "with PowerMeter(0) as m: time.sleep(0.5)\n"
        "print(m.result.gpus[0].uuid.lower(), m.result.gpus[0].energy_j > 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "WATTSCOPE_NVML_PATH"} | {"CUDA_VISIBLE_DEVICES": "1"}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [uuid1, uuid1, "True"]


def _matmuls(torch, a, n: int) -> None:
    for _ in range(n):
        a @ a
    torch.cuda.synchronize()


@pytest.fixture
def warm_matrix():
    """torch and a 2048 x 2048 bf16 matrix on GPU 0, cuBLAS warmed up by 5 products (the first loads its kernels)."""
    torch = pytest.importorskip("torch")
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    _matmuls(torch, a, 5)
    return torch, a


def test_kernel_meter_traces_real_kernels_and_rows_add_up(warm_matrix):
    torch, a = warm_matrix
    with PowerMeter(0, kernels=True) as m:
        _matmuls(torch, a, 200)
    table = m.kernels
    timeline = m.kernel_attribution().timeline
    assert (timeline.kind == "kernel").sum() >= 200 and timeline.dropped == 0
    assert table["energy_j"].sum() == pytest.approx(m.result.energy_j, rel=1e-6)


def test_nvtx_ranges_get_exactly_the_kernels_launched_inside_them():
    # Real CUPTI: the (launch, range) pairs come from the runtime API (torch's elementwise kernels), cuBLAS and, when
    # torch.compile works here, Triton's driver-API launches. Counts are exact, so any lost or misfiled pair fails.
    torch = pytest.importorskip("torch")
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    try:
        fused = torch.compile(lambda t: (t * 2 + 1).relu())
        fused(a)
    except Exception as e:  # noqa: BLE001 - an environment without a working compiler: test the rest
        print(f"torch.compile unavailable ({type(e).__name__}: {e}); Triton launches not checked")
        fused = None
    _matmuls(torch, a, 5)
    with PowerMeter(0, kernels=True, ranges=True) as m:
        a.add_(0)  # outside every range
        with torch.cuda.nvtx.range("step"):
            with torch.cuda.nvtx.range("gemm"):
                for _ in range(100):
                    a @ a
            with torch.cuda.nvtx.range("copy"):
                for _ in range(50):
                    b.copy_(a)
            with m.phase("fused"):
                if fused is not None:
                    for _ in range(30):
                        fused(a)
        torch.cuda.synchronize()
    table = m.range_attribution(method="overlap").set_index("range")
    att = m.kernel_attribution(method="overlap")
    assert att.timeline.dropped == 0
    print(f"\nRANGES (Triton {'on' if fused is not None else 'off'}):\n{table.to_string()}")
    assert table.loc["step / gemm", "kernels"] >= 100  # cuBLAS may split a product into more than one kernel
    assert table.loc["step / gemm", "kernels"] % 100 == 0
    assert table.loc["step / copy", "kernels"] == 50
    if fused is not None:
        assert table.loc["step / fused", "kernels"] == 30
    step = table.loc["step", "kernels"]
    assert step == sum(table.loc[k, "kernels"] for k in table.index if k.startswith("step / "))
    assert table.loc["[no range]", "kernels"] == 1
    top = table[table["depth"] == 0]
    assert top["energy_j"].sum() == pytest.approx(att.energy_j, rel=1e-9)  # the attribution's window energy


def test_torch_profiler_inside_a_kernel_window_keeps_its_events_and_tracing_resumes(warm_matrix):
    torch, a = warm_matrix
    from torch.profiler import ProfilerActivity, profile

    with PowerMeter(0, kernels=True) as m:
        _matmuls(torch, a, 100)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _matmuls(torch, a, 100)
        _matmuls(torch, a, 100)
    gpu_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(gpu_events) >= 100  # the user's profiler saw its kernels
    att = m.kernel_attribution(method="overlap")
    n_kernels = int((att.timeline.kind == "kernel").sum())
    assert 200 <= n_kernels < 300  # before and after, not during
    assert "[untraced]" in set(att.table["name"])
    with PowerMeter(0, kernels=True) as after:
        _matmuls(torch, a, 50)
    assert int((after.kernel_attribution().timeline.kind == "kernel").sum()) >= 50
