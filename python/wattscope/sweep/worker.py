"""One model per isolated worker process: whatever a model does to its process, the sweep goes on.

The parent (``run_job``) starts workers with multiprocessing's "forkserver" context: a server process imports
torch (and timm) once, and each worker is a fork of it, so a worker starts in a fraction of a second instead of the
seconds a fresh interpreter takes to import torch, while sharing nothing with the sweep's own process. CUDA is never
initialised in the server, so each worker initialises its own, seeing only its GPU (``CUDA_VISIBLE_DEVICES`` set to
the GPU's UUID first) and the sweep's environment as it was when the job started. The child builds the model once,
measures each configuration and sends each outcome over a pipe as soon as it has it; the parent is the only process
that writes results.

Failures become data. An exception in the child is classified there (``classify``): a ``torch.OutOfMemoryError``
anywhere in its chain is "oom", an error raised by torch.compile's machinery (dynamo, inductor, triton) is
"compile", anything else "error" with its message; the child then goes on with the next configuration. The parent
enforces a timeout per configuration (``timeout_s``; building the model gets the same again, plus a fixed
allowance for starting the interpreter and importing torch): when it passes, the child is killed and the
configuration is a "timeout". A child that dies without a word (segfault, SIGKILL from the kernel's OOM killer, a
driver fault) makes its current configuration a "crash". After a timeout or a crash a new worker takes the
configurations that are left; when the model could not even be built, every configuration fails the same way.

A worker dies with the fork server (Linux ``PR_SET_PDEATHSIG``), which exits when the sweep's process does, so a
sweep killed with SIGKILL leaves no worker measuring on behind it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from .measure import ConfigResult, MeasureSettings
from .store import Config

# Starting a worker (a fresh interpreter importing torch, and CUDA's initialisation) can take tens of seconds on a
# cold or network filesystem; that is not the model's fault and is allowed on top of the build's timeout.
STARTUP_ALLOWANCE_S = 60.0
_POLL_S = 0.1
_EXIT_GRACE_S = 10.0
_MESSAGE_CHARS = 4000
_COMPILE_MODULES = ("torch._dynamo", "torch._inductor", "triton")


@dataclass(frozen=True)
class WorkerJob:
    """One unit and the configurations to measure it in."""

    unit_key: str
    architecture: str
    configs: tuple[Config, ...]
    provider: str
    pretrained: bool
    settings: MeasureSettings
    visible_device: str | None  # CUDA_VISIBLE_DEVICES for the worker (the GPU's UUID); None leaves it as it is
    environ: tuple[tuple[str, str], ...] = ()  # the worker's environment; run_job fills in the sweep's


@dataclass(frozen=True)
class Failure:
    """A configuration that produced no result. ``kind``: "oom", "compile", "timeout", "crash" or "error"."""

    config: Config
    kind: str
    message: str
    wall_s: float


Outcome = ConfigResult | Failure


def classify(exc: BaseException) -> str:
    """The failure kind of an exception raised while building or measuring a model."""
    chain = _chain(exc)
    torch = sys.modules.get("torch")
    for e in chain:
        if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)):
            return "oom"
    for e in chain:
        if type(e).__module__.startswith(_COMPILE_MODULES):
            return "compile"
    return "error"


def describe(exc: BaseException) -> str:
    """A failure's message: the exception, and for unexpected errors where it came from."""
    text = f"{type(exc).__name__}: {exc}"
    if classify(exc) == "error":
        text += "\n" + "".join(traceback.format_tb(exc.__traceback__)[-4:])
    return text[:_MESSAGE_CHARS]


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def run_job(
    job: WorkerJob,
    *,
    timeout_s: float,
    on_begin: Callable[[Config], None] | None = None,
    on_power: Callable[[float], None] | None = None,
    stop: threading.Event | None = None,
) -> Iterator[Outcome]:
    """Measure ``job`` in worker processes, yielding each configuration's outcome as it arrives.

    ``on_begin(config)`` when a configuration starts, ``on_power(mean_power_w)`` after each of its trials. Setting
    ``stop`` kills the worker and ends the iteration; so does closing the generator.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    ctx = _context(job.provider)
    job = replace(job, environ=tuple(os.environ.items()))
    remaining = list(job.configs)
    while remaining:
        by_key = {c.key: c for c in remaining}
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child_main,
            args=(sender, replace(job, configs=tuple(remaining)), os.getpid()),
            name=f"wattscope-worker {job.unit_key}",
        )
        t_spawn = time.monotonic()
        proc.start()
        sender.close()
        deadline = t_spawn + timeout_s + STARTUP_ALLOWANCE_S
        load_s: float | None = None  # set once the model is built
        first = True
        current: Config | None = None
        t_begin = t_spawn
        ended: str | None = None  # "done", "timeout", "crash" or "stopped"
        try:
            while ended is None:
                if stop is not None and stop.is_set():
                    ended = "stopped"
                    break
                if receiver.poll(max(0.0, min(_POLL_S, deadline - time.monotonic()))):
                    try:
                        msg = receiver.recv()
                    except (EOFError, OSError):
                        ended = "crash"
                        break
                    tag = msg[0]
                    if tag == "ready":
                        load_s = time.monotonic() - t_spawn  # the worker's start and the model's build
                        deadline = time.monotonic() + timeout_s
                    elif tag == "build_failed":
                        wall_s = time.monotonic() - t_spawn
                        for config in remaining:
                            yield Failure(config, msg[1], msg[2], wall_s)
                        remaining = []
                        ended = "done"
                    elif tag == "begin":
                        current = by_key[msg[1]]
                        t_begin = time.monotonic()
                        deadline = t_begin + timeout_s
                        if on_begin is not None:
                            on_begin(current)
                    elif tag == "trial":
                        if on_power is not None:
                            on_power(float(msg[2]))
                    elif tag in ("result", "failure"):
                        extra_s = (load_s or 0.0) if first else 0.0
                        first = False
                        if tag == "result":
                            r: ConfigResult = msg[1]
                            outcome: Outcome = replace(r, warmup_s=r.warmup_s + extra_s, wall_s=r.wall_s + extra_s)
                        else:
                            outcome = Failure(by_key[msg[1]], msg[2], msg[3], time.monotonic() - t_begin + extra_s)
                        remaining.remove(outcome.config)
                        current = None
                        yield outcome
                    elif tag == "done":
                        ended = "done"
                elif not proc.is_alive() and not receiver.poll(0):
                    ended = "crash"
                if ended is None and time.monotonic() > deadline:
                    ended = "timeout"
        finally:
            if ended == "done":
                # Let it exit by itself (CUDA context teardown, atexit hooks), so the next worker starts on an
                # idle GPU with its memory freed.
                proc.join(_EXIT_GRACE_S)
            if proc.is_alive():
                proc.kill()
            proc.join(_EXIT_GRACE_S)
            receiver.close()
        if ended in ("crash", "timeout") and stop is not None and stop.is_set():
            # The sweep is stopping (Ctrl-C, or Slurm's SIGTERM, which reaches the workers too): the worker died
            # because of the stop, not because of the model. Nothing is recorded, so a rerun measures it again.
            ended = "stopped"
        if ended in ("done", "stopped"):
            if ended == "done" and remaining:
                # The worker said it was done with configurations unanswered: a bug, but never lose them silently.
                for config in remaining:
                    yield Failure(config, "error", "the worker ended without measuring this configuration", 0.0)
            return
        wall_s = time.monotonic() - (t_spawn if load_s is None else t_begin)
        failing = remaining if load_s is None else [current or remaining[0]]
        where = (
            "while starting the worker and building the model"
            if load_s is None
            else f"while measuring {failing[0].key}"
        )
        if ended == "timeout":
            message = f"no result within the timeout ({timeout_s:g} s) {where}; the worker was killed"
        else:
            message = f"the worker died ({_exit_status(proc.exitcode)}) {where} without an error message"
        for config in failing:
            yield Failure(config, ended, message, wall_s)
            remaining.remove(config)


def _exit_status(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _context(provider: str) -> Any:
    ctx = multiprocessing.get_context("forkserver")
    # Takes effect when the server starts (the sweep's first worker); a module that fails to import is skipped
    # there and imported by each worker instead, where its error becomes the failure's message.
    ctx.set_forkserver_preload(["torch", "wattscope.sweep.measure", *(["timm"] if provider == "timm" else [])])
    return ctx


def _die_with_sweep(sweep_pid: int) -> None:
    server_pid = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed when the fork server exits
        except (OSError, AttributeError):
            pass
    try:
        os.kill(sweep_pid, 0)
    except ProcessLookupError:  # the sweep died before the death signal was armed
        os._exit(1)
    if os.getppid() != server_pid:
        os._exit(1)


def _child_main(conn: Any, job: WorkerJob, sweep_pid: int) -> None:
    """The worker process: build, then measure each configuration, reporting as it goes."""
    _die_with_sweep(sweep_pid)
    # Ctrl-C and Slurm's SIGTERM reach every process of the job; stopping workers is the parent's job (it kills
    # them), so a worker dying of the signal is never mistaken for a crash of its model.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The fork server kept the environment it started with; CUDA and NVML read theirs when first used, below.
    os.environ.clear()
    os.environ.update(dict(job.environ))
    if job.visible_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = job.visible_device
    try:
        from .measure import measure_config, prepare_model, release
        from .providers import get_provider

        settings = job.settings
        provider = get_provider(job.provider)
        model: Any = None
        built_size: int | None = None
        for config in job.configs:
            if config.img_size != built_size:
                try:
                    model = None
                    model = prepare_model(
                        provider.build(job.architecture, config.img_size, pretrained=job.pretrained), settings
                    )
                except Exception as e:
                    conn.send(("build_failed", classify(e), describe(e)))
                    return
                if built_size is None:
                    conn.send(("ready",))
                built_size = config.img_size
            conn.send(("begin", config.key))

            def on_trial(index: int, power_w: float, key: str = config.key) -> None:
                conn.send(("trial", key, power_w))

            try:
                result = measure_config(model, config, settings, on_trial=on_trial)
            except Exception as e:
                failure = ("failure", config.key, classify(e), describe(e))
            else:
                conn.send(("result", result))
                continue
            release(config, settings)  # now that the traceback and its frames are gone
            conn.send(failure)
        conn.send(("done",))
    finally:
        conn.close()
