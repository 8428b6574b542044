"""Hand CUPTI to torch.profiler while it runs, and take it back after.

CUPTI's activity state is process-global and has one client at a time (driver < r610): the buffer callbacks belong
to whoever registered last. Measured on H100 (bench/profiler_coexistence.py, torch 2.11): a torch.profiler session
opened inside a kernel meter's window got 0 of its 200 CUDA events, because the records went into a buffer of ours
that CUPTI then returned to Kineto ("bufferCompleted called with unknown buffer"), and a kernel meter opened inside a
profiler session took Kineto's buffers the same way. Nothing crashed; both sides silently lost everything.

So wattscope steps aside. torch.autograd.profiler drives Kineto through three module-level functions,
``_prepare_profiler`` (Kineto registers its callbacks and enables its kinds here, for warm-up), ``_enable_profiler``
and ``_disable_profiler``; both torch.autograd.profiler.profile and torch.profiler.profile call them by their module
global names. This module wraps them: before the first two it tells every listener to suspend (stop our tracer: its
forced flush returns our buffers while our callbacks are still registered, so Kineto starts clean), after the last it
tells them to resume (register again, enable again; the tracer's clock fit absorbs Kineto's timestamp switch). The
time in between is reported as untraced, never as idle.

Kineto on CUDA 12.6+ also tears CUPTI down after each session by default (cuptiFinalize, from a thread of its own,
at the next CUDA call): that races the tracer wattscope starts again right after, and Kineto's own notes report
crashes of CUPTI re-initialised after a teardown, which is why torch.compile turns the teardown off for CUDA graphs
(``TEARDOWN_CUPTI=0``). So the first kernel meter sets ``TEARDOWN_CUPTI=0`` as torch.compile does, unless the user
set it (a ``1`` is kept, with a warning). Kineto reads the variable when a session ends.

Without the teardown, Kineto's CUPTI callback subscriber outlives the session, and at exit that crashes: the CUDA
runtime releases its context from an atexit handler, after the C++ static destructors freed Kineto's callback
singleton, and CUPTI's context callback calls Kineto's switchboard, which frees the singleton a second time ("double
free or corruption", H100: native stack libcudart -> cuDevicePrimaryCtxRelease -> libcupti ->
libkineto::callback_switchboard -> CuptiCallbackApi's _M_dispose -> free; the GPU tests aborted at exit in 7 of 10
runs). ``kineto_left_attached()`` says when that can happen, and wattscope's exit hook, which Python runs before
both, then detaches CUPTI (cuptiFinalize, kernel_session.detach_at_exit): 4 of 4 runs exited cleanly after it
(bench/RESULTS.md, session 8).

If torch lacks these functions (another version), nothing is wrapped and ``profiler_active()`` falls back to
torch's own ``_is_profiler_enabled`` flag, which is set only after Kineto took CUPTI: a meter opened while a
profiler runs then stays out of CUPTI's way, but a profiler opened inside a kernel meter's window still loses its
records. A profiler started outside Python (Kineto's on-demand mode, dynolog) is not seen.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
import weakref
from typing import Any, Protocol

_HOOKED = ("_prepare_profiler", "_enable_profiler")
_RELEASED = "_disable_profiler"
_MARK = "__wattscope_guard__"
HOLDER = "torch.profiler"


class Listener(Protocol):
    def suspend(self, holder: str) -> None: ...

    def resume(self) -> None: ...


_lock = threading.Lock()
_listeners: weakref.WeakSet[Any] = weakref.WeakSet()
_active = False  # set between a wrapped prepare/enable and the wrapped disable
_left_attached = False  # a session ended with TEARDOWN_CUPTI=0: Kineto's CUPTI subscriber is still there


def watch(listener: Listener) -> None:
    """Call ``listener.suspend`` / ``resume`` around every torch.profiler session from now on (weakly held).
    Installs the wrappers if torch is imported; a later call installs them if torch was imported since. Keeps
    Kineto from tearing CUPTI down after its sessions (module docstring)."""
    with _lock:
        _listeners.add(listener)
    _keep_cupti_attached()
    _install()


TEARDOWN_ENV = "TEARDOWN_CUPTI"


def _keep_cupti_attached() -> None:
    value = os.environ.get(TEARDOWN_ENV)
    if value is None:
        os.environ[TEARDOWN_ENV] = "0"  # putenv too: Kineto reads it with getenv
    elif value == "1":
        global _warned_teardown
        if not _warned_teardown:
            _warned_teardown = True
            warnings.warn(f"{TEARDOWN_ENV}=1 makes torch.profiler finalize CUPTI after each session, racing "
                          "wattscope's kernel tracing, which starts again then; unset it (wattscope then sets 0) if "
                          "the process crashes after a profiler session", RuntimeWarning, stacklevel=4)


_warned_teardown = False


def kineto_left_attached() -> bool:
    """Whether a torch.profiler session ended here without Kineto tearing CUPTI down (its callback subscriber is
    still registered, which crashes the process at exit unless CUPTI is detached first)."""
    return _left_attached


def profiler_active() -> bool:
    """Whether a torch.profiler session holds CUPTI now (as far as this process's torch says)."""
    if _active:
        return True
    profiler = _torch_profiler_module()
    return bool(getattr(profiler, "_is_profiler_enabled", False)) if profiler is not None else False


def _torch_profiler_module() -> Any:
    if "torch" not in sys.modules:
        return None  # never import torch ourselves: a process that has not imported it runs no profiler
    return sys.modules.get("torch.autograd.profiler")


def _install() -> None:
    profiler = _torch_profiler_module()
    if profiler is None:
        return
    with _lock:
        for name in _HOOKED:
            fn = getattr(profiler, name, None)
            if fn is not None and not getattr(fn, _MARK, False):
                setattr(profiler, name, _wrap_take(fn))
        fn = getattr(profiler, _RELEASED, None)
        if fn is not None and not getattr(fn, _MARK, False):
            setattr(profiler, _RELEASED, _wrap_release(fn))


def _notify(method: str) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            getattr(listener, method)(*((HOLDER,) if method == "suspend" else ()))
        except Exception as e:  # wattscope must never break the user's profiler
            warnings.warn(f"wattscope could not {method} its kernel tracing around torch.profiler: {e}",
                          RuntimeWarning, stacklevel=3)


def _forget_in_child() -> None:
    # A forked child's profiler must not call into the parent's tracing (its sampler belongs to the parent).
    global _active, _listeners, _left_attached
    _active = False
    _left_attached = False
    _listeners = weakref.WeakSet()


os.register_at_fork(after_in_child=_forget_in_child)


def _wrap_take(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _active
        if not _active:
            _active = True
            _notify("suspend")
        return fn(*args, **kwargs)

    setattr(wrapper, _MARK, True)
    return wrapper


def _wrap_release(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _active, _left_attached
        try:
            return fn(*args, **kwargs)
        finally:
            _left_attached = _left_attached or os.environ.get(TEARDOWN_ENV) == "0"
            # Always: a profiler that began before the wrappers were installed was never marked active, yet a meter
            # that saw it (profiler_active's fallback) waits for this resume; resume is idempotent.
            _active = False
            _notify("resume")

    setattr(wrapper, _MARK, True)
    return wrapper
