"""The web app's data: one JSON-able dict built from ``wattscope.analysis``, the same for the server and the report.

Every number is a float, int or None (NaN becomes None), so the dict dumps as strict JSON. Keys:

- ``rows``: one per stored result (``id`` = position), with the columns of ``TABLE_COLUMNS`` plus ``slice`` (the key
  of its configuration slice), ``plotted`` (it has an accuracy and a positive energy), ``kernels`` (per-kernel
  energy from ``kernels_json``: a list of ``{name, energy_j, ...}``, largest first, or None), ``power`` (a power
  timeline ``{t_s, power_w}`` or None) and ``kernels_note`` (why stored kernel data could not be read, or None).
- ``slices``: one per configuration (GPU, batch size, precision, layout, compile, graphs), the first the reference
  (most models, then lowest median energy): ``key``, ``label``, ``n_models``, ``frontier`` (row ids along the Pareto
  frontier, by energy), ``fit`` (``FrontierFit.to_dict()`` plus ``curve``: ``{top1, energy_per_image_j}``) or None
  with ``fit_note`` saying why. A row's score compares it with its own slice's fitted frontier. A model measured on
  several boards is one point, as in the fit and `wattscope analyze`: the frontier holds its first row's id (with
  the boards' combined energy) and each of its rows carries the combined model's score.
- ``score``: ``version``, ``formula`` (text), ``bands``, ``band_edges``, ``band_colours`` (band -> CSS colour).
- ``savings``: ``by_unit`` (``"<gpu_name>|<unit_key>"`` -> the model's method savings), ``by_family`` (``methods``,
  ``families``: ``{gpu_name, family, values: {method: {saving_frac, ci95_low, ci95_high, n_models, helps, hurts}}}``,
  per GPU (by name) the family "all" first, then the others by name: GPUs are never pooled), ``note``.
- ``columns`` (the CSV's), ``source`` (the file and its ``meta``), ``format`` (``PAYLOAD_FORMAT``).
- ``excluded``: the rows every analysis left out because their energy is not a positive finite number: ``rows``
  (their ids) and ``note`` (a sentence naming them, or None); ``build_payload`` also warns it once
  (``AnalysisWarning``).

``kernels_json`` (written by kernel tracing; the sweep leaves it empty so far) is read in either of two shapes: a
list of kernel rows (``wattscope.kernels.COLUMNS``: ``name``, ``calls``, ``time_s``, ``energy_j``,
``mean_power_w``, ``share``, ``uncertainty_j``), or an object ``{"kernels": [...], "power": {"t_s": [...],
"power_w": [...]}}`` that also carries the power readings of a trial.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import urllib.parse
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

PAYLOAD_FORMAT = 1

# The columns of the downloaded table, in order (booleans are written 1/0, missing numbers as empty cells).
TABLE_COLUMNS = (
    "unit_key",
    "architecture",
    "family",
    "weight",
    "top1",
    "top5",
    "params_m",
    "gmacs",
    "activations_m",
    "img_size",
    "batch_size",
    "precision",
    "channels_last",
    "compile",
    "cuda_graphs",
    "config_key",
    "gpu_name",
    "energy_per_image_j",
    "energy_per_image_ci95_j",
    "energy_per_image_above_idle_j",
    "images_per_s",
    "mean_power_w",
    "idle_power_w",
    "baseline",
    "on_frontier",
    "frontier_energy_j",
    "ratio",
    "ratio_low",
    "ratio_high",
    "band",
    "band_low",
    "band_high",
    "straddles",
    "extrapolated",
    "score_version",
)
_SCORE_COLUMNS = ("frontier_energy_j", "ratio", "ratio_low", "ratio_high", "band", "band_low", "band_high",
                  "straddles", "extrapolated", "score_version")
_SAVING_FIELDS = ("method", "from_config", "to_config", "saving_frac", "ci95_low", "ci95_high", "beyond_ci")
_KERNEL_FIELDS = ("name", "calls", "time_s", "energy_j", "mean_power_w", "share", "uncertainty_j")
SAVINGS_NOTE = (
    "Saving of energy per image when a method is switched on, against the same model on the same GPU without it "
    "(fp32 for bf16/fp16/tf32; the most common batch size for batch_<n>): the geometric mean over models, with the "
    "number of models in brackets; bold where its 95 % interval excludes zero. Negative: the method costs energy."
)


def build_payload(db_path: str | Path) -> dict[str, Any]:
    """The app's data for a sweep database (see the module docstring). Raises ``wattscope.analysis.ResultsError``
    when the file cannot be read as a sweep database (missing, empty, another schema version, missing columns)."""
    from ..analysis import (
        BAND_COLOURS,
        BAND_EDGES,
        BANDS,
        SCORE_VERSION,
        AnalysisWarning,
        ResultsError,
        describe_unusable,
        load_results,
        method_savings,
        method_savings_by_family,
        score_formula,
        unusable_energy,
    )

    path = Path(db_path)
    df = load_results(path).reset_index(drop=True)
    excluded = unusable_energy(df)
    with warnings.catch_warnings():
        # Each analysis would name the same rows again, per slice: they are named once, under "excluded".
        warnings.simplefilter("ignore", AnalysisWarning)
        slices, scores, on_frontier = _slices(df)
        savings = _savings(method_savings(df), method_savings_by_family(df))
    excluded_note = describe_unusable(excluded)
    if excluded_note:
        warnings.warn(f"{path.name}: {excluded_note}", AnalysisWarning, stacklevel=2)
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        row = {c: _plain(rec.get(c)) for c in TABLE_COLUMNS if c not in _SCORE_COLUMNS and c != "on_frontier"}
        row.update({c: _plain(scores[i].get(c)) for c in _SCORE_COLUMNS})
        kernels, power, note = parse_kernels(rec.get("kernels_json"))
        energy = row["energy_per_image_j"]
        row.update(
            id=i,
            slice=_slice_key(rec),
            on_frontier=i in on_frontier,
            plotted=row["top1"] is not None and energy is not None and energy > 0,
            kernels=kernels,
            power=power,
            kernels_note=note,
        )
        rows.append(row)
    try:
        meta = _meta(path)
    except sqlite3.Error as e:  # load_results read the file a moment ago: it changed under us
        raise ResultsError(f"cannot read the meta table of {path}: {e}") from e
    return {
        "format": PAYLOAD_FORMAT,
        "source": {
            # The file's name only: a report is shared, and its reader has no business with the author's folders.
            "db": path.name,
            "gpus": sorted({r["gpu_name"] for r in rows if r["gpu_name"]}),
            "meta": meta,
            "generated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "score": {
            "version": SCORE_VERSION,
            "formula": score_formula(),
            "bands": list(BANDS),
            "band_edges": list(BAND_EDGES),
            "band_colours": dict(BAND_COLOURS),
        },
        "columns": list(TABLE_COLUMNS),
        "rows": rows,
        "slices": slices,
        "savings": savings,
        "excluded": {"rows": [int(i) for i in excluded.index], "note": excluded_note or None},
    }


def _slices(df: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[int]]:
    """Per configuration slice: its frontier, fit and the scores of its rows against that fit. A model measured on
    several boards is one point, as in ``fit_frontier`` and `wattscope analyze`: the frontier is the fit's (rows
    combined across boards, each under its first row's id) and every row of a model carries the combined model's
    score, so that the page, the fit and the command agree."""
    from ..analysis import (
        ResultsError,
        combine_boards,
        fit_frontier,
        pareto_frontier,
        score_models,
        slice_label,
        slices,
        usable_energy,
    )
    from ..analysis.results import BOARD_KEY, SLICE_COLUMNS

    scores: list[dict[str, Any]] = [{} for _ in range(len(df))]
    on_frontier: set[int] = set()
    out = []
    for spec in slices(df).to_dict("records"):
        mask = True
        for name in SLICE_COLUMNS:
            mask = mask & (df[name] == spec[name])
        part = df[mask]
        models = combine_boards(usable_energy(part, "score"))
        fit_dict = None
        note = None
        try:
            fit = fit_frontier(part)
        except ResultsError as e:
            note = f"no fit and no score for this configuration: {e}"
            frontier = [int(i) for i in pareto_frontier(models).index]
        else:
            frontier = [int(i) for i in fit.frontier.index]
            fit_dict = _plain(fit.to_dict())
            del fit_dict["frontier"]  # the slice's "frontier" (row ids) says the same
            curve = fit.curve(200)
            fit_dict["curve"] = {c: [_plain(v) for v in curve[c]] for c in ("top1", "energy_per_image_j")}
            # Rows without a usable energy keep score_models' empty score; the others their model's.
            for i, rec in zip(part.index, score_models(part, fit).to_dict("records"), strict=True):
                scores[int(i)] = rec
            by_model = {
                tuple(key): rec
                for key, rec in zip(models[list(BOARD_KEY)].itertuples(index=False),
                                    score_models(models, fit).to_dict("records"), strict=True)
            }
            for i, key in zip(part.index, part[list(BOARD_KEY)].itertuples(index=False), strict=True):
                if tuple(key) in by_model:
                    scores[int(i)] = by_model[tuple(key)]
        on_frontier.update(frontier)
        out.append(
            {
                "key": _slice_key(spec),
                "label": slice_label(spec),
                "n_rows": len(part),
                "n_models": int(spec["n_models"]),
                "frontier": frontier,
                "fit": fit_dict,
                "fit_note": note,
            }
        )
    return out, scores, on_frontier


def _slice_key(rec: Mapping[str, Any]) -> str:
    return (
        f"{rec['gpu_name']}|bs{int(rec['batch_size'])}|{rec['precision']}|cl{int(bool(rec['channels_last']))}"
        f"|comp{int(bool(rec['compile']))}|graph{int(bool(rec['cuda_graphs']))}"
    )


def _savings(pairs: Any, by_family: Any) -> dict[str, Any]:
    from ..analysis.methods import method_order

    by_unit: dict[str, list[dict[str, Any]]] = {}
    for rec in pairs.to_dict("records"):
        by_unit.setdefault(f"{rec['gpu_name']}|{rec['unit_key']}", []).append(
            {k: _plain(rec[k]) for k in _SAVING_FIELDS}
        )
    for savings in by_unit.values():
        savings.sort(key=lambda x: method_order(x["method"]))
    methods = sorted(set(by_family["method"]), key=method_order) if len(by_family) else []
    families: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in by_family.to_dict("records"):
        entry = {"gpu_name": rec["gpu_name"], "family": rec["family"], "values": {}}
        values = families.setdefault((rec["gpu_name"], rec["family"]), entry)["values"]
        values[rec["method"]] = {
            k: _plain(rec[k]) for k in ("saving_frac", "ci95_low", "ci95_high", "n_models", "helps", "hurts")
        }
    # Per GPU, "all" first: the summary above the families.
    ordered = sorted(families.values(), key=lambda f: (f["gpu_name"], f["family"] != "all", f["family"]))
    return {"by_unit": by_unit, "by_family": {"methods": methods, "families": ordered}, "note": SAVINGS_NOTE}


def _meta(path: Path) -> dict[str, str]:
    from ..analysis import connect_read_only

    conn = connect_read_only(path)
    try:
        return {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    finally:
        conn.close()


def _plain(v: Any) -> Any:
    """A JSON-able copy: numpy scalars to Python, NaN/inf to None, containers recursively."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, (str, bool, int)):
        return v
    raise TypeError(f"cannot put a {type(v).__name__} ({v!r}) into the web app's data")


