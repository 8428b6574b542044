"""Energy per user range: ``torch.cuda.nvtx.range`` (and ``range_push``/``range_pop``) and ``m.phase`` inside a
``PowerMeter(kernels=True, ranges=True)``.

Mechanism: markers and correlation, not synchronisation. Entering a range pushes a fresh id on CUPTI's per-thread
stack of external correlation ids (kind CUSTOM2; torch.profiler's Kineto uses CUSTOM0 and CUSTOM1). With the
tracer's ``ranges`` option CUPTI then writes an (API call, range id) pair for every CUDA call the thread makes, and a
kernel carries the correlation id of the call that launched it. So each kernel, memcpy and memset belongs to the
innermost range open on its launching thread when it was launched, wherever and whenever it ran on the GPU. Nothing
waits for the GPU. The alternative, synchronising the GPU at each range edge to measure the GPU time inside it, is
what ``m.phase`` does on its own; it drains the launch queue at every edge.

A range's energy is the energy attribution credits to its kernels (kernels.py: each record's share of its class),
summed over the range and every range nested in it. The GPU's idle gaps between those kernels are in the window's
``[idle]`` row, not in any range. The uncertainty of a range adds its share of each class's uncertainty linearly
within a class (one fitted power) and in quadrature across classes.

What is not seen:
- NVTX ranges pushed from C++, or through a ``range_push`` bound before the meter started (``from torch.cuda.nvtx
  import range_push``). Only the module attributes ``torch.cuda.nvtx.range_push``/``range_pop`` are wrapped, and
  ``torch.cuda.nvtx.range`` calls those.
- ``range_start``/``range_end`` (ranges that may cross threads).
- Kernels launched inside a range by another thread (a DataLoader worker, a CUDA graph replayed elsewhere). Those
  belong to whatever that thread has open.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

# Ranges a tracing run records; further ones are counted, not kept (a window of hours with ranges per batch would
# otherwise keep growing).
MAX_RANGES = 1 << 22
NO_RANGE = "[no range]"
RANGE_COLUMNS = ("range", "depth", "calls", "kernels", "time_s", "energy_j", "uncertainty_j", "mean_power_w", "share")


@dataclass(frozen=True)
class RangeInfo:
    """One entered range: its name and the id of the range it was entered in (-1: none)."""

    name: str
    parent: int


class RangeRecorder:
    """Ids and names of the ranges entered while a tracer with ranges records, and each thread's open ranges.

    Process-wide (kernel_session.KernelTracing owns one). ``push``/``pop`` run on the user's hot path: one CUPTI call
    each, no lock but the id counter's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_id = 0  # never reused: a stale id left on some thread's CUPTI stack can never name a new range
        self._ranges: dict[int, RangeInfo] = {}
        self._overflow = 0
        self._cupti: Any = None  # set while a tracer with ranges records
        self._local = threading.local()

    # -- the tracer's side ---------------------------------------------------------------------------------------

    def attach(self, cupti: Any) -> None:
        """A tracer with ranges started recording: ranges entered from now on are pushed to CUPTI. Ranges already
        open on the calling thread are recorded and pushed too (outermost first), so a meter opened inside a range
        sees it."""
        self._cupti = cupti
        parent = -1
        for entry in self._stack():
            if entry[0] < 0 or entry[0] not in self._ranges:  # entered while not recording, or in an earlier run
                entry[0] = self._register(entry[2], parent)
            if entry[1] is None and entry[0] >= 0:
                entry[1] = cupti if cupti.push_range(entry[0]) == 0 else None
            parent = entry[0]

    def detach(self) -> None:
        """The tracer stopped (or handed CUPTI to torch.profiler): pop what the calling thread pushed, so that no id
        of ours is on its CUPTI stack while another client reads the records. Other threads' open ranges stay pushed
        until they close."""
        self._cupti = None
        for entry in reversed(self._stack()):
            if entry[1] is not None:
                entry[1].pop_range()
                entry[1] = None

    def reset(self) -> None:
        """A tracing run ended: forget the ranges (ids keep counting)."""
        with self._lock:
            self._ranges = {}
            self._overflow = 0

    def recorded(self) -> tuple[dict[int, RangeInfo], int]:
        """Every range recorded in this run (a window's kernels name theirs by id; their parents may have begun
        before the window) and how many were not recorded (past MAX_RANGES)."""
        with self._lock:
            return dict(self._ranges), self._overflow

    # -- the user's side -----------------------------------------------------------------------------------------

    def push(self, name: str) -> None:
        stack = self._stack()
        cupti = self._cupti
        if cupti is None:
            stack.append([-1, None, name])  # not recording: keep the stack, and the name for a later attach
            return
        range_id = self._register(name, stack[-1][0] if stack else -1)
        pushed = cupti if range_id >= 0 and cupti.push_range(range_id) == 0 else None
        stack.append([range_id, pushed, name])

    def pop(self) -> None:
        stack = self._stack()
        if not stack:
            return  # a pop with no push through us (pushed before the wrappers were installed)
        _, pushed, _ = stack.pop()
        if pushed is not None:
            pushed.pop_range()

    def _register(self, name: str, parent: int) -> int:
        with self._lock:
            if len(self._ranges) >= MAX_RANGES:
                self._overflow += 1
                return -1
            range_id = self._next_id
            self._next_id += 1
            self._ranges[range_id] = RangeInfo(name, parent)
            return range_id

    def _stack(self) -> list[list[Any]]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @contextmanager
    def entered(self, name: str) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop()


