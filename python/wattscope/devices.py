"""Which GPUs a meter measures: CUDA indices, UUIDs or bus ids mapped onto NVML devices.

NVML numbers GPUs in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``; CUDA numbers the visible ones. The mapping:

1. When torch has initialised CUDA, torch's own device UUIDs decide (exact, whatever the ordering rules).
2. Otherwise ``CUDA_VISIBLE_DEVICES`` is parsed as CUDA does (integers index the PCI-ordered list, ``GPU-`` UUID
   prefixes match, parsing stops at the first invalid entry), and the visible GPUs are taken in PCI bus order. That
   is CUDA's order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or when every GPU is the same model; otherwise CUDA puts the
   fastest first, and wattscope warns, because it will not initialise CUDA itself to ask (that would break a later
   ``fork()`` in the user's program).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import DeviceNotFoundError

DeviceSelector = None | str | int | Sequence[int | str]


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it, with its CUDA index when it is visible to CUDA."""

    nvml_index: int
    cuda_index: int | None
    name: str
    uuid: str
    pci_bus_id: str
    power_limit_w: float | None


class _NvmlLike(Protocol):
    def device_count(self) -> int: ...
    def device_info(self, index: int) -> dict: ...


def all_gpus(nvml: _NvmlLike) -> list[GpuInfo]:
    """Every GPU NVML sees, with CUDA indices filled in for the visible ones."""
    infos = [nvml.device_info(i) for i in range(nvml.device_count())]
    order = _cuda_order(infos)
    cuda_of = {nvml_index: cuda for cuda, nvml_index in enumerate(order)}
    return [
        GpuInfo(
            nvml_index=d["nvml_index"],
            cuda_index=cuda_of.get(d["nvml_index"]),
            name=d["name"],
            uuid=d["uuid"],
            pci_bus_id=d["pci_bus_id"],
            power_limit_w=d["power_limit_mw"] / 1000.0 if d["power_limit_mw"] else None,
        )
        for d in infos
    ]


def resolve(nvml: _NvmlLike, devices: DeviceSelector) -> list[GpuInfo]:
    """Map a selector onto GPUs. ``None``: every GPU visible to CUDA; ``"all"``: every GPU of the machine;
    an int: a CUDA index; a string: ``cuda:N``, a UUID (or unique prefix) or a PCI bus id; or a sequence of these."""
    gpus = all_gpus(nvml)
    if devices is None:
        chosen = sorted((g for g in gpus if g.cuda_index is not None), key=lambda g: g.cuda_index or 0)
        if not chosen:
            raise DeviceNotFoundError(
                "No GPU is visible to CUDA (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); pass devices='all' to measure every GPU. "
                + _listing(gpus)
            )
        return chosen
    if isinstance(devices, str) and devices == "all":
        if not gpus:
            raise DeviceNotFoundError("NVML reports no GPU on this machine.")
        return gpus
    if isinstance(devices, (int, str)):
        selectors: Iterable[int | str] = [devices]
    elif isinstance(devices, (list, tuple)):
        selectors = devices
    else:
        raise DeviceNotFoundError(
            f"devices={devices!r}: expected None, 'all', a CUDA index, a UUID or bus id, or a list of these. "
            + _listing(gpus)
        )
    chosen = []
    for sel in selectors:
        gpu = _one(gpus, sel)
        if gpu not in chosen:
            chosen.append(gpu)
    if not chosen:
        raise DeviceNotFoundError("An empty device list was given. " + _listing(gpus))
    return chosen


def _one(gpus: list[GpuInfo], sel: int | str) -> GpuInfo:
    if isinstance(sel, bool) or not isinstance(sel, (int, str)):
        raise DeviceNotFoundError(f"Device selector {sel!r} is neither a CUDA index nor a string. " + _listing(gpus))
    if isinstance(sel, str) and sel.startswith("cuda:") and sel[5:].isdigit():
        sel = int(sel[5:])
    if isinstance(sel, int):
        for g in gpus:
            if g.cuda_index == sel:
                return g
        raise DeviceNotFoundError(f"There is no CUDA device {sel}. " + _listing(gpus))
    key = sel.strip()
    by_uuid = [g for g in gpus if g.uuid.lower().startswith(key.lower()) or g.uuid.lower() == "gpu-" + key.lower()]
    if len(by_uuid) == 1:
        return by_uuid[0]
    by_bus = [g for g in gpus if _same_bus(g.pci_bus_id, key)]
    if len(by_bus) == 1:
        return by_bus[0]
    what = "matches several GPUs" if len(by_uuid) > 1 else "names no GPU"
    raise DeviceNotFoundError(f"Device {sel!r} {what}. " + _listing(gpus))


def _same_bus(bus_id: str, key: str) -> bool:
    # NVML writes an 8-digit domain ("00000000:1A:00.0"); users often write 4 ("0000:1a:00.0") or none.
    def norm(s: str) -> str:
        parts = s.lower().split(":")
        return ":".join(parts[-2:]) if len(parts) >= 2 else s.lower()

    return bool(key) and norm(bus_id) == norm(key)


def _listing(gpus: list[GpuInfo]) -> str:
    if not gpus:
        return "NVML reports no GPU on this machine."
    rows = [
        f"  cuda:{g.cuda_index if g.cuda_index is not None else '-'}  nvml:{g.nvml_index}  {g.name}  {g.uuid}  "
        f"{g.pci_bus_id}"
        for g in gpus
    ]
    return "GPUs on this machine:\n" + "\n".join(rows)


def _cuda_order(infos: list[dict]) -> list[int]:
    """NVML indices of the CUDA-visible GPUs, in CUDA index order."""
    torch_uuids = _torch_uuids()
    if torch_uuids is not None:
        by_uuid = {d["uuid"].lower(): d["nvml_index"] for d in infos}
        return [by_uuid[u] for u in torch_uuids if u in by_uuid]
    pci_order = sorted(infos, key=lambda d: d["pci_bus_id"].lower())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        chosen = pci_order
    else:
        chosen = []
        for entry in (e.strip() for e in visible.split(",")):
            match = _visible_entry(pci_order, entry)
            if match is None:
                break  # CUDA ignores everything from the first invalid entry on
            if match not in chosen:
                chosen.append(match)
    names = {d["name"] for d in chosen}
    if len(names) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        warnings.warn(
            "GPUs of different models and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA may number them differently "
            "from the PCI order wattscope assumes. Set CUDA_DEVICE_ORDER=PCI_BUS_ID, initialise CUDA in torch "
            "before measuring, or select GPUs by UUID.",
            stacklevel=3,
        )
    return [d["nvml_index"] for d in chosen]


def _visible_entry(pci_order: list[dict], entry: str) -> dict | None:
    if entry.isdigit():
        i = int(entry)
        return pci_order[i] if i < len(pci_order) else None
    if entry.upper().startswith("GPU-"):
        hits = [d for d in pci_order if d["uuid"].lower().startswith(entry.lower())]
        return hits[0] if len(hits) == 1 else None
    return None  # MIG-... and anything else: wattscope measures whole GPUs only


def _torch_uuids() -> list[str] | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        props = torch.cuda.get_device_properties
        return ["gpu-" + str(props(i).uuid).lower() for i in range(torch.cuda.device_count())]
    except Exception:  # an old torch without .uuid, or CUDA broken: fall back to the environment
        return None
