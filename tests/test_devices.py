"""Device selection: CUDA indices under CUDA_VISIBLE_DEVICES, UUIDs, bus ids, 'all'."""

from __future__ import annotations

import pytest
from conftest import _ignore_torch_devices

import wattscope
from wattscope import PowerMeter, _session
from wattscope.devices import resolve
from wattscope.testing import FakeNvml


@pytest.fixture
def fake4(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    _ignore_torch_devices(monkeypatch)
    fake = FakeNvml.install(4)
    yield fake
    _session.reset()
    fake.reset(1)


def _nvml():
    return _session.current().nvml()


def uuid(i: int) -> str:
    return f"GPU-fa4e0000-0000-0000-0000-0000000000{i:02x}"


def test_default_is_every_visible_gpu(fake4):
    assert [g.nvml_index for g in resolve(_nvml(), None)] == [0, 1, 2, 3]


def test_cuda_visible_devices_maps_cuda_index_to_the_right_gpu(fake4, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert [g.nvml_index for g in resolve(_nvml(), None)] == [2, 0]
    assert resolve(_nvml(), 0)[0].uuid == uuid(2)
    assert resolve(_nvml(), "cuda:1")[0].uuid == uuid(0)
    # "all" is every GPU of the machine, visible or not; invisible ones have no CUDA index.
    gpus = resolve(_nvml(), "all")
    assert [g.cuda_index for g in gpus] == [1, None, 0, None]


def test_cuda_visible_devices_by_uuid_and_invalid_entries(fake4, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{uuid(3)},7,1")
    # CUDA stops at the first invalid entry (7): only the UUID one is visible.
    assert [g.nvml_index for g in resolve(_nvml(), None)] == [3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(wattscope.DeviceNotFoundError, match="devices='all'"):
        resolve(_nvml(), None)


def test_select_by_uuid_prefix_and_bus_id(fake4):
    assert resolve(_nvml(), uuid(1))[0].nvml_index == 1
    assert resolve(_nvml(), "fa4e0000-0000-0000-0000-000000000002")[0].nvml_index == 2
    assert resolve(_nvml(), "0000:13:00.0")[0].nvml_index == 3
    assert [g.nvml_index for g in resolve(_nvml(), [3, 1, 3])] == [3, 1]
    with pytest.raises(wattscope.DeviceNotFoundError, match="matches several GPUs"):
        resolve(_nvml(), "GPU-fa4e")


@pytest.mark.parametrize("bad", [9, -1, "cuda:8", "nonsense", 1.5, True, []])
def test_bad_selectors_raise_value_error_listing_gpus(fake4, bad):
    with pytest.raises(ValueError, match="GPUs on this machine|empty device list"):
        PowerMeter(bad).start()


def test_list_gpus(fake4):
    gpus = wattscope.list_gpus()
    assert len(gpus) == 4
    assert gpus[0].name.startswith("Fake NVIDIA H100") and gpus[0].power_limit_w == 700.0