# -- torch.cuda.nvtx ------------------------------------------------------------------------------------------------


_hooked: RangeRecorder | None = None  # the recorder the wrappers feed (the current session's)


def hook_torch_nvtx(recorder: RangeRecorder) -> bool:
    """Wrap ``torch.cuda.nvtx.range_push``/``range_pop`` (once per process) so that they also enter and leave a
    range of ``recorder`` (the latest one given: a new session brings a new recorder); the originals still run
    first (push) and last (pop), so Nsight sees the same NVTX ranges. Returns False when torch is not imported
    (nothing to wrap: ``m.phase`` ranges still work)."""
    global _hooked
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    _hooked = recorder
    nvtx = torch.cuda.nvtx
    if getattr(nvtx.range_push, "__wattscope__", False):
        return True
    original_push, original_pop = nvtx.range_push, nvtx.range_pop

    @functools.wraps(original_push)
    def range_push(msg: str) -> Any:
        depth = original_push(msg)
        if _hooked is not None:
            _hooked.push(str(msg))
        return depth

    @functools.wraps(original_pop)
    def range_pop() -> Any:
        if _hooked is not None:
            _hooked.pop()
        return original_pop()

    range_push.__wattscope__ = True  # type: ignore[attr-defined]
    nvtx.range_push, nvtx.range_pop = range_push, range_pop
    return True


# -- energy per range -----------------------------------------------------------------------------------------------


def range_ids(correlation_id: np.ndarray, pair_correlation: np.ndarray, pair_range: np.ndarray) -> np.ndarray:
    """Each record's range id from the tracer's (correlation id, range id) pairs; -1 where none matches. A
    correlation id appears once per API record (RUNTIME and DRIVER may both name the same launch): the last wins."""
    out = np.full(correlation_id.size, -1, dtype=np.int64)
    if pair_correlation.size == 0 or correlation_id.size == 0:
        return out
    order = np.argsort(pair_correlation, kind="stable")
    keys = pair_correlation[order]
    values = pair_range[order].astype(np.int64)
    # The last pair of each key: stable sort keeps arrival order, so take the rightmost match.
    pos = np.searchsorted(keys, correlation_id, side="right") - 1
    hit = (pos >= 0) & (keys[np.clip(pos, 0, None)] == correlation_id)
    out[hit] = values[pos[hit]]
    return out


