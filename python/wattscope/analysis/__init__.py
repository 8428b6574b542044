"""Analysis of sweep results: the accuracy-energy frontier and its fit, the energy-efficiency score, the savings
of each method, the factors behind energy, figures, and a synthetic database with known answers.

results.py (loading, joining with the timm catalog, ResultsError; the rows left out for an unusable energy, with
an AnalysisWarning that names them; boards of one GPU model combined), frontier.py (Pareto frontier), fit.py (the
three forms of energy against accuracy, compared by AIC), score.py (the versioned A-G score), methods.py (savings
of bf16, channels_last, compile, ...), factors.py (regressions on GMACs, activations, parameters, input size),
figures.py (matplotlib PNGs), synthetic.py (a database with planted answers), command.py (`wattscope analyze`,
`wattscope figures`).

Needs pandas and scipy (``pip install 'wattscope[analysis]'``); names are imported on first use, so that
``wattscope --help`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ResultsError": "results",
    "AnalysisWarning": "results",
    "unusable_energy": "results",
    "usable_energy": "results",
    "has_usable_energy": "results",
    "describe_unusable": "results",
    "combine_boards": "results",
    "connect_read_only": "results",
    "load_results": "results",
    "shipped_database": "results",
    "slices": "results",
    "select_slice": "results",
    "slice_label": "results",
    "pareto_frontier": "frontier",
    "fit_frontier": "fit",
    "FrontierFit": "fit",
    "SCORE_VERSION": "score",
    "BAND_EDGES": "score",
    "BANDS": "score",
    "BAND_COLOURS": "score",
    "score_models": "score",
    "score_formula": "score",
    "band_of": "score",
    "method_savings": "methods",
    "method_savings_by_family": "methods",
    "factors": "factors",
    "FactorReport": "factors",
    "synthetic_database": "synthetic",
    "PLANTED": "synthetic",
    "write_figures": "figures",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as e:
        if e.name in ("pandas", "scipy"):
            raise ModuleNotFoundError(
                f"wattscope.analysis needs {e.name}: pip install 'wattscope[analysis]'", name=e.name
            ) from e
        raise
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
