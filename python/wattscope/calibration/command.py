"""`wattscope calibrate`: run the calibration on one GPU, print what was learned, save the sensor profile."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="measure how this GPU's power sensor responds to a known load (~1 min) and save a sensor profile",
        description="Drive a GPU-timed square-wave load, fit each power source's response (boxcar or first-order "
        "low-pass, with a delay) and save a sensor profile that PowerMeter uses from then on. Run it on an idle GPU.",
    )
    p.add_argument("--device", type=int, default=0, metavar="N", help="CUDA index of the GPU (default 0)")
    p.add_argument("--plot", metavar="PATH", help="also draw the step response and amplitude ratio into a PNG")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--fake", action="store_true", help="run against the bundled fake NVML with a simulated load")
    p.add_argument("--quick", action="store_true", help="a few seconds of load instead of ~45 s (coarse; smoke tests)")
    p.add_argument("--no-save", action="store_true", help="do not write the sensor profile")
    p.add_argument("--cache-dir", metavar="DIR", help="where to write the profile (default: wattscope's cache dir)")
    p.add_argument("--seed", type=int, help="seed of the random phases and period order")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..errors import WattscopeError
    from . import runner

    if args.device < 0:
        print("wattscope calibrate: --device must be a CUDA index >= 0", file=sys.stderr)
        return 2
    load = None
    try:
        if args.fake:
            from ..testing import FakeNvml
            from .load import FakeLoad

            fake = FakeNvml.install(args.device + 1)
            load = FakeLoad(fake, args.device, cuda_index=args.device)
        report = runner.calibrate(
            args.device, load=load, plan=runner.QUICK_PLAN if args.quick else runner.DEFAULT_PLAN,
            progress=lambda line: print(f"wattscope calibrate: {line}", file=sys.stderr, flush=True),
            seed=args.seed, save=not args.no_save, directory=Path(args.cache_dir) if args.cache_dir else None,
        )
        plot_path = None
        if args.plot:
            from .plot import plot_report

            plot_path = str(plot_report(report, args.plot))
    except WattscopeError as e:
        print(f"wattscope calibrate: {e}", file=sys.stderr)
        return 1
    finally:
        if load is not None:
            load.close()
    if args.json:
        data = report_to_dict(report)
        data["plot"] = plot_path
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        print(render(report))
        if plot_path:
            print(f"plot: {plot_path}")
    return 0


def report_to_dict(report: Any) -> dict[str, Any]:
    """The report as JSON-able data (non-finite floats as the strings "Infinity", "NaN", as in profiles)."""
    profile = json.loads(report.profile.to_json())
    return _finite({
        "profile": profile,
        "profile_path": report.profile_path,
        "skipped": report.skipped,
        "steps": {s: asdict(m) for s, m in report.steps.items()},
        "alternatives": {s: [asdict(m) for m in f.alternatives] for s, f in report.fits.items()},
        "counter_bias_rel_per_pass": list(report.counter_bias_rel or ()),
        "alignment_uncertainty_ns": report.alignment_uncertainty_ns,
        "load": report.load,
        "wall_s": report.wall_s,
    })


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def render(report: Any) -> str:
    """The report as text: one table row per source, then steps, amplitudes, counter bias and the profile."""
    from . import runner

    profile = report.profile
    lines = [
        f"{profile.gpu_name} ({profile.gpu_uuid}), driver {profile.driver_version}",
        f"load: {report.load}",
        f"host-GPU clock alignment within {report.alignment_uncertainty_ns / 1e3:.0f} µs; "
        f"{profile.calibration_s:.1f} s of load, {report.wall_s:.1f} s in all",
        "",
        f"{'source':<15}{'period':>9}  {'model':<8}{'shape ± 95 % CI':>22}{'delay ± 95 % CI':>22}"
        f"{'residual':>10}{'coverage':>10}  aliasing periods (ms)",
    ]
    for source, fit in report.fits.items():
        best = fit.best
        shape_name = "tau" if best.kind == "lowpass" else "width"
        lines.append(
            f"{source:<15}{fit.sample_period_ns / 1e6:>6.1f} ms  {best.kind:<8}"
            f"{shape_name:>6} {_ms(best.shape_ns)} ± {_ms(best.shape_ci_ns):<6}"
            f"{_ms(best.delay_ns):>13} ± {_ms(best.delay_ci_ns):<6}"
            f"{best.rel_residual:>9.1%}{fit.coverage:>10.0%}  {_ranges(fit.aliasing_periods_ms)}"
        )
    for source, why in report.skipped.items():
        lines.append(f"{source:<15}not calibrated: {why}")
    polled = [s for s in ("instant", "average") if s in report.fits]
    if polled:
        every_ms = runner.CALIBRATION_SAMPLER["instant_period_ns"] / 1e6
        lines.append(f"({' and '.join(polled)}: read every {every_ms:g} ms here, so the delay is the sensor's own "
                     f"plus {every_ms / 2:g} ms on average; the profile keeps the sensor's own, and measurements add "
                     "half of their own polling period)")
    lines.append("")
    for source, step in report.steps.items():
        lines.append(f"step, {source}: rise 10-90 % {step.rise_10_90_ns / 1e6:.1f} ms, first stamped change "
                     f"{step.first_change_delay_ns / 1e6:.1f} ms after the edge")
    for source, fit in report.fits.items():
        table = _amplitude_table(fit.amplitudes)
        if table:
            lines.append(f"amplitude ratio, {source} (period ms: measured / {fit.best.kind} model): {table}")
    if report.counter_bias_rel:
        per_pass = ", ".join(f"{b:+.2%}" for b in report.counter_bias_rel)
        lines.append(f"energy counter vs integrated samples: {profile.counter_bias_rel:+.2%} (per pass: {per_pass})")
    lines.append(f"best source for measurements: {profile.best_source}")
    lines.append(f"profile saved: {report.profile_path}" if report.profile_path else "profile not saved")
    return "\n".join(lines)


def _ms(ns: float) -> str:
    return "inf" if not math.isfinite(ns) else f"{ns / 1e6:.2f}"


def _amplitude_table(amplitudes: tuple[tuple[float, float, float], ...]) -> str:
    by_period: dict[float, list[tuple[float, float]]] = {}
    for period_ms, measured, model in amplitudes:
        by_period.setdefault(period_ms, []).append((measured, model))
    cells = []
    for period_ms in sorted(by_period):
        measured = sum(m for m, _ in by_period[period_ms]) / len(by_period[period_ms])
        cells.append(f"{period_ms:g}: {measured:.2f}/{by_period[period_ms][0][1]:.2f}")
    return ", ".join(cells)


def _ranges(periods_ms: tuple[float, ...], step_ms: float = 0.25, most: int = 12) -> str:
    """``(10, 20, 33.25, 33.5, 33.75)`` -> ``"10, 20, 33.25-33.75"``; past ``most`` groups, a count of the rest
    (the JSON output and the profile hold them all)."""
    if not periods_ms:
        return "none"
    groups: list[list[float]] = [[periods_ms[0]]]
    for p in periods_ms[1:]:
        if p - groups[-1][-1] <= step_ms + 1e-9:
            groups[-1].append(p)
        else:
            groups.append([p])
    text = ", ".join(f"{g[0]:g}" if len(g) == 1 else f"{g[0]:g}-{g[-1]:g}" for g in groups[:most])
    return text + (f", ... ({len(groups) - most} more)" if len(groups) > most else "")
