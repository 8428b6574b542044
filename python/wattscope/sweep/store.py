"""The sweep's results: one SQLite file with a versioned schema, written one committed transaction per row.

Tables: ``meta`` (``schema_version``, ``catalog_source``, ``created_utc``, ``created_by``), ``runs`` (the
environment of each sweep invocation), ``results`` (one row per GPU, unit and configuration), ``failures`` (what
did not run, and why) and ``idle`` (idle power readings). A result's configuration is stored as columns
(``batch_size``, ``precision``, ``channels_last``, ``compile``, ``cuda_graphs``, ``config_img_size``) and as its
``config_key``, so SQL can group by any of them. Quantities are REAL with their unit in the column name; SQLite has
no NaN, so a NaN is stored as NULL and read back as NaN (or as None where the field is optional).

Resume: a result is identified by (``gpu_uuid``, ``unit_key``, ``config_key``) and the first one stored wins: a
repeat is ignored, so rerunning a sweep over a file never duplicates nor silently replaces a measurement (to
measure again, write to a new file). The runner skips by GPU model unless asked for every board
(``SweepOptions.per_board``): a batch job that lands on another node of the same model resumes instead of starting
over. Failures are kept per run as history; ``done_keys`` says what a resumed sweep
can skip.

Durability: the sweep's parent process is the only writer of a file (workers only measure), and each row is one
``BEGIN IMMEDIATE ... COMMIT``. The journal is a WAL, so a process killed at any moment leaves the last committed
state; ``synchronous=FULL`` also syncs the WAL at each commit, so a committed row survives a power loss or a node
reboot too. That costs one fsync per row, nothing next to the seconds of GPU time a row stands for. WAL needs a
local filesystem (not NFS) and a writable directory: SQLite keeps ``-wal`` and ``-shm`` files next to the database.
"""

from __future__ import annotations

import contextlib
import csv
import math
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import WattscopeError
from . import catalog

SCHEMA_VERSION = 2
# Results columns added after version 1 (warmup_converged: version 2). A file of an older version is upgraded in
# place when opened for writing (the new columns NULL in its old rows: not recorded then); read-only, its rows read
# NULL there. A file of a newer version is refused.
_ADDED_COLUMNS = ("warmup_converged",)
READABLE_VERSIONS = tuple(str(v) for v in range(1, SCHEMA_VERSION + 1))

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
FAILURE_KINDS = ("oom", "compile", "timeout", "crash", "error")
TABLES = ("results", "failures", "runs", "idle")


class StoreError(WattscopeError):
    """The sweep store cannot be opened or written (a bad path, not a sweep file, a read-only location)."""


class SchemaVersionError(StoreError):
    """A sweep file was written with another schema version than this wattscope reads."""


@dataclass(frozen=True)
class Config:
    """One measurement configuration of a unit. ``fp16``/``bf16`` run under autocast; ``tf32`` is fp32 weights
    with TF32 matmuls allowed."""

    batch_size: int
    precision: str
    channels_last: bool
    compile: bool
    cuda_graphs: bool
    img_size: int  # px

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1 or self.img_size < 1:
            raise ValueError(f"batch_size ({self.batch_size}) and img_size ({self.img_size}) must be positive")

    @property
    def key(self) -> str:
        """A stable text key, e.g. ``bs64-bf16-cl0-comp0-graph0-224``."""
        return (
            f"bs{self.batch_size}-{self.precision}-cl{int(self.channels_last)}-comp{int(self.compile)}"
            f"-graph{int(self.cuda_graphs)}-{self.img_size}"
        )


@dataclass(frozen=True)
class RunInfo:
    """The environment of one sweep invocation (``run_id``: a uuid4 hex; times are ISO 8601 UTC)."""

    run_id: str
    started_utc: str
    host: str
    gpu_name: str
    gpu_uuid: str
    driver_version: str
    cuda_version: str | None
    torch_version: str | None
    timm_version: str | None
    wattscope_version: str
    command: str
    options_json: str


