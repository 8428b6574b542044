"""The Pareto frontier of accuracy against energy: the models no other model beats on both."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .results import usable_energy


def pareto_frontier(df: pd.DataFrame, *, energy: str = "energy_per_image_j", accuracy: str = "top1") -> pd.DataFrame:
    """The rows not dominated by another row, sorted by energy (ascending).

    A row is dominated when another has lower-or-equal energy and higher-or-equal accuracy, better in at least one.
    Of rows tied on both, the first is kept. Rows without an accuracy (NaN: models timm has no result for) are left
    out silently; rows whose energy is not a positive finite number (a zero would dominate every model) are left out
    with an ``AnalysisWarning`` naming them. The index of ``df`` is kept, so the result can be joined back.

    Every row is a point: a model measured on two boards of one GPU model gives two points, of which at most the
    cheaper is on the frontier. Pass ``combine_boards(df)`` for one point per model (``fit_frontier`` does).
    """
    usable = usable_energy(df, "Pareto frontier", energy)
    usable = usable[np.isfinite(usable[accuracy].to_numpy(float))]
    # Lowest energy first and, at equal energy, the most accurate first: a row is then on the frontier exactly when
    # it is more accurate than every row before it.
    order = usable.sort_values([energy, accuracy], ascending=[True, False], kind="mergesort")
    best_so_far = np.maximum.accumulate(order[accuracy].to_numpy(float))
    previous_best = np.concatenate(([-np.inf], best_so_far[:-1]))
    return order[order[accuracy].to_numpy(float) > previous_best]
