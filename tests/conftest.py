from __future__ import annotations

import os

import pytest


def _has_real_gpu() -> bool:
    if os.environ.get("WATTSCOPE_NVML_PATH"):
        return False
    try:
        from wattscope import _core

        return _core.Nvml("").device_count() > 0
    except Exception:
        return False


HAS_GPU = _has_real_gpu()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and driver")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    """The fake NVML with one device, behind wattscope's real dlopen path, and a fresh session."""
    from wattscope import _session
    from wattscope.testing import FakeNvml

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _ignore_torch_devices(monkeypatch)
    fake = FakeNvml.install(1, linger_ns=500_000_000, energy_period_ns=100_000_000)
    yield fake
    _session.reset()
    fake.reset(1)


def _ignore_torch_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU host torch may have initialised CUDA in an earlier test: its real UUIDs must not decide the CUDA
    # order of the fake GPUs.
    from wattscope import devices

    monkeypatch.setattr(devices, "_torch_uuids", lambda: None)


@pytest.fixture
def cupti(fake, monkeypatch: pytest.MonkeyPatch):
    """The bundled fake CUPTI, which the product loads through WATTSCOPE_CUPTI_PATH (with the fake NVML)."""
    from wattscope import _session

    lib = open_fake_cupti()
    monkeypatch.setenv("WATTSCOPE_CUPTI_PATH", str(lib.path))
    yield lib
    _session.reset()
    lib.fake_cupti_reset()


def open_fake_cupti():
    """The bundled fake CUPTI as a ctypes library with its control API typed, or a skip: when the build has no fake,
    or when a real libcupti is already in this process (a CUDA build of torch loads one), which wattscope would reuse
    instead of the fake."""
    import ctypes
    from pathlib import Path

    from wattscope import _core

    path = Path(_core.__file__).with_name("libwattscope_fake_cupti.so")
    if not path.exists():
        pytest.skip("wattscope was built without the fake CUPTI (WATTSCOPE_FAKE_CUPTI=OFF)")
    try:
        ctypes.CDLL("libcupti.so.13", mode=os.RTLD_NOLOAD)
    except OSError:
        pass
    else:
        pytest.skip("a real libcupti is already loaded in this process; wattscope reuses it, not the fake")
    lib = ctypes.CDLL(str(path))
    lib.fake_cupti_inject.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_char_p,
                                      ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    lib.fake_cupti_fail.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_int]
    lib.fake_cupti_set_clock.argtypes = [ctypes.c_double, ctypes.c_longlong]
    lib.fake_cupti_reset()
    lib.path = path
    return lib
