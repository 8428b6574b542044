"""Loading a sweep database for analysis: its results joined with the shipped timm catalog, or a clear error.

``load_results`` reads the ``results`` table of any sweep file (schema version ``store.SCHEMA_VERSION``) without
writing to it, checks that the columns analysis needs are there, and adds the catalog's accuracy, compute and
family to each row. Every way a file can be unusable (missing, not SQLite, not a sweep file, another schema version,
no results yet, missing columns) is a ``ResultsError`` whose message names the file, what is wrong and what to do.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import WattscopeError
from ..sweep import catalog as _catalog
from ..sweep import store as _store


class ResultsError(WattscopeError):
    """A sweep database cannot be analysed: missing file, not a sweep database, another schema version, no results,
    missing columns, or too little data for what was asked. The message says what is wrong and what to do."""


# The columns of the results table that analysis reads; any other column is passed through untouched.
REQUIRED_COLUMNS = (
    "unit_key",
    "architecture",
    "config_img_size",
    "config_key",
    "batch_size",
    "precision",
    "channels_last",
    "compile",
    "cuda_graphs",
    "gpu_name",
    "gpu_uuid",
    "energy_per_image_j",
    "energy_per_image_ci95_j",
    "images_per_s",
    "mean_power_w",
    "idle_power_w",
)
_BOOL_COLUMNS = ("channels_last", "compile", "cuda_graphs")
# The configuration columns that make a slice: rows of one slice differ only in the model.
SLICE_COLUMNS = ("gpu_name", "batch_size", "precision", "channels_last", "compile", "cuda_graphs")


def shipped_database() -> Path:
    """The H100 sweep shipped in the repository (``data/h100/sweep.sqlite`` beside ``python/``), or ResultsError
    when wattscope does not run from a checkout of its repository."""
    path = Path(__file__).resolve().parents[3] / "data" / "h100" / "sweep.sqlite"
    if not path.is_file():
        raise ResultsError(
            f"no database given and the shipped H100 sweep is not at {path} (it is only in a checkout of the "
            "wattscope repository, not in an installed wheel). Give the path of a sweep database, e.g. one "
            "written by `wattscope sweep --db results.sqlite`."
        )
    return path


def load_results(db_path: str | Path) -> pd.DataFrame:
    """One row per stored result, joined with the shipped timm catalog.

    Columns: every column of the ``results`` table, plus ``family``; ``weight`` (the unit's most accurate timm
    weight), its ``pretrain`` data where timm says, and ``n_weights``; ``top1``/``top5`` (that weight's ImageNet-1k
    accuracy, %); ``gmacs`` (per image); ``params_m`` and ``activations_m`` (millions); and ``baseline`` (fp32,
    eager, NCHW, no CUDA graphs). ``img_size`` is the input size the row was measured at (px), and the catalog
    figures are those of the unit ``architecture@img_size``: a model measured at a size timm has no result for gets
    NaN accuracy (and NaN GMACs when timm's benchmark lacks that size), as does an architecture the catalog does
    not know. ``kernels_json`` is None where no kernel tracing ran. Raises ResultsError (see the module docstring).
    """
    path = Path(db_path)
    raw = _read_results(path)
    if raw.empty:
        raise ResultsError(
            f"{path} is a sweep database with no results yet: run `wattscope sweep --db {path}` to measure some, "
            "or open another file."
        )
    return _join_catalog(_typed(raw))


def _read_results(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise ResultsError(f"no sweep database at {path}: check the path, or write one with `wattscope sweep --db`.")
    if not path.is_file():
        raise ResultsError(f"{path} is not a file: give the path of a sweep database (.sqlite).")
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as e:
        raise ResultsError(f"cannot open {path}: {e}. Check that the file is readable.") from e
    try:
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise ResultsError(f"{path} is not an SQLite database ({e}): give the path of a sweep database.") from e
        if "meta" not in tables or "results" not in tables:
            raise ResultsError(
                f"{path} is an SQLite file but not a wattscope sweep database (it has no "
                f"{'meta' if 'meta' not in tables else 'results'} table). Give a file written by `wattscope sweep`."
            )
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = row[0] if row else None
        if version != str(_store.SCHEMA_VERSION):
            raise ResultsError(
                f"{path} has sweep schema version {version}, but this wattscope reads version "
                f"{_store.SCHEMA_VERSION}. Analyse it with the wattscope version that wrote it, or measure again "
                "into a new file."
            )
        columns = [r[1] for r in conn.execute("PRAGMA table_info(results)")]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ResultsError(
                f"{path}: the results table lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"that analysis needs (schema version {version} should have them: the file was edited or written "
                "by another tool). Export it again with `wattscope sweep`, or add the columns."
            )
        return pd.read_sql_query(
            "SELECT * FROM results ORDER BY id" if "id" in columns else "SELECT * FROM results", conn
        )
    except sqlite3.DatabaseError as e:
        raise ResultsError(f"cannot read {path}: {e}. Is it a complete sweep database?") from e
    finally:
        conn.close()


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for name in _BOOL_COLUMNS:
        df[name] = df[name].astype(bool)
    for name in df.columns:
        if name.endswith(("_j", "_w", "_s", "_ms", "_mhz", "_c")) or name == "coverage":
            df[name] = pd.to_numeric(df[name], errors="coerce").astype("float64")
    df["batch_size"] = df["batch_size"].astype(int)
    df["config_img_size"] = df["config_img_size"].astype(int)
    if "kernels_json" not in df.columns:
        df["kernels_json"] = None
    df["kernels_json"] = df["kernels_json"].astype(object).where(df["kernels_json"].notna(), None)
    return df


def _join_catalog(df: pd.DataFrame) -> pd.DataFrame:
    cat = _catalog.Catalog.load()
    info = {}
    for arch, size in set(zip(df["architecture"], df["config_img_size"], strict=True)):
        info[(arch, size)] = _unit_info(cat, arch, int(size))
    extra = pd.DataFrame(
        [info[(a, s)] for a, s in zip(df["architecture"], df["config_img_size"], strict=True)], index=df.index
    )
    out = pd.concat([df, extra], axis=1)
    out["img_size"] = out["config_img_size"]
    out["baseline"] = (
        (out["precision"] == "fp32") & ~out["compile"] & ~out["channels_last"] & ~out["cuda_graphs"]
    ).astype(bool)
    return out


def _unit_info(cat: _catalog.Catalog, architecture: str, img_size: int) -> dict[str, object]:
    try:
        unit: _catalog.Unit | None = cat.get(architecture, img_size)
    except (_catalog.UnknownModelError, ValueError):
        unit = None
    best = unit.weights[0] if unit is not None and unit.weights else None
    return {
        "family": unit.family if unit is not None else _catalog.family_of(architecture),
        "weight": best.name if best is not None else None,
        "pretrain": best.pretrain if best is not None else None,
        "n_weights": len(unit.weights) if unit is not None else 0,
        "top1": best.top1 if best is not None else np.nan,
        "top5": best.top5 if best is not None else np.nan,
        "gmacs": _nan(unit.gmacs if unit is not None else None),
        "params_m": _nan(unit.param_count_m if unit is not None else None),
        "activations_m": _nan(unit.macts_m if unit is not None else None),
    }


def _nan(value: float | None) -> float:
    return np.nan if value is None else float(value)


def slices(df: pd.DataFrame) -> pd.DataFrame:
    """The configurations present (one row per slice of ``SLICE_COLUMNS``), with ``n_models`` (rows with an
    accuracy) and ``median_energy_per_image_j``, largest first."""
    scored = df.assign(_has_top1=df["top1"].notna())
    out = (
        scored.groupby(list(SLICE_COLUMNS), dropna=False)
        .agg(n_models=("_has_top1", "sum"), median_energy_per_image_j=("energy_per_image_j", "median"))
        .reset_index()
    )
    return out.sort_values(["n_models", "median_energy_per_image_j"], ascending=[False, True]).reset_index(drop=True)


def slice_label(row: pd.Series | dict) -> str:
    """A short name for a slice, e.g. ``NVIDIA H100 80GB HBM3, bs64 bf16, NCHW, eager``."""
    layout = "channels_last" if row["channels_last"] else "NCHW"
    how = "+".join(n for n, on in (("compile", row["compile"]), ("cuda_graphs", row["cuda_graphs"])) if on) or "eager"
    return f"{row['gpu_name']}, bs{int(row['batch_size'])} {row['precision']}, {layout}, {how}"


def select_slice(df: pd.DataFrame, **where: object) -> pd.DataFrame:
    """The rows of one configuration slice: ``where`` fixes any of ``SLICE_COLUMNS`` (e.g. ``precision="bf16"``);
    the rest are chosen as the slice with the most models with an accuracy (ties: the lower median energy, i.e.
    the configuration one would deploy). Raises ResultsError when nothing matches."""
    unknown = sorted(set(where) - set(SLICE_COLUMNS))
    if unknown:
        raise ValueError(f"cannot select on {', '.join(unknown)}; choose among {', '.join(SLICE_COLUMNS)}")
    table = slices(df)
    for name, value in where.items():
        table = table[table[name] == value]
    if table.empty:
        wanted = ", ".join(f"{k}={v}" for k, v in where.items())
        raise ResultsError(
            f"no results with {wanted}; the configurations present: "
            + "; ".join(slice_label(r) for _, r in slices(df).iterrows())
        )
    chosen = table.iloc[0]
    mask = np.ones(len(df), dtype=bool)
    for name in SLICE_COLUMNS:
        mask &= (df[name] == chosen[name]).to_numpy()
    return df[mask]