@dataclass(frozen=True)
class ResultRow:
    """The measured energy of one unit in one configuration on one GPU. ``unit_key`` is ``architecture@img_size``.

    Energy per image is over the measured trials; ``*_above_idle_j`` subtracts ``idle_power_w``; ``*_ci95_j`` is
    the half-width of the 95 % interval across trials and ``energy_uncertainty_j`` the meter's own bound on a
    trial's energy. ``coverage`` is the lowest share of a trial's window the power readings accounted for.
    """

    run_id: str
    unit_key: str
    architecture: str
    img_size: int
    config: Config
    gpu_uuid: str
    gpu_name: str
    energy_per_image_j: float
    energy_per_image_above_idle_j: float
    energy_per_image_ci95_j: float
    images_per_s: float
    latency_per_batch_ms: float
    mean_power_w: float
    idle_power_w: float
    peak_power_w: float
    peak_memory_bytes: int | None
    sm_clock_mhz: float | None
    temperature_c: float | None
    sensor_source: str
    sensor_profile: str
    n_trials: int
    window_s: float
    warmup_s: float
    measure_s: float
    wall_s: float
    energy_uncertainty_j: float
    coverage: float
    measured_utc: str
    kernels_json: str | None = None  # top kernels by energy, when kernel tracing ran
    warmup_converged: bool | None = None  # False: throughput still changing when warm-up ended; None: not recorded

    def __post_init__(self) -> None:
        _check_unit_key(self.unit_key, self.architecture, self.img_size)


@dataclass(frozen=True)
class FailureRow:
    """A unit and configuration that did not produce a result on a GPU, and why."""

    run_id: str
    unit_key: str
    architecture: str
    img_size: int
    config: Config
    gpu_uuid: str
    kind: str  # "oom" | "compile" | "timeout" | "crash" | "error"
    message: str
    wall_s: float
    failed_utc: str

    def __post_init__(self) -> None:
        _check_unit_key(self.unit_key, self.architecture, self.img_size)
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"failure kind {self.kind!r}: choose one of {', '.join(FAILURE_KINDS)}")


@dataclass(frozen=True)
class IdleReading:
    """The idle power of a GPU measured during a run, with the half-width of its 95 % interval."""

    run_id: str
    gpu_uuid: str
    idle_power_w: float
    ci95_w: float
    measured_utc: str


@dataclass(frozen=True)
class MergeReport:
    """What ``merge`` did: rows added to the output and rows already there (duplicates kept once)."""

    out_path: Path
    inputs: tuple[Path, ...]
    runs_added: int
    results_added: int
    results_duplicate: int
    failures_added: int
    failures_duplicate: int
    idle_added: int
    gpu_uuids: tuple[str, ...]  # every GPU in the output after the merge
    catalog_sources: tuple[str, ...]  # the catalogs the inputs' units were chosen from


def _check_unit_key(unit_key: str, architecture: str, img_size: int) -> None:
    if unit_key != f"{architecture}@{img_size}":
        raise ValueError(f"unit_key {unit_key!r} is not '{architecture}@{img_size}' (architecture@img_size)")


# --- the schema, derived from the row dataclasses so that a column cannot drift from its field -------------------
# (a change to these fields changes the schema: bump SCHEMA_VERSION with it, and list a new column in _ADDED_COLUMNS;
# tests pin the columns)

_SQL_TYPES = {
    "str": "TEXT NOT NULL",
    "str | None": "TEXT",
    "int": "INTEGER NOT NULL",
    "int | None": "INTEGER",
    "bool": "INTEGER NOT NULL",
    "bool | None": "INTEGER",
    "float": "REAL",  # nullable: SQLite stores NaN as NULL
    "float | None": "REAL",
}
_CONFIG_COLUMNS = (
    ("config_key", "str"),
    ("batch_size", "int"),
    ("precision", "str"),
    ("channels_last", "bool"),
    ("compile", "bool"),
    ("cuda_graphs", "bool"),
    ("config_img_size", "int"),
)


def _columns(cls: type) -> tuple[tuple[str, str], ...]:
    """(column, field type) of a row dataclass, its ``config`` expanded into the config columns."""
    out: list[tuple[str, str]] = []
    for f in fields(cls):
        if f.type == "Config":
            out += _CONFIG_COLUMNS
        else:
            out.append((f.name, str(f.type)))
    return tuple(out)


_RUN_COLUMNS = _columns(RunInfo)
_RESULT_COLUMNS = _columns(ResultRow)
_FAILURE_COLUMNS = _columns(FailureRow)
_IDLE_COLUMNS = _columns(IdleReading)
_TABLE_COLUMNS = {"runs": _RUN_COLUMNS, "results": _RESULT_COLUMNS, "failures": _FAILURE_COLUMNS, "idle": _IDLE_COLUMNS}


