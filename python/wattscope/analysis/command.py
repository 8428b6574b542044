"""`wattscope analyze` and `wattscope figures`: the analysis of a sweep database from the command line.

Imports nothing heavy at module level (pandas, scipy and matplotlib load when a command runs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import WattscopeError

_SLICE_HELP = (
    "The configuration analysed is one slice of the database (GPU, batch size, precision, layout, compile, graphs): "
    "by default the one with the most models (ties: the lower median energy); the options below fix parts of it."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    a = subparsers.add_parser(
        "analyze",
        help="accuracy-energy frontier and its fit, scores, method savings and factors of a sweep database",
        description="Print which form (double exponential, exponential, power law) fits the accuracy-energy "
        "frontier, the fit table, the best and worst scored models, the savings of each method and the factors "
        "behind energy. " + _SLICE_HELP,
    )
    _common(a)
    a.add_argument("--json", action="store_true", help="print everything as one JSON object")
    a.add_argument("--top", type=int, default=5, metavar="N", help="best and worst N scored models (default 5)")
    a.set_defaults(run=_analyze)

    f = subparsers.add_parser(
        "figures",
        help="write PNG figures (frontier with fits, energy vs GMACs, method savings) of a sweep database",
        description="Write frontier.png, energy_vs_gmacs.png and method_savings.png. " + _SLICE_HELP,
    )
    _common(f)
    f.add_argument("-o", "--out", default="figures", metavar="DIR", help="output folder (default ./figures)")
    f.set_defaults(run=_figures)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "db",
        nargs="?",
        metavar="DB",
        help="sweep database (default: the H100 sweep shipped with wattscope: the copy installed in the package, "
        "else data/h100/sweep.sqlite of the repository checkout)",
    )
    s = p.add_argument_group("slice")
    s.add_argument("--precision", choices=("fp32", "tf32", "bf16", "fp16"))
    s.add_argument("--batch-size", type=int, metavar="N")
    s.add_argument("--gpu", metavar="NAME", help="GPU name as stored, e.g. 'NVIDIA H100 80GB HBM3'")
    for flag in ("channels-last", "compile", "cuda-graphs"):
        s.add_argument(f"--{flag}", choices=("on", "off"))


def _where(args: argparse.Namespace) -> dict[str, object]:
    where: dict[str, object] = {}
    if args.precision:
        where["precision"] = args.precision
    if args.batch_size is not None:
        where["batch_size"] = args.batch_size
    if args.gpu:
        where["gpu_name"] = args.gpu
    for name in ("channels_last", "compile", "cuda_graphs"):
        value = getattr(args, name)
        if value is not None:
            where[name] = value == "on"
    return where


def _load(args: argparse.Namespace) -> tuple[Path, Any]:
    from .results import load_results, shipped_database

    path = Path(args.db) if args.db else shipped_database()
    return path, load_results(path)


def _fail(command: str, e: BaseException) -> int:
    print(f"wattscope {command}: error: {e}", file=sys.stderr)
    return 2


def _figures(args: argparse.Namespace) -> int:
    try:
        from .figures import write_figures
        from .results import describe_unusable, unusable_energy

        path, df = _load(args)
        with warnings.catch_warnings():
            _ignore_analysis_warnings()
            written = write_figures(df, args.out, **_where(args))
    except (WattscopeError, ModuleNotFoundError, ValueError, OSError) as e:
        return _fail("figures", e)
    note = describe_unusable(unusable_energy(df))
    if note:
        print(f"wattscope figures: note: {note}", file=sys.stderr)
    print(f"from {path}: wrote " + ", ".join(str(p) for p in written))
    return 0


def _ignore_analysis_warnings() -> None:
    """Inside ``warnings.catch_warnings()``: the analysis functions' ``AnalysisWarning``s would each name the same
    rows again; the commands name them once, for the whole database (``describe_unusable``)."""
    from .results import AnalysisWarning

    warnings.simplefilter("ignore", AnalysisWarning)


def _analyze(args: argparse.Namespace) -> int:
    try:
        report = _report(args)
    except (WattscopeError, ModuleNotFoundError, ValueError) as e:
        return _fail("analyze", e)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(_render(report))
    return 0


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from .factors import factors
    from .fit import _jsonable, fit_frontier
    from .methods import method_savings_by_family
    from .results import combine_boards, describe_unusable, select_slice, slice_label, unusable_energy, usable_energy
    from .score import SCORE_VERSION, score_formula, score_models

    path, df = _load(args)
    with warnings.catch_warnings():
        _ignore_analysis_warnings()
        rows = select_slice(df, **_where(args))
        rows = rows[rows["top1"].notna()]
        fit = fit_frontier(rows)
        # One score per model: a model measured on several boards is scored on their combined energy.
        models = combine_boards(usable_energy(rows, "score"))
        scores = (
            models[["unit_key", "family", "top1", "energy_per_image_j", "energy_per_image_ci95_j", "n_boards"]]
            .join(score_models(models, fit))
            .sort_values("ratio")
        )
        gpu = rows["gpu_name"].iloc[0]
        methods = method_savings_by_family(df[df["gpu_name"] == gpu])
        report_factors = factors(rows)
    excluded = unusable_energy(df)

    def records(frame: Any) -> list[dict[str, Any]]:
        return [{k: _jsonable(v) for k, v in r.items()} for r in frame.to_dict("records")]

    excluded_columns = [c for c in ("id", "unit_key", "config_key", "gpu_uuid", "energy_per_image_j", "reason")
                        if c in excluded.columns]
    return {
        "database": str(path),
        "slice": slice_label(rows.iloc[0]),
        "n_models": len(models),
        "n_results": len(rows),
        "n_boards": int(rows["gpu_uuid"].nunique()),
        "excluded": records(excluded[excluded_columns]),
        "excluded_note": describe_unusable(excluded) or None,
        "fit": fit.to_dict(),
        "score_version": SCORE_VERSION,
        "score_formula": score_formula(),
        "scores": records(scores.drop(columns=["score_version"])),
        "top": max(args.top, 0),
        "methods": records(methods[methods["family"] == "all"]),
        "methods_by_family": records(methods[methods["family"] != "all"]),
        "factors": {
            "regressions": records(report_factors.regressions),
            "multiple": records(report_factors.multiple),
            "multiple_r2": _jsonable(report_factors.multiple_r2),
            "multiple_n": report_factors.multiple_n,
            "energy_per_gmac_by_family": records(report_factors.energy_per_gmac_by_family),
        },
    }


def _render(r: dict[str, Any]) -> str:
    from .methods import energy_factor
    from .score import band_edges_text

    fit = r["fit"]
    boards = (
        f" ({r['n_results']} results from {r['n_boards']} boards of this GPU, combined per model)"
        if r["n_results"] != r["n_models"] or r["n_boards"] > 1
        else ""
    )
    out = [f"{r['database']}: {r['slice']}, {r['n_models']} models with a timm accuracy{boards}", ""]
    if r["excluded_note"]:
        out += [f"Note: {r['excluded_note']}", ""]
    out += [fit["verdict"], ""]
    out.append(
        f"Fit of ln(energy per image) against top-1 along the frontier ({len(fit['frontier'])} points; "
        "parameters with 95 % intervals; accuracy measured from 80 %):"
    )
    out.append(f"  {'form':<20}{'ΔAICc':>7}{'AIC':>8}{'BIC':>8}{'R²':>6}{'rmse ln':>8}  parameters")
    for f in sorted(fit["forms"], key=lambda f: math.inf if f["delta_aicc"] is None else f["delta_aicc"]):
        params = ", ".join(
            f"{k} {_g(v)} [{_g(f['params_ci95'][k][0], open_end='-inf')}, {_g(f['params_ci95'][k][1], open_end='inf')}]"
            for k, v in f["params"].items()
        )
        out.append(
            f"  {f['form']:<20}{_g(f['delta_aicc'], '.1f'):>7}{_g(f['aic'], '.1f'):>8}"
            f"{_g(f['bic'], '.1f'):>8}{_g(f['r2'], '.2f'):>6}{_g(f['rmse_log'], '.2f'):>8}  {params}"
        )
        if f["note"]:
            out.append(f"  {'':<20}note: {f['note']}")
    n = r["top"]
    scores = r["scores"]
    out += [
        "",
        f"Score v{r['score_version']}: energy / fitted frontier energy at the same accuracy ({band_edges_text()})",
    ]
    for title, part in ((f"best {n}", scores[:n]), (f"worst {n}", scores[-n:][::-1] if n else [])):
        out.append(f"  {title}:")
        for s in part:
            band = s["band"] if not s["straddles"] else f"{s['band_low']}-{s['band_high']}"
            out.append(
                f"    {band:<4}{_g(s['ratio'], '.2f'):>6}x  {s['unit_key']:<36} top-1 {s['top1']:.1f} %  "
                f"{s['energy_per_image_j'] * 1000:.1f} mJ/image"
                + (f" (mean of {s['n_boards']} boards)" if s["n_boards"] > 1 else "")
            )
    if r["methods"]:
        out += ["", "Energy saved by each method (geometric mean over models, 95 % interval):"]
        for m in r["methods"]:
            cross = m.get("n_cross_board") or 0
            if m["saving_frac"] >= 0:
                effect = (f"{100 * m['saving_frac']:6.1f} %  [{100 * m['ci95_low']:.1f}, "
                          f"{100 * m['ci95_high']:.1f}]")
            else:
                factor, low, high = energy_factor(m["saving_frac"], m["ci95_low"], m["ci95_high"])
                effect = f"costs {factor:.2f}x  [{low:.2f}, {high:.2f}]"
            out.append(
                f"  {m['method']:<14}{effect}  over {m['n_models']} models"
                + (f" ({cross} of them only from pairs across boards)" if cross else "")
            )
    fac = r["factors"]
    out += ["", "Factors (ln energy against ln factor, one at a time; slope = elasticity):"]
    for f in fac["regressions"]:
        if f["factor"] == "family":
            out.append(
                f"  family: R² {_g(f['r2'], '.2f')}" + (" (no family has two models)" if f["r2"] is None else "")
            )
        else:
            lo, hi = f["slope_ci95"]
            out.append(
                f"  {f['factor']:<12} slope {_g(f['slope'], '.2f')} [{_g(lo, '.2f')}, {_g(hi, '.2f')}]  "
                f"R² {_g(f['r2'], '.2f')}  n {f['n']}"
            )
    if fac["multiple"]:
        out.append(
            f"  together (R² {_g(fac['multiple_r2'], '.2f')}, n {fac['multiple_n']}): "
            + ", ".join(
                f"{m['factor']} {_g(m['slope'], '.2f')} (partial R² {_g(m['partial_r2'], '.2f')})"
                for m in fac["multiple"]
            )
        )
    return "\n".join(out)


def _g(v: Any, spec: str = ".3g", open_end: str = "n/a") -> str:
    """A number for the table; None (JSON's stand-in for inf and NaN) prints as ``open_end``."""
    if v is None:
        return open_end
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)
