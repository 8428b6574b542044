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
- CUPTI's id stacks are per thread, and only a thread can change its own. When tracing stops, or torch.profiler takes
  CUPTI, a thread other than the one that did it keeps its open ranges' ids on its CUPTI stack until it next enters
  or leaves a range. Meanwhile Kineto logs each of its CUDA calls as an unknown external correlation. Such a thread's
  kernels in a later run show as ``[unknown range]`` until then, with a note.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

# Ranges a tracing run records; further ones are counted, not kept. A range costs ~140 B here (a tuple, a dict slot
# and an int key; its name is shared: 136 B per range by tracemalloc over 200k ranges of three names), so this is
# ~140 MB at most.
MAX_RANGES = 1 << 20
NO_RANGE = "[no range]"
UNKNOWN_RANGE = "[unknown range]"
RANGE_COLUMNS = ("range", "depth", "calls", "kernels", "time_s", "energy_j", "uncertainty_j", "mean_power_w", "share")
_OVERFLOWED = -2  # an entry past MAX_RANGES (or one we failed to record): not registered, not pushed

# Process-wide, whichever recorder (session) is current: ids and run numbers never repeat, so an id some thread left
# on its CUPTI stack can never name a later range, and each thread's open ranges survive a new session.
_ids = itertools.count()  # next() is atomic under the GIL
_runs = itertools.count()
# .stack: [[range id (or -1: not recorded yet), the Cupti it is pushed on or None, name, run it was recorded in]]
# .seen: (recorder, generation) the stack was last brought in line with
_threads = threading.local()


def _thread_stack() -> list[list[Any]]:
    stack = getattr(_threads, "stack", None)
    if stack is None:
        stack = _threads.stack = []
        _threads.seen = None
    return stack


