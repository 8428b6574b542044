"""Loading a sweep database for analysis: its results joined with the shipped timm catalog, or a clear error.

``load_results`` reads the ``results`` table of any sweep file (schema versions ``store.READABLE_VERSIONS``) without
writing to it, checks that the columns analysis needs are there, and adds the catalog's accuracy, compute and
family to each row. Every way a file can be unusable (missing, not SQLite, not a sweep file, another schema version,
no results yet, missing columns) is a ``ResultsError`` whose message names the file, what is wrong and what to do.

Two rules every analysis function follows:

- **Unusable energies are left out, by name.** A row whose ``energy_per_image_j`` is not a positive finite number
  (zero, negative, missing or infinite: a failed or hand-edited result) has no logarithm and no ratio. The frontier,
  the fit, the score, the method savings and the factors leave such rows out and say so with an ``AnalysisWarning``
  that names them (``unusable_energy`` lists them, ``describe_unusable`` words them); they never fail on them.
- **Boards of one GPU model are one GPU.** A GPU is identified by its ``gpu_name`` (e.g. "NVIDIA H100 80GB HBM3"),
  not by the board (``gpu_uuid``): the shipped sweep was measured on four H100 boards and is one H100 dataset.
  Slices, frontiers, scores, method pairs and factors group by ``gpu_name``. Where one model and configuration was
  measured on several boards, analyses that need one point per model (the frontier fit, the factors, the slice's
  model count) combine those results into one (``combine_boards``); the stored rows stay as they are (``load_results``
  returns one row per stored result, each with its ``gpu_uuid``).
"""

from __future__ import annotations

import math
import sqlite3
import urllib.parse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import WattscopeError
from ..sweep import catalog as _catalog
from ..sweep import store as _store


class ResultsError(WattscopeError):
    """A sweep database cannot be analysed: missing file, not a sweep database, another schema version, no results,
    missing columns, or too little data for what was asked. The message says what is wrong and what to do."""


class AnalysisWarning(UserWarning):
    """Results left out of an analysis because their energy per image is not a positive finite number. The message
    names them (unit, configuration, board and ``results.id``) and says which analysis left them out."""


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


SHIPPED_DATABASE = "data/h100/sweep.sqlite"  # relative to the repository's root, and to the installed package