def _ddl(table: str, columns: Sequence[tuple[str, str]], extra: str) -> str:
    body = ",\n  ".join(
        f"{name} {_SQL_TYPES[t]}" + (" REFERENCES runs(run_id)" if name == "run_id" and table != "runs" else "")
        for name, t in columns
    )
    key = "" if table == "runs" else "id INTEGER PRIMARY KEY,\n  "
    return f"CREATE TABLE {table} (\n  {key}{body},\n  {extra}\n)"


_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    _ddl("runs", _RUN_COLUMNS, "PRIMARY KEY (run_id)"),
    _ddl("results", _RESULT_COLUMNS, "UNIQUE (gpu_uuid, unit_key, config_key)"),
    _ddl("failures", _FAILURE_COLUMNS, "UNIQUE (run_id, gpu_uuid, unit_key, config_key)"),
    _ddl("idle", _IDLE_COLUMNS, "UNIQUE (run_id, gpu_uuid, measured_utc)"),
    "CREATE INDEX failures_by_key ON failures (gpu_uuid, unit_key, config_key)",
)


def _to_sql(row: Any, columns: Sequence[tuple[str, str]]) -> tuple[Any, ...]:
    config = getattr(row, "config", None)
    values = []
    for name, t in columns:
        if config is not None and name == "config_key":
            v: Any = config.key
        elif config is not None and name == "config_img_size":
            v = config.img_size
        elif config is not None and name in ("batch_size", "precision", "channels_last", "compile", "cuda_graphs"):
            v = getattr(config, name)
        else:
            v = getattr(row, name)
        if t.startswith("bool"):
            v = None if v is None else int(v)
        elif t == "float":
            v = float(v)
        values.append(v)
    return tuple(values)


def _from_sql(cls: type, values: Sequence[Any], columns: Sequence[tuple[str, str]]) -> Any:
    kwargs: dict[str, Any] = {}
    config: dict[str, Any] = {}
    config_names = {c for c, _ in _CONFIG_COLUMNS}
    for (name, t), v in zip(columns, values, strict=True):
        if t == "bool":
            v = bool(v)
        elif t == "bool | None":
            v = None if v is None else bool(v)
        elif t == "float" and v is None:
            v = math.nan
        if name in config_names:
            if name != "config_key":
                config["img_size" if name == "config_img_size" else name] = v
        else:
            kwargs[name] = v
    if config:
        kwargs["config"] = Config(**config)
    return cls(**kwargs)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _ro_uri(path: Path) -> str:
    return f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"