class RangeRecorder:
    """Names and parents of the ranges entered while a tracer with ranges records, and the keeping of every thread's
    CUPTI stack in step with its open ranges.

    Process-wide (kernel_session.KernelTracing owns one). ``push``/``pop`` run on the user's hot path: one CUPTI call
    each. CUPTI's id stacks are per thread and only the thread itself can change its own, so a start, stop or
    torch.profiler hand-over (a new *generation*) is applied by each thread at its next push or pop; the thread that
    starts or stops tracing applies it at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ranges: dict[int, tuple[str, int]] = {}  # id -> (name, parent id or -1)
        self._names: dict[str, str] = {}  # one copy of each name: a range per batch repeats the same few
        self._overflow = 0
        self._run = next(_runs)  # a new one at every reset: entries recorded in another run are recorded again
        # (generation, the Cupti while a tracer with ranges records, else None): one tuple, replaced whole, so a
        # thread reads a state that was really set
        self._state: tuple[int, Any] = (0, None)

    # -- the tracer's side ---------------------------------------------------------------------------------------

    def attach(self, cupti: Any) -> None:
        """A tracer with ranges started recording: ranges entered from now on are pushed to CUPTI, and every thread's
        open ones too (this thread's now, the others' at their next push or pop), so a meter opened inside a range
        sees it."""
        self._state = (self._state[0] + 1, cupti)
        self._sync()

    def detach(self) -> None:
        """The tracer stopped or handed CUPTI to torch.profiler: every thread takes our ids off its CUPTI stack (this
        one now, the others at their next push or pop: until then their API calls still carry the id, which Kineto
        logs as an unknown external correlation)."""
        self._state = (self._state[0] + 1, None)
        self._sync()

    def reset(self) -> None:
        """A tracing run ended: forget the ranges (ids keep counting)."""
        with self._lock:
            self._ranges = {}
            self._names = {}
            self._overflow = 0
            self._run = next(_runs)

    def lookup(self, ids: Any) -> tuple[dict[int, tuple[str, int]], int]:
        """The (name, parent) of each of ``ids`` and of their ancestors, and how many entries were not recorded
        (past MAX_RANGES). Ids this run does not know are left out."""
        out: dict[int, tuple[str, int]] = {}
        with self._lock:
            for rid in {int(i) for i in ids if i >= 0}:
                while rid >= 0 and rid not in out and rid in self._ranges:
                    out[rid] = self._ranges[rid]
                    rid = self._ranges[rid][1]
            return out, self._overflow

    # -- the user's side -----------------------------------------------------------------------------------------

    def push(self, name: object) -> None:
        stack, cupti = self._sync()
        entry = [-1, None, str(name), self._run]
        stack.append(entry)  # first: a failure below must not leave the user's pop to take the enclosing range's
        if cupti is not None:
            self._push_entry(stack, len(stack) - 1, cupti)

    def pop(self) -> None:
        stack, _ = self._sync()
        if not stack:
            return  # a pop with no push through us (pushed before the wrappers were installed)
        pushed = stack.pop()[1]
        if pushed is not None:
            pushed.pop_range()

    @contextmanager
    def entered(self, name: object) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def _push_entry(self, stack: list[list[Any]], i: int, cupti: Any) -> None:
        """Push entry ``i`` on this thread's CUPTI stack, first recording it in this run when it is not yet (entered
        while not recording, or in another run; its parent: the nearest recorded entry below it)."""
        entry = stack[i]
        if entry[0] == -1 or entry[3] != self._run:
            parent = next((e[0] for e in reversed(stack[:i]) if e[0] >= 0), -1)
            with self._lock:
                entry[3] = self._run
                if len(self._ranges) >= MAX_RANGES:
                    self._overflow += 1
                    entry[0] = _OVERFLOWED
                else:
                    entry[0] = next(_ids)
                    self._ranges[entry[0]] = (self._names.setdefault(entry[2], entry[2]), parent)
        if entry[0] >= 0 and cupti.push_range(entry[0]) == 0:
            entry[1] = cupti

    def _sync(self) -> tuple[list[list[Any]], Any]:
        """This thread's stack and the Cupti to push on (None: not recording), the stack brought in line with the
        current state first: everything of ours off its CUPTI stack (innermost first), then, while recording, every
        open range pushed again (outermost first)."""
        stack = _thread_stack()
        generation, cupti = self._state  # read once: what is applied is what is marked seen
        if _threads.seen == (self, generation):
            return stack, cupti
        for entry in reversed(stack):
            if entry[1] is not None:
                entry[1].pop_range()
                entry[1] = None
        if cupti is not None:
            for i in range(len(stack)):
                self._push_entry(stack, i, cupti)
        _threads.seen = (self, generation)
        return stack, cupti


# -- torch.cuda.nvtx ------------------------------------------------------------------------------------------------

_hooked: RangeRecorder | None = None  # the recorder the wrappers feed (the current session's)


def _forget_in_child() -> None:
    # A forked child must not drive the parent's recorder (its lock may have been copied held); a meter of the
    # child's own session hooks its own, and its first push or pop takes the parent's ids off the child's stack.
    global _hooked
    _hooked = None


os.register_at_fork(after_in_child=_forget_in_child)


def _warn_failure(what: str, e: Exception) -> None:
    warnings.warn(f"wattscope could not record a range ({what}: {type(e).__name__}: {e}); the NVTX range itself is "
                  "unaffected", RuntimeWarning, stacklevel=3)


def hook_torch_nvtx(recorder: RangeRecorder) -> bool:
    """Wrap ``torch.cuda.nvtx.range_push``/``range_pop`` (once per process) so that they also enter and leave a
    range of ``recorder`` (the latest one given: a new session brings a new recorder); the originals still run
    first (push) and last (pop), return what they return, and see no exception of ours, so Nsight sees the same NVTX
    ranges. Returns False when torch is not imported (nothing to wrap: ``m.phase`` ranges still work)."""
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
            depth_before = len(_thread_stack())
            try:
                _hooked.push(msg)
            except Exception as e:  # noqa: BLE001 - the user's NVTX call must not fail because of us
                if len(_thread_stack()) == depth_before:  # keep the user's pop paired with this push
                    _thread_stack().append([_OVERFLOWED, None, str(msg), -1])
                _warn_failure("range_push", e)
        return depth

    @functools.wraps(original_pop)
    def range_pop() -> Any:
        if _hooked is not None:
            try:
                _hooked.pop()
            except Exception as e:  # noqa: BLE001
                _warn_failure("range_pop", e)
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


def range_chain(ranges: dict[int, tuple[str, int]], range_id: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(names, ids) of ``range_id`` and its ancestors, outermost first; ``([UNKNOWN_RANGE], [range_id])`` for an id
    this run never recorded (a range entered on another thread in an earlier run)."""
    names: list[str] = []
    ids: list[int] = []
    rid = range_id
    while rid >= 0 and rid in ranges and rid not in ids:
        ids.append(rid)
        names.append(ranges[rid][0])
        rid = ranges[rid][1]
    if not ids:
        return (UNKNOWN_RANGE,), (range_id,)
    return tuple(reversed(names)), tuple(reversed(ids))


