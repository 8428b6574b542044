"""Kernel timeline and power readings as a Chrome / Perfetto trace (JSON trace event format).

Open the file in https://ui.perfetto.dev or chrome://tracing. One process per GPU (``pid`` = CUDA device ordinal)
holds a thread per CUDA stream (``tid`` = stream id) with an ``"X"`` complete event per kernel, memcpy or memset,
and a ``"power_w"`` counter track (``"C"`` events) with the GPU's readings. With user ranges, each kernel event
carries its ``range`` path, and each range entry becomes a slice on a "ranges, depth d" track of its GPU: from the
start of its first kernel to the end of its last (GPU time, nested ranges included; its gaps are idle). Entries whose
spans overlap (kernels on several streams) go to extra lanes of that depth. Times are
µs relative to the earliest event (``ts`` 0), as the format wants; the absolute CLOCK_MONOTONIC origin is kept in
``otherData.origin_ns``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .kernels import Attribution, KernelTimeline

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["save_trace"]

_NS_PER_US = 1e3
_RANGE_TID = 1 << 30  # range tracks sit far above the stream ids CUPTI hands out


def _range_tid(depth: int, lane: int) -> int:
    return _RANGE_TID + (depth << 12) + lane


def _num(value: float) -> str:
    """A JSON number; NaN and infinities (not JSON) become null."""
    return repr(float(value)) if math.isfinite(value) else "null"


def _gpu_pid(label: object) -> int | None:
    """The CUDA ordinal a power-series label names: ``0``, ``"0"``, ``"gpu0"``, ``"cuda:0"``; None otherwise."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    if isinstance(label, str):
        found = re.fullmatch(r"(?:gpu|cuda:?)?\s*(\d+)", label.strip(), flags=re.IGNORECASE)
        if found:
            return int(found.group(1))
    return None


