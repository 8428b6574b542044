"""Kernel tracing inside the Python processes of `wattscope run --kernels`.

How: the parent puts ``embed/_inject`` first on ``PYTHONPATH`` and names a fresh directory in
``WATTSCOPE_RUN_KERNELS_DIR``. Every Python process started under the command (the command itself, and the workers
it launches: torchrun, multiprocessing spawn) imports the ``sitecustomize`` there at start-up, which starts
wattscope's CUPTI kernel tracer (``start_in_child``) and then imports the ``sitecustomize`` it shadows, if any. At
the process's exit an ``atexit`` hook synchronises CUDA (when torch initialised it), flushes the tracer and writes
the records, stamped on CLOCK_MONOTONIC like the parent's power readings, to ``<pid>.npz``. The parent
(``collect``) merges the files and attributes the kernels against its own measurement of the GPUs.

Limits: a non-Python command, ``python -I``/``-E``/``-S`` or an interpreter without wattscope trace nothing (energy
only; the run says so). A process that ends without running ``atexit`` (killed by a signal, ``os._exit`` as in forked
multiprocessing workers) leaves no records. The tracer starts before ``import torch``, so it loads libcupti itself
(site-packages' ``nvidia/*/lib`` first, the copy torch then shares); every Python process pays wattscope's import
and the tracer's start (~0.1-0.2 s). Records are matched to GPUs through CUDA UUIDs when the child's torch
initialised CUDA, else by CUDA ordinal (the same ``CUDA_VISIBLE_DEVICES`` as the parent is assumed).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_atomic

KERNELS_DIR_ENV = "WATTSCOPE_RUN_KERNELS_DIR"
INJECT_DIR = Path(__file__).with_name("_inject")


# -- in the child -------------------------------------------------------------------------------------------------

def start_in_child() -> None:
    """Start the kernel tracer in this process when ``WATTSCOPE_RUN_KERNELS_DIR`` asks for it. Never raises: the
    user's program must run even when tracing cannot; the failure goes to the directory for the parent to report."""
    out_dir = os.environ.get(KERNELS_DIR_ENV)
    if not out_dir:
        return
    pid = os.getpid()
    try:
        from .. import _session

        session = _session.current()
        start_ns = _session.core().mono_ns()
        tracer = session.kernel_tracing().acquire()
    except Exception as e:
        write_failure(out_dir, f"kernel tracing did not start: {e}")
        return
    # Registered after wattscope's own exit hook (imported above), so it runs first, while the tracer still runs.
    atexit.register(_finish_in_child, session, tracer, start_ns, out_dir, pid)


def write_failure(out_dir: str, error: str) -> None:
    """Record why this process traced nothing (plain JSON: the caller may not have numpy or wattscope)."""
    try:
        doc = {"pid": os.getpid(), "executable": sys.executable, "argv": sys.argv, "error": error}
        write_atomic(Path(out_dir) / f"{os.getpid()}.json", json.dumps(doc).encode())
    except OSError:
        pass  # the parent's directory is gone: nobody is left to tell