def range_chains(ranges: dict[int, tuple[str, int]], ids: Any) -> dict[int, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``range_chain`` of each distinct id >= 0 in ``ids`` (a timeline's ``range_id``)."""
    return {int(r): range_chain(ranges, int(r)) for r in np.unique(np.asarray(ids, dtype=np.int64)) if r >= 0}


def range_table(attribution: Any, ranges: dict[int, tuple[str, int]], *, overflow: int = 0,
                pairs_lost: int = 0) -> Any:
    """Energy per range path ("outer / inner") of one Attribution whose timeline carries ``range_id``, as a pandas
    DataFrame with columns ``RANGE_COLUMNS``; ``attrs["notes"]`` says what the reader should know.

    ``ranges`` maps ids to (name, parent id); ``overflow`` counts entries not recorded (past MAX_RANGES),
    ``pairs_lost`` the tracer's (launch, range) pairs past its capacity.

    Rows: every range path with kernels in the window, inclusive of the ranges nested in it (``depth`` 0 for the
    outermost; ``kernels``, ``time_s`` and ``energy_j`` include the nested ranges', and ``calls`` counts the entries
    of the range that launched something in the window, themselves or through a nested range), in tree order with
    siblings by decreasing energy; then ``[no range]`` (kernels launched outside every range) and the attribution's
    own ``[untraced]``, ``[idle]`` and ``[unattributed]`` rows. The depth-0 rows and those that follow add up to the
    attribution's window energy."""
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

    chains = range_chains(ranges, ids)
    def fresh() -> dict[str, Any]:
        return {"kernels": 0, "time_s": 0.0, "energy_j": 0.0, "unc": {}, "ids": set()}

    acc: dict[tuple[str, ...], dict[str, Any]] = {}
    no_range = fresh()
    for i in np.flatnonzero(traced):
        rid = int(ids[i])
        e = float(energy[i])
        row = class_rows.get(names[i])
        total = class_energy.get(names[i], 0.0)
        u = (e / total) * row.uncertainty_j if row is not None and total > 0 else 0.0
        if rid < 0:
            targets = [no_range]
        else:
            path, path_ids = chains[rid]
            targets = []
            for depth in range(len(path)):
                t = acc.setdefault(path[: depth + 1], fresh())
                t["ids"].add(path_ids[depth])
                targets.append(t)
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

    # Tree order, on the paths themselves (a name may contain " / "): each path after its parent, siblings by
    # decreasing energy.
    order = sorted(acc, key=lambda path: [(-acc[path[: d + 1]]["energy_j"], part) for d, part in enumerate(path)])
    rows = [finish(" / ".join(path), len(path) - 1, len(acc[path]["ids"]), acc[path]) for path in order]
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
    if pairs_lost:
        notes.append(f"the tracer lost {pairs_lost} (launch, range) pairs past its capacity in this tracing run (not "
                     "necessarily inside this window): kernels whose pair was lost count as [no range]; a larger "
                     "capacity (KernelTracing.configure(range_pair_capacity=...)) keeps them")
    if any(path[0] == UNKNOWN_RANGE for path in acc):
        notes.append(f"{UNKNOWN_RANGE}: kernels launched inside a range that another thread entered before this "
                     "tracing run and has not left or re-entered since; their range is not known")
    if timeline.range_id is None:
        notes.append("this window was not traced with ranges: every kernel is in [no range]")
    table.attrs.update(method=attribution.method, notes=tuple(notes))
    return table