def save_trace(
    path: str | Path,
    timeline: KernelTimeline,
    power_series: Mapping[object, tuple[np.ndarray, np.ndarray]],
    *,
    energy_table: Attribution | pd.DataFrame | None = None,
    ranges: Mapping[int, tuple[tuple[str, ...], tuple[int, ...]]] | None = None,
) -> Path:
    """Write ``timeline`` and the power readings as a Chrome/Perfetto JSON trace.

    Args:
        path: the ``.json`` file to write.
        timeline: kernel records (any number of devices).
        power_series: per GPU, ``(t_ns, power_w)`` readings (int ns on CLOCK_MONOTONIC, W). A label naming a CUDA
            ordinal (``0``, ``"gpu0"``, ``"cuda:0"``) puts the counter in that GPU's process; any other label gets a
            process of its own.
        energy_table: an :class:`~wattscope.kernels.Attribution` (each event's args get the energy credited to that
            call, ``energy_j``) or its ``table`` DataFrame (each event's args get its class's ``class_energy_j``,
            ``class_share`` and ``class_mean_power_w``, matched by name).
        ranges: for the ids in ``timeline.range_id``, the (names, ids) chain from the outermost range down
            (``ranges.range_chain``).

    Returns:
        The path written.

    Raises:
        ValueError: a power series with mismatched lengths, or an Attribution whose timeline is not ``timeline``
            (pass ``attribution.timeline``, the clipped one).
    """
    if not isinstance(timeline, KernelTimeline):
        raise ValueError(f"timeline must be a KernelTimeline, got {type(timeline).__name__}")
    series: list[tuple[object, np.ndarray, np.ndarray]] = []
    for label, value in power_series.items():
        try:
            t_ns, power_w = value
        except (TypeError, ValueError):
            raise ValueError(f"power_series[{label!r}] must be a (t_ns, power_w) pair") from None
        t = np.asarray(t_ns)
        p = np.asarray(power_w, dtype=np.float64)
        if t.ndim != 1 or t.shape != p.shape:
            raise ValueError(f"power_series[{label!r}]: t_ns and power_w must be 1-D of one length, got shapes "
                             f"{t.shape} and {p.shape}")
        if t.size and t.dtype.kind not in "iu":
            raise ValueError(f"power_series[{label!r}]: t_ns must be integer ns, got dtype {t.dtype}")
        series.append((label, t.astype(np.int64), p))
    per_call_j: np.ndarray | None = None
    by_name: dict[str, dict[str, float]] = {}
    if isinstance(energy_table, Attribution):
        if energy_table.timeline is not timeline and len(energy_table.timeline) != len(timeline):
            raise ValueError("energy_table was computed on another timeline: pass attribution.timeline to save_trace")
        per_call_j = energy_table.kernel_energy_j
    elif energy_table is not None:
        for row in energy_table.itertuples(index=False):
            by_name[str(row.name)] = {"class_energy_j": float(row.energy_j), "class_share": float(row.share),
                                      "class_mean_power_w": float(row.mean_power_w)}

    firsts = [int(timeline.start_ns.min())] if len(timeline) else []
    firsts += [int(t[0]) for _, t, _ in series if t.size]
    origin_ns = min(firsts, default=0)

    pids: dict[int, str] = {int(d): f"GPU {int(d)}" for d in np.unique(timeline.device)}
    counter_pid: list[int] = []
    for label, _, _ in series:
        pid = _gpu_pid(label)
        if pid is None:
            pid = max([*pids, 999]) + 1  # a process of its own, above any device ordinal
            pids[pid] = f"power {label}"
        else:
            pids.setdefault(pid, f"GPU {pid}")
        counter_pid.append(pid)

    meta: list[dict[str, Any]] = []
    for pid, name in sorted(pids.items()):
        meta.append({"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "tid": 0, "args": {"name": name}})
        meta.append({"name": "process_sort_index", "ph": "M", "ts": 0, "pid": pid, "tid": 0,
                     "args": {"sort_index": pid}})
    streams = {(int(d), int(s)) for d, s in zip(timeline.device.tolist(), timeline.stream.tolist(), strict=True)}
    for d, s in sorted(streams):
        meta.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": d, "tid": s, "args": {"name": f"stream {s}"}})

    # Events are written as preformatted JSON text in time order: building 100k dicts and sorting them cost twice
    # as much. Names are escaped once per distinct name.
    escaped: dict[str, str] = {}

    def esc(text: str) -> str:
        out = escaped.get(text)
        if out is None:
            out = escaped[text] = json.dumps(text)
        return out

    names = timeline.name.tolist()
    kinds = timeline.kind.tolist()
    range_of = timeline.range_id.tolist() if ranges is not None and timeline.range_id is not None else None
    starts, ends = timeline.start_ns.tolist(), timeline.end_ns.tolist()
    # Each range entry's GPU span, per device: [first kernel start, last kernel end] over it and its nested ranges.
    spans: dict[tuple[int, int], list[Any]] = {}  # (device, entry id) -> [start_ns, end_ns, name, depth, path]
    grid = timeline.grid.tolist() if timeline.grid is not None else None
    energies = per_call_j.tolist() if per_call_j is not None else None
    x_text: list[str] = []
    for i, (ts, dur, dev, stream) in enumerate(zip(
            ((timeline.start_ns - origin_ns) / _NS_PER_US).tolist(),
            ((timeline.end_ns - timeline.start_ns) / _NS_PER_US).tolist(),
            timeline.device.tolist(), timeline.stream.tolist(), strict=True)):
        args = f'"kind":{esc(kinds[i])}'
        if range_of is not None and ranges is not None and range_of[i] in ranges:
            chain_names, chain_ids = ranges[range_of[i]]
            args += f',"range":{esc(" / ".join(chain_names))}'
            for depth, entry in enumerate(chain_ids):
                span = spans.setdefault((dev, entry), [starts[i], ends[i], chain_names[depth], depth,
                                                       " / ".join(chain_names[: depth + 1])])
                span[0] = min(span[0], starts[i])
                span[1] = max(span[1], ends[i])
        if grid is not None:
            args += f',"grid":{esc(grid[i])}'
        if energies is not None:
            args += f',"energy_j":{_num(energies[i])}'
        elif by_name:
            # A table grouped by name+grid names its rows "name <<<grid>>>"; one grouped by name, the bare name.
            row = by_name.get(f"{names[i]} <<<{grid[i]}>>>") if grid is not None else None
            row = row or by_name.get(names[i])
            if row:
                args += "".join(f',"{k}":{_num(v)}' for k, v in row.items())
        x_text.append(f'{{"name":{esc(names[i])},"cat":{esc(kinds[i])},"ph":"X","ts":{ts!r},"dur":{dur!r},'
                      f'"pid":{dev},"tid":{stream},"args":{{{args}}}}}')
    c_text: list[str] = []
    c_ts: list[np.ndarray] = []
    for pid, (_, t, p) in zip(counter_pid, series, strict=True):
        ts_list = ((t - origin_ns) / _NS_PER_US).tolist()
        c_ts.append(np.asarray(ts_list))
        c_text += [f'{{"name":"power_w","ph":"C","ts":{ts!r},"pid":{pid},"tid":0,"args":{{"power_w":{_num(w)}}}}}'
                   for ts, w in zip(ts_list, p.tolist(), strict=True)]
    r_text: list[str] = []
    r_ts: list[float] = []
    # Slices of one track must nest, but sibling ranges' GPU spans overlap when their kernels do (several streams or
    # threads): each (GPU, depth) gets as many lanes as it needs, a span going to the first lane free at its start.
    lanes_end: dict[tuple[int, int], list[int]] = {}
    for a, b, name, depth, label, dev in sorted((v[0], v[1], v[2], v[3], v[4], k[0]) for k, v in spans.items()):
        ends = lanes_end.setdefault((dev, depth), [])
        lane = next((j for j, end in enumerate(ends) if end <= a), len(ends))
        if lane == len(ends):
            ends.append(b)
        else:
            ends[lane] = b
        ts, dur = (a - origin_ns) / _NS_PER_US, (b - a) / _NS_PER_US
        r_ts.append(ts)
        r_text.append(f'{{"name":{esc(name)},"cat":"range","ph":"X","ts":{ts!r},"dur":{dur!r},'
                      f'"pid":{dev},"tid":{_range_tid(depth, lane)},"args":{{"range":{esc(label)}}}}}')
    for (dev, depth), ends in sorted(lanes_end.items()):
        for lane in range(len(ends)):
            name = f"ranges, depth {depth}" + (f" ({lane + 1})" if lane else "")
            meta.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": dev, "tid": _range_tid(depth, lane),
                         "args": {"name": name}})
            meta.append({"name": "thread_sort_index", "ph": "M", "ts": 0, "pid": dev, "tid": _range_tid(depth, lane),
                         "args": {"sort_index": -1000 + 64 * depth + lane}})
    all_ts = np.concatenate([(timeline.start_ns - origin_ns) / _NS_PER_US, *c_ts, np.asarray(r_ts, dtype=np.float64)])
    text = x_text + c_text + r_text
    order = np.argsort(all_ts, kind="stable").tolist()

    out = Path(path)
    other = json.dumps({"origin_ns": origin_ns, "clock": "CLOCK_MONOTONIC", "dropped_records": timeline.dropped})
    with out.open("w") as f:
        f.write('{"displayTimeUnit":"ms","otherData":' + other + ',"traceEvents":[\n')
        f.write(",\n".join([*(json.dumps(e, separators=(",", ":")) for e in meta), *(text[i] for i in order)]))
        f.write("\n]}\n")
    return out