class SweepStore:
    """A sweep results file: created if missing, opened (and checked) if present.

    Opening fails at once with ``StoreError`` when the path cannot be written (before any GPU time is spent) and
    with ``SchemaVersionError`` when the file has a newer schema version. An older one is upgraded in place when
    opened for writing (``_ADDED_COLUMNS``). ``read_only`` opens an existing file without writing to it (for reading
    or merging others' files; an older file's missing columns read as NULL). Safe to share between threads of one
    process.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.Lock()
        self._missing: set[str] = set()  # results columns of this schema the file lacks (an older file)
        try:
            self._conn = self._connect()
        except sqlite3.Error as e:
            raise StoreError(self._cannot_open(e)) from e
        try:
            self._check_or_create()
        except BaseException:
            self._conn.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            if not self.path.is_file():
                raise StoreError(f"no sweep store at {self.path}")
            return sqlite3.connect(_ro_uri(self.path), uri=True, isolation_level=None, check_same_thread=False)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory: give the sweep store a file name, e.g. {self.path}/sweep.db")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create the folder for the sweep store {self.path}: {e}. Choose a writable location."
            ) from e
        # timeout: another sweep process may be committing to the same file (one per GPU); wait for it.
        return sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)

    def _cannot_open(self, e: Exception) -> str:
        return (
            f"cannot open the sweep store {self.path}: {e}. Choose a writable file on a local filesystem "
            "(SQLite also writes -wal and -shm files next to it, so the folder must be writable)."
        )

    def _journal_mode_wal(self) -> str:
        # Switching the journal mode needs the file to itself, and SQLite answers "database is locked" at once
        # instead of waiting when another process holds it (several sweeps opening one new file; CI saw it):
        # retry for as long as the connection's own busy timeout.
        deadline = time.monotonic() + 30.0
        while True:
            try:
                return str(self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _check_or_create(self) -> None:
        try:
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a wattscope sweep store ({e})") from e
        if tables:
            self._check_version(tables)
        if self.read_only:
            return
        try:
            # Set before creating tables so the new file starts in WAL mode; see the module docstring for why.
            mode = self._journal_mode_wal()
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            if mode.lower() != "wal":
                raise StoreError(
                    f"{self.path}: SQLite could not switch to WAL mode (got {mode!r}); "
                    "use a file on a local filesystem."
                )
            if tables:
                # Fail now, not after the first measurement: a read-only file opens but refuses the first write.
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
                finally:
                    self._conn.execute("ROLLBACK")
                if self._missing:
                    self._upgrade()
            else:
                with self._transaction():
                    # Another process (a sweep on another GPU of this machine) may have created it since we looked.
                    tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                    if tables:
                        self._check_version(tables)
                        return
                    for statement in _SCHEMA:
                        self._conn.execute(statement)
                    self._conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [
                            ("schema_version", str(SCHEMA_VERSION)),
                            ("catalog_source", catalog.SOURCE),
                            ("created_utc", _utc_now()),
                            ("created_by", f"wattscope {_wattscope_version()}"),
                        ],
                    )
        except sqlite3.Error as e:
            raise StoreError(self._cannot_open(e)) from e

    def _check_version(self, tables: set[str]) -> None:
        if "meta" not in tables:
            raise StoreError(f"{self.path} is an SQLite file but not a wattscope sweep store (no meta table)")
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = row[0] if row else None
        if version not in READABLE_VERSIONS:
            raise SchemaVersionError(
                f"{self.path} has sweep schema version {version}, but this wattscope reads versions "
                f"{READABLE_VERSIONS[0]}-{SCHEMA_VERSION}. Open it with the wattscope version that wrote it (or a "
                "newer one), or write this sweep to a new file."
            )
        present = {r[1] for r in self._conn.execute("PRAGMA table_info(results)")}
        self._missing = {c for c in _ADDED_COLUMNS if c not in present}

    def _upgrade(self) -> None:
        """Add this schema's newer columns to an older file, in one transaction (another process may have done it
        meanwhile: looked at again under the write lock)."""
        with self._transaction() as conn:
            present = {r[1] for r in conn.execute("PRAGMA table_info(results)")}
            for name, t in _RESULT_COLUMNS:
                if name in _ADDED_COLUMNS and name not in present:
                    conn.execute(f"ALTER TABLE results ADD COLUMN {name} {_SQL_TYPES[t]}")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        self._missing = set()

    def _names(self, table: str, prefix: str = "") -> str:
        """The SELECT list of a table's columns, NULL for those an older file lacks."""
        missing = self._missing if table == "results" else set()
        return ", ".join(f"NULL AS {n}" if n in missing else prefix + n for n, _ in _TABLE_COLUMNS[table])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so a concurrent writer waits at BEGIN
        instead of failing at COMMIT."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _insert(self, table: str, row: Any, *, ignore: bool) -> bool:
        columns = _TABLE_COLUMNS[table]
        names = ", ".join(n for n, _ in columns)
        marks = ", ".join("?" * len(columns))
        verb = "INSERT OR IGNORE" if ignore else "INSERT"
        try:
            with self._transaction() as conn:
                cur = conn.execute(f"{verb} INTO {table} ({names}) VALUES ({marks})", _to_sql(row, columns))
                return cur.rowcount == 1
        except sqlite3.IntegrityError as e:
            if "FOREIGN KEY" in str(e):
                raise ValueError(f"run {row.run_id!r} is not in {self.path}: call start_run first") from e
            if table == "runs":
                raise ValueError(f"run {row.run_id!r} is already in {self.path}: give each run a new run_id") from e
            raise
        except sqlite3.OperationalError as e:
            raise StoreError(f"cannot write to the sweep store {self.path}: {e}") from e

    def start_run(self, info: RunInfo) -> None:
        """Record a sweep invocation; rows of the run refer to it by ``run_id``."""
        self._insert("runs", info, ignore=False)

    def add_result(self, row: ResultRow) -> bool:
        """Store a result in one committed transaction. Returns False (and stores nothing) when a result with the
        same GPU, unit and configuration is already there: the first measurement stays."""
        return self._insert("results", row, ignore=True)

    def add_failure(self, row: FailureRow) -> bool:
        """Store a failure in one committed transaction; a repeat within the same run is ignored (returns False).
        A result for the same key, before or after, makes the key done regardless of failures."""
        return self._insert("failures", row, ignore=True)

    def add_idle(self, run_id: str, gpu_uuid: str, idle_power_w: float, ci95_w: float, measured_utc: str) -> None:
        """Store an idle-power reading of a GPU."""
        self._insert("idle", IdleReading(run_id, gpu_uuid, idle_power_w, ci95_w, measured_utc), ignore=True)

    def done_keys(self, gpu_uuid: str | None = None, *, retry_failures: bool = False) -> set[tuple[str, str]]:
        """(unit_key, config_key) pairs a resumed sweep can skip: those with a result and, unless
        ``retry_failures``, those that failed. ``gpu_uuid`` limits it to one GPU's rows (None: any GPU)."""
        where, args = ("WHERE gpu_uuid = ?", (gpu_uuid,)) if gpu_uuid is not None else ("", ())
        sql = f"SELECT unit_key, config_key FROM results {where}"
        if not retry_failures:
            sql += f" UNION SELECT unit_key, config_key FROM failures {where}"
            args = args * 2
        with self._lock:
            return {(u, c) for u, c in self._conn.execute(sql, args)}

    def gpus_of_model(self, gpu_name: str) -> set[str]:
        """UUIDs of the GPUs of model (NVML name) ``gpu_name`` that ran a sweep into this file (from ``runs``, so a
        board whose every unit failed counts too) or have results in it (a merged file's)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT gpu_uuid FROM runs WHERE gpu_name = ? UNION SELECT gpu_uuid FROM results WHERE gpu_name = ?",
                (gpu_name, gpu_name),
            )
            return {r[0] for r in rows}

    def _select(self, table: str, cls: type) -> list[Any]:
        columns = _TABLE_COLUMNS[table]
        order = "rowid" if table == "runs" else "id"
        with self._lock:
            rows = self._conn.execute(f"SELECT {self._names(table)} FROM {table} ORDER BY {order}")
            return [_from_sql(cls, r, columns) for r in rows]

    def results(self) -> list[ResultRow]:
        return self._select("results", ResultRow)

    def failures(self) -> list[FailureRow]:
        return self._select("failures", FailureRow)

    def runs(self) -> list[RunInfo]:
        return self._select("runs", RunInfo)

    def idle_readings(self) -> list[IdleReading]:
        return self._select("idle", IdleReading)

    def meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._conn.execute("SELECT key, value FROM meta"))

    def to_dataframe(self, table: str = "results"):  # -> pandas.DataFrame (pandas is optional)
        """A table as a pandas DataFrame, one column per field (config expanded), flags as bool."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
        try:
            import pandas as pd
        except ImportError as e:
            raise ModuleNotFoundError("to_dataframe needs pandas: pip install 'wattscope[pandas]'") from e
        columns = _TABLE_COLUMNS[table]
        with self._lock:
            cur = self._conn.execute(f"SELECT {self._names(table)} FROM {table}")
            df = pd.DataFrame.from_records(list(cur), columns=[n for n, _ in columns])
        for name, t in columns:
            if t == "bool":
                df[name] = df[name].astype(bool)
            elif t == "bool | None":
                df[name] = df[name].astype("boolean")  # pandas' nullable boolean: <NA> where not recorded
            elif t.startswith("float"):
                df[name] = df[name].astype("float64")
        return df

    def _export_rows(self) -> tuple[list[str], list[str], list[tuple[Any, ...]]]:
        """Results joined with their run's software versions: (column names, field types, rows). The host name
        and command line stay out: exports are for sharing."""
        env = ("driver_version", "cuda_version", "torch_version", "timm_version", "wattscope_version")
        names = [n for n, _ in _RESULT_COLUMNS] + list(env)
        types = [t for _, t in _RESULT_COLUMNS] + ["str | None"] * len(env)
        sql = (
            f"SELECT {self._names('results', 'r.')}, {', '.join('u.' + n for n in env)} "
            "FROM results r JOIN runs u ON u.run_id = r.run_id ORDER BY r.id"
        )
        with self._lock:
            return names, types, list(self._conn.execute(sql))

    def export_csv(self, path: str | Path) -> Path:
        """Write the results (with their run's software versions) as CSV; NaN/None are empty cells."""
        path = Path(path)
        names, _, rows = self._export_rows()
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            writer.writerows(rows)
        return path

    def export_parquet(self, path: str | Path) -> Path:
        """Write the results (with their run's software versions) as Parquet; needs pyarrow."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ModuleNotFoundError("export_parquet needs pyarrow: pip install pyarrow") from e
        path = Path(path)
        names, types, rows = self._export_rows()
        arrow_type = {"str": pa.string(), "int": pa.int64(), "bool": pa.bool_(), "float": pa.float64()}
        columns = {}
        for i, (name, t) in enumerate(zip(names, types, strict=True)):
            values = [r[i] for r in rows]
            if t.startswith("bool"):
                values = [None if v is None else bool(v) for v in values]
            columns[name] = pa.array(values, type=arrow_type[t.removesuffix(" | None")])
        pq.write_table(pa.table(columns), path)
        return path

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SweepStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SweepStore({str(self.path)!r}{', read_only=True' if self.read_only else ''})"


def _wattscope_version() -> str:
    from .. import __version__

    return __version__


def merge(out_path: str | Path, inputs: Sequence[str | Path]) -> MergeReport:
    """Merge sweep files (typically other people's, measured on other GPUs) into ``out_path`` (created if missing).

    Every input must have a schema version this wattscope reads (older ones read their missing columns as NULL),
    else ``SchemaVersionError`` names each file with its version and nothing is written; the output has this
    version (an older output file is upgraded). Rows are copied in one transaction; a result already in the output
    (same GPU, unit and configuration) is kept once, the first copy winning, as are repeated runs, failures and idle
    readings.
    """
    out = Path(out_path)
    paths = tuple(Path(p) for p in inputs)
    if not paths:
        raise ValueError("merge needs at least one input file")
    if out.exists() and any(p.exists() and p.resolve() == out.resolve() for p in paths):
        raise ValueError(f"{out} is both the output and an input of the merge")
    versions = {p: _schema_version_of(p) for p in paths}
    if any(v not in READABLE_VERSIONS for v in versions.values()):
        listing = "; ".join(f"{p}: version {v}" for p, v in versions.items())
        raise SchemaVersionError(
            f"cannot merge sweep files of schema versions this wattscope does not read ({listing}); it reads "
            f"versions {READABLE_VERSIONS[0]}-{SCHEMA_VERSION}. Merge them with a wattscope that reads them all."
        )
    added = dict.fromkeys(TABLES, 0)
    offered = dict.fromkeys(TABLES, 0)
    sources: set[str] = set()
    with SweepStore(out) as store, store._transaction() as conn:
        for p in paths:
            with SweepStore(p, read_only=True) as src:
                sources.add(src.meta().get("catalog_source", ""))
                for table in ("runs", "results", "failures", "idle"):  # runs first: the others refer to them
                    names = ", ".join(n for n, _ in _TABLE_COLUMNS[table])
                    marks = ", ".join("?" * len(_TABLE_COLUMNS[table]))
                    rows = src._conn.execute(f"SELECT {src._names(table)} FROM {table}").fetchall()
                    cur = conn.executemany(f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})", rows)
                    added[table] += cur.rowcount
                    offered[table] += len(rows)
        gpus = tuple(r[0] for r in conn.execute("SELECT DISTINCT gpu_uuid FROM results ORDER BY gpu_uuid"))
    return MergeReport(
        out_path=out,
        inputs=paths,
        runs_added=added["runs"],
        results_added=added["results"],
        results_duplicate=offered["results"] - added["results"],
        failures_added=added["failures"],
        failures_duplicate=offered["failures"] - added["failures"],
        idle_added=added["idle"],
        gpu_uuids=gpus,
        catalog_sources=tuple(sorted(sources)),
    )


def _schema_version_of(path: Path) -> str | None:
    """The schema version a sweep file declares (None when it has none); StoreError if it is no sweep file."""
    if not path.is_file():
        raise StoreError(f"no sweep store at {path}")
    try:
        conn = sqlite3.connect(_ro_uri(path), uri=True)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" not in tables:
                raise StoreError(f"{path} is not a wattscope sweep store (no meta table)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            return row[0] if row else None
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path} is not a wattscope sweep store ({e})") from e