def parse_kernels(text: str | None) -> tuple[list[dict[str, Any]] | None, dict[str, list[float]] | None, str | None]:
    """(kernels, power timeline, note) from a row's ``kernels_json`` (shapes in the module docstring). Nothing
    stored gives (None, None, None); data that cannot be read gives (None, None, why) so that the page can say so
    instead of failing."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or str(text).strip() == "":
        return None, None, None
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as e:
        return None, None, f"stored kernel data is not JSON ({e})"
    power = None
    if isinstance(data, dict):
        power_data = data.get("power")
        data = data.get("kernels", [])
        if power_data is not None:
            power = _timeline(power_data)
            if power is None:
                return None, None, "stored power timeline is unreadable (want {t_s: [...], power_w: [...]})"
    if not isinstance(data, list) or not all(isinstance(k, dict) and "name" in k and "energy_j" in k for k in data):
        return None, power, "stored kernel data is unreadable (want a list of {name, energy_j, ...})"
    kernels = [{f: _plain(k.get(f)) for f in _KERNEL_FIELDS if f in k} for k in data]
    kernels.sort(key=lambda k: -(k["energy_j"] if isinstance(k["energy_j"], (int, float)) else -math.inf))
    return kernels or None, power, None


def _timeline(data: Any) -> dict[str, list[float]] | None:
    if not isinstance(data, dict):
        return None
    t, p = data.get("t_s"), data.get("power_w")
    if not isinstance(t, list) or not isinstance(p, list) or len(t) != len(p) or len(t) < 2:
        return None
    try:
        t_s, power_w = [float(x) for x in t], [float(x) for x in p]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(x) for x in t_s + power_w):
        return None
    return {"t_s": t_s, "power_w": power_w}


@dataclass(frozen=True)
class RowFilter:
    """The page's filters, as the server's ``api/table.csv`` reads them from a query string (the page's JavaScript
    builds the same query and applies the same rules: change both together).

    ``families``: empty allows every family. ``precisions``, ``batch_sizes`` (as text), ``gpus``: None allows
    every value, a set only its members (an empty set, sent as one empty value, allows none). ``params_min_m`` /
    ``params_max_m``: millions of parameters, inclusive; a row without a parameter count fails either bound.
    ``query``: whitespace-separated terms that must all occur (case-insensitive) in the row's architecture,
    unit key, family, precision or GPU name.
    """

    families: frozenset[str] = frozenset()
    params_min_m: float | None = None
    params_max_m: float | None = None
    precisions: frozenset[str] | None = None
    batch_sizes: frozenset[str] | None = None
    gpus: frozenset[str] | None = None
    query: str = ""

    @classmethod
    def from_query(cls, query: str) -> RowFilter:
        """Parse ``family=..&params_min=..&params_max=..&precision=..&batch=..&gpu=..&q=..`` (keys repeat);
        ValueError for a bound that is not a number or an unknown key."""
        fields = urllib.parse.parse_qs(query, keep_blank_values=True)
        unknown = sorted(set(fields) - {"family", "params_min", "params_max", "precision", "batch", "gpu", "q"})
        if unknown:
            raise ValueError(f"unknown filter {', '.join(unknown)}: use family, params_min, params_max, precision, "
                             "batch, gpu, q")

        def bound(key: str) -> float | None:
            values = [v for v in fields.get(key, []) if v.strip()]
            if not values:
                return None
            try:
                value = float(values[-1])
            except ValueError:
                raise ValueError(f"{key}={values[-1]!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{key}={values[-1]!r} is not a finite number")
            return value

        def members(key: str) -> frozenset[str] | None:
            return frozenset(fields[key]) if key in fields else None

        return cls(
            families=frozenset(v for v in fields.get("family", []) if v),
            params_min_m=bound("params_min"),
            params_max_m=bound("params_max"),
            precisions=members("precision"),
            batch_sizes=members("batch"),
            gpus=members("gpu"),
            query=" ".join(fields.get("q", [])),
        )

    def matches(self, row: Mapping[str, Any]) -> bool:
        if self.families and row.get("family") not in self.families:
            return False
        params = row.get("params_m")
        if self.params_min_m is not None and not (params is not None and params >= self.params_min_m):
            return False
        if self.params_max_m is not None and not (params is not None and params <= self.params_max_m):
            return False
        for allowed, key in ((self.precisions, "precision"), (self.batch_sizes, "batch_size"), (self.gpus, "gpu_name")):
            if allowed is not None and _js_string(row.get(key)) not in allowed:
                return False
        terms = self.query.lower().split()
        if terms:
            # Array.join in the page writes null as "", unlike String(null).
            hay = " ".join("" if row.get(k) is None else _js_string(row.get(k))
                           for k in ("architecture", "unit_key", "family", "precision", "gpu_name")).lower()
            if not all(t in hay for t in terms):
                return False
        return True

    def apply(self, rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [r for r in rows if self.matches(r)]


def _js_string(v: Any) -> str:
    """``String(v)`` as the page's JavaScript writes it, for the values filters compare."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def table_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The rows as CSV with a header; booleans as 1/0, None as an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else int(row[c]) if isinstance(row[c], bool) else row[c]
                         for c in columns])
    return buf.getvalue()