def _finish_in_child(session: Any, tracer: Any, start_ns: int, out_dir: str, pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child inherited the hook, not the tracer
    try:
        from .. import _session, devices, kernel_session

        uuids = devices._torch_uuids()
        torch = sys.modules.get("torch")
        if uuids is not None and torch is not None:
            # The kernels still queued at exit would otherwise miss the final flush.
            _synchronize_used_devices(torch, len(uuids))
        capture = kernel_session.close_tracer(session, tracer, start_ns, _session.core().mono_ns())
        t = capture.timeline
        assert t is not None
        meta = {"pid": pid, "executable": sys.executable, "argv": sys.argv, "uuids": uuids,
                "dropped": t.dropped, "failures": list(capture.failures)}
        buf = io.BytesIO()
        np.savez(buf, start_ns=t.start_ns, end_ns=t.end_ns, name=t.name.astype(str), stream=t.stream,
                 device=t.device, kind=t.kind.astype(str), meta=np.array(json.dumps(meta)))
        write_atomic(Path(out_dir) / f"{pid}.npz", buf.getvalue())
    except Exception as e:
        write_failure(out_dir, f"kernel records could not be saved at exit: {e}")


def _synchronize_used_devices(torch: Any, count: int) -> None:
    """Synchronise the devices this process already has a context on, each on its own. Touching any other would
    create a context there (on every GPU, in each process under torchrun), and raises where another process holds
    an EXCLUSIVE_PROCESS GPU."""
    try:
        if not torch.cuda.is_initialized():
            return  # no context anywhere: nothing was queued
        has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
        indices = [i for i in range(count) if has_context(i)] if has_context else [torch.cuda.current_device()]
    except Exception:
        return
    for i in indices:
        try:
            torch.cuda.synchronize(i)
        except Exception:
            continue  # that device's last kernels may miss the flush; the others' still make it


# -- in the parent ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChildKernels:
    """What the Python processes under a command recorded: ``capture`` (a kernel_session.KernelCapture whose
    timeline uses the parent's CUDA indices), or None with ``notes`` saying why; ``processes`` that traced."""

    capture: Any
    processes: int
    notes: tuple[str, ...]


class ChildTracing:
    """The parent's side: a directory for the children's records, the environment that makes them trace, and the
    merge. ``with ChildTracing() as tracing: Popen(cmd, env=tracing.environment(os.environ)); tracing.collect(...)``"""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="wattscope-kernels-"))

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        env[KERNELS_DIR_ENV] = str(self.directory)
        theirs = [base["PYTHONPATH"]] if base.get("PYTHONPATH") else []
        env["PYTHONPATH"] = os.pathsep.join([str(INJECT_DIR), *theirs])
        return env

    def collect(self, uuid_to_cuda_index: Mapping[str, int]) -> ChildKernels:
        """Merge every process's records; ``uuid_to_cuda_index`` maps the parent's GPUs ("gpu-..." lower case)."""
        from ..kernel_session import KernelCapture
        from ..kernels import KernelTimeline

        notes: list[str] = []
        parts: list[dict[str, np.ndarray]] = []
        dropped = 0
        failures: list[str] = []
        for path in sorted(self.directory.glob("*.json")):
            doc = json.loads(path.read_text())
            notes.append(f"pid {doc['pid']} ({' '.join(doc['argv'])[:80]}): {doc['error']}")
        for path in sorted(self.directory.glob("*.npz")):
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                part = {k: z[k] for k in ("start_ns", "end_ns", "name", "stream", "device", "kind")}
            part["device"] = self._parent_ordinals(part["device"], meta["uuids"], uuid_to_cuda_index, notes, meta)
            parts.append(part)
            dropped += int(meta["dropped"])
            failures += meta["failures"]
        if not parts:
            if not notes:
                notes.append("no Python process started under the command (a non-Python command, python -I, -E or "
                             "-S, or no wattscope for its interpreter): energy only, no kernels")
            return ChildKernels(None, 0, tuple(notes))
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(merged["start_ns"], kind="stable")
        timeline = KernelTimeline(merged["start_ns"][order], merged["end_ns"][order],
                                  merged["name"][order].astype(object), merged["stream"][order],
                                  merged["device"][order], merged["kind"][order].astype(object), None, dropped)
        return ChildKernels(KernelCapture(timeline, failures=tuple(failures)), len(parts), tuple(notes))

    @staticmethod
    def _parent_ordinals(device: np.ndarray, uuids: list[str] | None, uuid_to_cuda_index: Mapping[str, int],
                         notes: list[str], meta: dict) -> np.ndarray:
        if uuids is None:
            if len(device):
                notes.append(f"pid {meta['pid']}: CUDA devices matched by ordinal (its torch had not initialised "
                             "CUDA, so their UUIDs are unknown)")
            return device
        # -1 for a GPU the parent does not measure: its records match no measured GPU.
        table = np.array([uuid_to_cuda_index.get(u, -1) for u in uuids] + [-1], dtype=np.int64)
        return table[np.where((device >= 0) & (device < len(uuids)), device, len(uuids))]

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> ChildTracing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