def range_table(attribution: Any, ranges: dict[int, RangeInfo], *, overflow: int = 0) -> Any:
    """Energy per range path ("outer / inner") of one Attribution whose timeline carries ``range_id``, as a pandas
    DataFrame with columns ``RANGE_COLUMNS``; ``attrs["notes"]`` says what the reader should know.

    Rows: every range path with kernels in the window, inclusive of the ranges nested in it (``depth`` 0 for the
    outermost), then ``[no range]`` (kernels launched outside every range) and the attribution's own ``[idle]``,
    ``[unattributed]`` and ``[untraced]`` rows. The depth-0 rows and those that follow add up to the window's energy.
    ``calls`` counts the entries of the range that launched something in the window."""
    import pandas as pd

    from .kernels import IDLE, OTHER, UNATTRIBUTED, UNTRACED

    timeline = attribution.timeline
    ids = timeline.range_id if timeline.range_id is not None else np.full(len(timeline), -1, dtype=np.int64)
    energy = np.asarray(attribution.kernel_energy_j, dtype=np.float64)
    durations_s = (timeline.end_ns - timeline.start_ns) / 1e9
    traced = timeline.kind != "untraced"
    class_rows = {r.name: r for r in attribution.rows}
    # A record's class is its name's row, or [other] where the model merged its class with other small ones. Its
    # share of the class's uncertainty is the class's uncertainty times its share of the class's energy.
    names = [n if n in class_rows else OTHER for n in timeline.name.tolist()]
    class_energy: dict[str, float] = {}
    for name, e, t in zip(names, energy.tolist(), traced.tolist(), strict=True):
        if t:
            class_energy[name] = class_energy.get(name, 0.0) + e
    paths: dict[int, tuple[str, ...]] = {}

    def path(range_id: int) -> tuple[str, ...]:
        if range_id in paths:
            return paths[range_id]
        chain, seen, rid = [], set(), range_id
        while rid >= 0 and rid in ranges and rid not in seen:
            seen.add(rid)
            chain.append(ranges[rid].name)
            rid = ranges[rid].parent
        out = tuple(reversed(chain)) if chain else ("[unknown range]",)
        paths[range_id] = out
        return out

    acc: dict[tuple[str, ...], dict[str, Any]] = {}
    no_range = {"kernels": 0, "time_s": 0.0, "energy_j": 0.0, "unc": {}}
    for i in np.flatnonzero(traced):
        rid = int(ids[i])
        e = float(energy[i])
        row = class_rows.get(names[i])
        share = e / class_energy[names[i]] if row is not None and class_energy.get(names[i], 0.0) > 0 else 0.0
        u = share * (row.uncertainty_j if row is not None else 0.0)
        targets = []
        if rid < 0:
            targets.append(no_range)
        else:
            p = path(rid)
            for depth in range(len(p)):
                key = p[: depth + 1]
                targets.append(acc.setdefault(key, {"kernels": 0, "time_s": 0.0, "energy_j": 0.0, "unc": {},
                                                    "ids": set()}))
            # calls: entries of this range and of its parents that launched something here
            chain, r = [], rid
            while r >= 0 and r in ranges:
                chain.append(r)
                r = ranges[r].parent
            for depth, key_id in enumerate(reversed(chain)):
                acc[p[: depth + 1]]["ids"].add(key_id)
        for t in targets:
            t["kernels"] += 1
            t["time_s"] += float(durations_s[i])
            t["energy_j"] += e
            t["unc"][names[i]] = t["unc"].get(names[i], 0.0) + u

    total_j = attribution.energy_j

    def finish(label: str, depth: int, calls: int, a: dict[str, Any]) -> list[Any]:
        e, t = a["energy_j"], a["time_s"]
        unc = math.sqrt(sum(v * v for v in a["unc"].values()))
        return [label, depth, calls, a["kernels"], t, e, unc, e / t if t > 0 else math.nan,
                e / total_j if total_j > 0 else math.nan]

    rows = [finish(" / ".join(key), len(key) - 1, len(a["ids"]), a) for key, a in acc.items()]
    # Tree order: each path after its parent, siblings by decreasing energy.
    energy_of = {tuple(r[0].split(" / ")): r[5] for r in rows}
    rows.sort(key=lambda r: [(-energy_of[tuple(r[0].split(" / ")[: d + 1])], part)
                             for d, part in enumerate(r[0].split(" / "))])
    rows.append(finish(NO_RANGE, 0, 0, no_range))
    for special in (UNTRACED, IDLE, UNATTRIBUTED):
        r = class_rows.get(special)
        if r is not None:
            rows.append([special, 0, 0, 0, r.time_s, r.energy_j, r.uncertainty_j, r.mean_power_w, r.share])
    table = pd.DataFrame(rows, columns=list(RANGE_COLUMNS))
    notes = []
    if overflow:
        notes.append(f"{overflow} range entries past the first {MAX_RANGES} of this tracing run were not recorded: "
                     "their kernels count in the enclosing recorded range or [no range]")
    if timeline.range_id is None:
        notes.append("this window was not traced with ranges: every kernel is in [no range]")
    table.attrs.update(method=attribution.method, notes=tuple(notes))
    return table