def shipped_database() -> Path:
    """The H100 sweep shipped with wattscope: the copy installed in the package (``wattscope/data/h100/sweep.sqlite``
    beside these sources, put there by CMakeLists.txt's install rule, so a wheel carries it), else
    ``data/h100/sweep.sqlite`` of the repository checkout these sources are in. Both are looked for relative to this
    file, not with ``importlib.resources`` or beside ``_core``: an editable install keeps its installed copy beside
    ``_core``, away from the sources, so it finds the checkout's file, the one a sweep extends in place, never a stale
    copy from the last build. ResultsError when neither exists."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / SHIPPED_DATABASE
    checkout = package.parents[1] / SHIPPED_DATABASE
    for path in (packaged, checkout):
        if path.is_file():
            return path
    raise ResultsError(
        f"no database given and the shipped H100 sweep is neither in the installed package ({packaged}) nor in a "
        f"repository checkout ({checkout}): this installation was built without it. Give the path of a sweep "
        "database, e.g. one written by `wattscope sweep --db results.sqlite`."
    )


def connect_read_only(path: str | Path) -> sqlite3.Connection:
    """An SQLite connection that cannot write to ``path``. The shipped database's installed copy is opened as
    immutable: it is in WAL mode (the sweep that wrote it leaves it so), and a read-only open of a WAL database
    creates ``-shm``/``-wal`` files beside it, which fails in a read-only site-packages ("attempt to write a readonly
    database") and litters a writable one. Any other file may be a sweep still writing, so it is opened normally."""
    path = Path(path)
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"
    if path.resolve() == Path(__file__).resolve().parents[1] / SHIPPED_DATABASE:
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True)


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
    try:
        conn = connect_read_only(path)
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
        if version not in _store.READABLE_VERSIONS:
            raise ResultsError(
                f"{path} has sweep schema version {version}, but this wattscope reads versions "
                f"{_store.READABLE_VERSIONS[0]}-{_store.SCHEMA_VERSION}. Analyse it with the wattscope version that "
                "wrote it (or a newer one), or measure again into a new file."
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
    """The configurations present (one row per slice of ``SLICE_COLUMNS``), largest first: ``n_models`` (distinct
    models with an accuracy and a usable energy: a model measured on two boards counts once), ``n_boards``
    (distinct ``gpu_uuid``), ``n_rows`` (stored results) and ``median_energy_per_image_j`` (of the usable
    energies)."""
    usable = has_usable_energy(df)
    scored = df.assign(
        _model=df["unit_key"].where(df["top1"].notna() & usable),
        _energy_j=df["energy_per_image_j"].where(usable),
    )
    out = (
        scored.groupby(list(SLICE_COLUMNS), dropna=False)
        .agg(
            n_models=("_model", "nunique"),
            n_boards=("gpu_uuid", "nunique"),
            n_rows=("unit_key", "size"),
            median_energy_per_image_j=("_energy_j", "median"),
        )
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


# --- rows analysis cannot use, and boards of one GPU model -------------------------------------------------------

ENERGY = "energy_per_image_j"
_MAX_NAMED = 12  # rows named in one message; the rest are counted


def has_usable_energy(df: pd.DataFrame, energy: str = ENERGY) -> np.ndarray:
    """A boolean per row of ``df``: its ``energy`` is a positive finite number."""
    e = pd.to_numeric(df[energy], errors="coerce").to_numpy(float)
    with np.errstate(invalid="ignore"):
        return np.isfinite(e) & (e > 0)


def unusable_energy(df: pd.DataFrame, energy: str = ENERGY) -> pd.DataFrame:
    """The rows of ``df`` (same index) whose ``energy`` is not a positive finite number, with ``reason``: "zero",
    "negative", "missing" or "infinite". Empty when every row can be analysed."""
    bad = df[~has_usable_energy(df, energy)]
    values = pd.to_numeric(bad[energy], errors="coerce").to_numpy(float)
    reason = np.select(
        [np.isnan(values), np.isinf(values), values == 0], ["missing", "infinite", "zero"], default="negative"
    )
    return bad.assign(reason=reason)


def describe_unusable(bad: pd.DataFrame, energy: str = ENERGY) -> str:
    """One sentence naming the rows of ``unusable_energy`` (empty string for none): unit, configuration, board
    (the ``gpu_uuid`` up to its first dash group) and ``results.id``, with the stored value."""
    if bad.empty:
        return ""
    names = []
    for index, rec in zip(bad.index[:_MAX_NAMED], bad.head(_MAX_NAMED).to_dict("records"), strict=True):
        where = [str(rec.get("config_key") or ""), str(rec.get("gpu_uuid") or "")[:12]]
        if isinstance(rec.get("id"), (int, np.integer)):
            where.append(f"results.id {int(rec['id'])}")
        else:  # a frame not read from a sweep file: its row label is all there is
            where.append(f"row {index}")
        value = float(rec[energy]) if rec[energy] is not None else math.nan
        shown = "missing" if math.isnan(value) else f"{value:g}"
        names.append(f"{rec.get('unit_key') or 'a result'} ({', '.join(w for w in where if w)}): {energy} {shown}")
    more = len(bad) - len(names)
    n = len(bad)
    return (
        f"{n} result{'s' if n != 1 else ''} left out, {energy} not a positive finite number: "
        + "; ".join(names)
        + (f"; and {more} more (wattscope.analysis.unusable_energy lists them all)" if more > 0 else "")
        + ". Measure them again (`wattscope sweep` resumes) or delete those rows."
    )


def usable_energy(df: pd.DataFrame, analysis: str, energy: str = ENERGY, stacklevel: int = 3) -> pd.DataFrame:
    """``df`` without the rows of ``unusable_energy``; an ``AnalysisWarning`` naming them, prefixed with
    ``analysis`` (what leaves them out), when there are any. ``stacklevel`` as for ``warnings.warn``, counted from
    the caller of this function."""
    mask = has_usable_energy(df, energy)
    if not mask.all():
        warnings.warn(f"{analysis}: {describe_unusable(unusable_energy(df, energy), energy)}", AnalysisWarning,
                      stacklevel=stacklevel)
    return df[mask]


BOARD_KEY = ("gpu_name", "unit_key", "config_key")


def combine_boards(df: pd.DataFrame) -> pd.DataFrame:
    """One row per GPU model, model and configuration (``BOARD_KEY``): results of one model and configuration
    measured on several boards of one GPU model (same ``gpu_name``, different ``gpu_uuid``) become one row, so that
    a model counts once in a frontier fit or a regression.

    The combined ``energy_per_image_j`` is the geometric mean of the boards' energies (analysis works on ln E). Its
    ``energy_per_image_ci95_j`` is the larger of two relative half-widths, times that mean: the measurement
    intervals combined (root sum of squares of the relative half-widths, over the number of boards) and the distance
    from the mean to the farthest board's value (``expm1(max ln E - mean)``, or ``-expm1(min ln E - mean)`` below),
    so the interval covers every board's value: boards differ by more than their own intervals (up to 21 % for one
    model on the shipped H100 data), and two to four boards are too few to estimate that spread better.
    ``n_boards`` is the number of results combined and ``gpu_uuid`` lists their boards, comma-separated; every other
    column is the first stored row's, whose index the combined row keeps. Rows that are alone keep their values
    (``n_boards`` 1), as do all rows of a frame without the ``BOARD_KEY`` columns (one not from ``load_results``).
    Pass usable energies only (``usable_energy``)."""
    keys = list(BOARD_KEY)
    out = df.assign(n_boards=1)
    if not set(keys) <= set(df.columns) or not df.duplicated(keys).any():
        return out
    firsts = ~df.duplicated(keys, keep="first")
    groups = df.groupby(keys, sort=False, dropna=False)
    log_e = np.log(df[ENERGY].to_numpy(float))
    rel = np.nan_to_num(df["energy_per_image_ci95_j"].to_numpy(float) / df[ENERGY].to_numpy(float), nan=0.0)
    work = pd.DataFrame({"log_e": log_e, "rel2": rel**2}, index=df.index)
    gid = groups.ngroup()
    agg = work.groupby(gid).agg(mean=("log_e", "mean"), lo=("log_e", "min"), hi=("log_e", "max"),
                                rel2=("rel2", "sum"), n=("log_e", "size"))
    uuids = df["gpu_uuid"].astype(str).groupby(gid).agg(lambda u: ",".join(sorted(set(u))))
    first = out[firsts].copy()
    g = gid[firsts].to_numpy()
    mean_log = agg["mean"].to_numpy()[g]
    mean_j = np.exp(mean_log)
    n = agg["n"].to_numpy()[g]
    # The interval is symmetric in E around the geometric mean, so it reaches the farthest board on either side.
    half_rel = np.maximum.reduce([
        np.sqrt(agg["rel2"].to_numpy()[g]) / n,
        np.expm1(agg["hi"].to_numpy()[g] - mean_log),
        -np.expm1(agg["lo"].to_numpy()[g] - mean_log),
    ])
    first[ENERGY] = mean_j
    first["energy_per_image_ci95_j"] = mean_j * half_rel
    first["n_boards"] = n
    first["gpu_uuid"] = uuids.to_numpy()[g]
    return first
