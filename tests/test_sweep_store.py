"""The sweep store: round trips, resume semantics, schema versions, merge, exports, and crash safety."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from wattscope import WattscopeError
from wattscope.sweep import catalog
from wattscope.sweep.store import (
    SCHEMA_VERSION,
    Config,
    FailureRow,
    IdleReading,
    ResultRow,
    RunInfo,
    SchemaVersionError,
    StoreError,
    SweepStore,
    merge,
)

GPU_A = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-0000-0000-000000000002"
BF16 = Config(batch_size=64, precision="bf16", channels_last=True, compile=False, cuda_graphs=False, img_size=224)
FP32 = Config(batch_size=32, precision="fp32", channels_last=False, compile=True, cuda_graphs=True, img_size=224)


def run_info(run_id: str = "a" * 32, gpu_uuid: str = GPU_A) -> RunInfo:
    return RunInfo(
        run_id=run_id,
        started_utc="2026-08-10T12:00:00+00:00",
        host="node7",
        gpu_name="NVIDIA H100 80GB HBM3",
        gpu_uuid=gpu_uuid,
        driver_version="580.159.04",
        cuda_version="13.0",
        torch_version="2.11.0",
        timm_version=None,
        wattscope_version="0.1.0",
        command="wattscope sweep --preset quick",
        options_json='{"preset": "quick"}',
    )


def result(i: int, *, run_id: str = "a" * 32, gpu_uuid: str = GPU_A, config: Config = BF16, **changes) -> ResultRow:
    arch = f"net{i}"
    row = ResultRow(
        run_id=run_id,
        unit_key=f"{arch}@{config.img_size}",
        architecture=arch,
        img_size=config.img_size,
        config=config,
        gpu_uuid=gpu_uuid,
        gpu_name="NVIDIA H100 80GB HBM3",
        energy_per_image_j=0.5 + i,
        energy_per_image_above_idle_j=0.25 + i,
        energy_per_image_ci95_j=0.01 * (i + 1),
        images_per_s=1000.0 + i,
        latency_per_batch_ms=64.0 + i,
        mean_power_w=400.0 + i,
        idle_power_w=70.0,
        peak_power_w=650.5,
        peak_memory_bytes=2**30 + i,
        sm_clock_mhz=1980.0,
        temperature_c=55.0,
        sensor_source="samples",
        sensor_profile="builtin:h100",
        n_trials=4,
        window_s=5.0,
        warmup_s=2.0,
        measure_s=20.0,
        wall_s=31.5 + i,
        energy_uncertainty_j=0.2,
        coverage=1.0,
        measured_utc=f"2026-08-10T12:{i % 60:02d}:00+00:00",
        kernels_json='[{"name": "gemm", "energy_j": 1.5}]' if i % 2 else None,
        warmup_converged=i % 3 != 2,
    )
    return dataclasses.replace(row, **changes)


def failure(i: int, *, run_id: str = "a" * 32, gpu_uuid: str = GPU_A, config: Config = BF16, kind="oom") -> FailureRow:
    return FailureRow(
        run_id=run_id,
        unit_key=f"net{i}@{config.img_size}",
        architecture=f"net{i}",
        img_size=config.img_size,
        config=config,
        gpu_uuid=gpu_uuid,
        kind=kind,
        message="CUDA out of memory",
        wall_s=3.0,
        failed_utc="2026-08-10T13:00:00+00:00",
    )


@pytest.fixture
def store(tmp_path):
    with SweepStore(tmp_path / "sweep.db") as s:
        s.start_run(run_info())
        yield s


def test_config_key_and_validation():
    assert BF16.key == "bs64-bf16-cl1-comp0-graph0-224"
    assert FP32.key == "bs32-fp32-cl0-comp1-graph1-224"
    with pytest.raises(ValueError, match="fp32, tf32, bf16, fp16"):
        Config(64, "int8", False, False, False, 224)
    with pytest.raises(ValueError, match="positive"):
        Config(0, "fp16", False, False, False, 224)
    with pytest.raises(ValueError, match="architecture@img_size"):
        result(1, unit_key="net1@256")
    with pytest.raises(ValueError, match="oom, compile"):
        failure(1, kind="segfault")


def test_round_trip(store):
    rows = [result(i) for i in range(3)] + [result(0, config=FP32)]
    for r in rows:
        assert store.add_result(r) is True
    fails = [failure(7), failure(8, config=FP32, kind="compile")]
    for f in fails:
        assert store.add_failure(f) is True
    store.add_idle("a" * 32, GPU_A, 71.25, 0.5, "2026-08-10T11:59:00+00:00")
    assert store.results() == rows
    assert store.failures() == fails
    assert store.runs() == [run_info()]
    assert store.idle_readings() == [IdleReading("a" * 32, GPU_A, 71.25, 0.5, "2026-08-10T11:59:00+00:00")]
    meta = store.meta()
    assert meta["schema_version"] == str(SCHEMA_VERSION) == "2"
    assert meta["catalog_source"] == catalog.SOURCE
    # config as columns: SQL can group by precision and batch size
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT precision, batch_size, count(*) FROM results GROUP BY 1, 2 ORDER BY 1").fetchall() == [
        ("bf16", 64, 3),
        ("fp32", 32, 1),
    ]
    assert conn.execute("SELECT typeof(energy_per_image_j), typeof(channels_last) FROM results LIMIT 1").fetchone() == (
        "real",
        "integer",
    )
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


def test_nan_and_none_survive_the_round_trip(store):
    row = result(1, energy_per_image_ci95_j=math.nan, sm_clock_mhz=None, peak_memory_bytes=None, kernels_json=None)
    store.add_result(row)
    (back,) = store.results()
    assert math.isnan(back.energy_per_image_ci95_j)
    assert back.sm_clock_mhz is None and back.peak_memory_bytes is None and back.kernels_json is None
    assert dataclasses.replace(back, energy_per_image_ci95_j=0.0) == dataclasses.replace(
        row, energy_per_image_ci95_j=0.0
    )


def test_add_result_is_idempotent_and_the_first_measurement_stays(store):
    first = result(1)
    assert store.add_result(first) is True
    assert store.add_result(result(1, energy_per_image_j=99.0, measured_utc="later")) is False
    assert store.results() == [first]
    # the same unit and config on another GPU is another result
    store.start_run(run_info("b" * 32, GPU_B))
    assert store.add_result(result(1, run_id="b" * 32, gpu_uuid=GPU_B)) is True
    assert len(store.results()) == 2


def test_rows_need_their_run(store):
    with pytest.raises(ValueError, match="start_run"):
        store.add_result(result(1, run_id="f" * 32))
    with pytest.raises(ValueError, match="already in"):
        store.start_run(run_info())
    assert store.results() == []


def test_done_keys_with_failures_and_retry(store):
    store.add_result(result(1))
    store.add_failure(failure(2))
    store.add_failure(failure(3, config=FP32, kind="timeout"))
    r1, f2, f3 = ("net1@224", BF16.key), ("net2@224", BF16.key), ("net3@224", FP32.key)
    assert store.done_keys() == {r1, f2, f3}
    assert store.done_keys(GPU_A) == {r1, f2, f3}
    assert store.done_keys(GPU_B) == set()
    assert store.done_keys(retry_failures=True) == {r1}
    # a retry in a later run: the success supersedes the failure, another failure is history
    store.start_run(run_info("c" * 32))
    store.add_result(result(2, run_id="c" * 32))
    assert store.add_failure(failure(3, run_id="c" * 32, config=FP32)) is True
    assert store.add_failure(failure(3, run_id="c" * 32, config=FP32)) is False
    assert store.done_keys(retry_failures=True) == {r1, f2}
    assert store.done_keys() == {r1, f2, f3}
    assert len(store.failures()) == 3


def test_a_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "new.db"
    SweepStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaVersionError, match=r"new\.db has sweep schema version 3.*reads versions 1-2") as e:
        SweepStore(path)
    assert isinstance(e.value, WattscopeError)


def _as_version_1(path):
    """Turn a file into what wattscope wrote before warmup_converged existed."""
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE results DROP COLUMN warmup_converged")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    return path


def test_a_version_1_file_reads_as_not_recorded_and_upgrades_when_written(tmp_path):
    path = _as_version_1(_file_with(tmp_path / "v1.db", GPU_A, "a" * 32, [1, 2]))
    with SweepStore(path, read_only=True) as s:  # read-only: nothing written, the flag reads as not recorded
        assert [r.warmup_converged for r in s.results()] == [None, None]
        assert s.to_dataframe()["warmup_converged"].isna().all()
        assert s.meta()["schema_version"] == "1"
        s.export_csv(tmp_path / "v1.csv")
    assert "warmup_converged" in (tmp_path / "v1.csv").read_text().splitlines()[0]
    with SweepStore(path) as s:  # opened to write: upgraded in place, old rows kept, new rows flagged
        assert s.meta()["schema_version"] == "2"
        s.add_result(result(3, warmup_converged=False))
        assert [r.warmup_converged for r in s.results()] == [None, None, False]
    with SweepStore(path) as s:  # and opens as a version 2 file from then on
        assert s.results()[2] == result(3, warmup_converged=False)


def test_files_that_are_not_stores_are_refused(tmp_path):
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a wattscope sweep store"):
        SweepStore(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite database, just text " * 20)
    with pytest.raises(StoreError, match="not a wattscope sweep store"):
        SweepStore(junk)


def test_unwritable_path_fails_at_open(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    # a path below a regular file can never be created, whoever runs the test (root included)
    with pytest.raises(StoreError, match="a_file"):
        SweepStore(a_file / "sub" / "sweep.db")
    with pytest.raises(StoreError, match="is a directory"):
        SweepStore(tmp_path)
    # a missing folder is created
    with SweepStore(tmp_path / "new" / "deeper" / "sweep.db") as s:
        assert s.results() == []


def test_read_only_store_refuses_writes(store):
    store.add_result(result(1))
    with SweepStore(store.path, read_only=True) as ro:
        assert ro.results() == [result(1)]
        with pytest.raises(StoreError, match="readonly"):
            ro.add_result(result(2))
    assert store.results() == [result(1)]


def _file_with(path, gpu_uuid, run_id, indices, failures=()):
    with SweepStore(path) as s:
        s.start_run(run_info(run_id, gpu_uuid))
        for i in indices:
            s.add_result(result(i, run_id=run_id, gpu_uuid=gpu_uuid))
        for i in failures:
            s.add_failure(failure(i, run_id=run_id, gpu_uuid=gpu_uuid))
        s.add_idle(run_id, gpu_uuid, 70.0, 0.3, "2026-08-10T11:00:00+00:00")
    return path


def test_merge_two_gpus(tmp_path):
    a = _file_with(tmp_path / "alice.db", GPU_A, "a" * 32, [1, 2, 3], failures=[9])
    b = _file_with(tmp_path / "bob.db", GPU_B, "b" * 32, [1, 2])
    # carol copied alice's file and added one row: alice's rows must not be counted twice
    carol = tmp_path / "carol.db"
    _file_with(carol, GPU_A, "a" * 32, [1, 2, 3, 4], failures=[9])
    out = tmp_path / "out" / "all.db"
    report = merge(out, [a, b, carol])
    assert report.results_added == 6 and report.results_duplicate == 3
    assert report.failures_added == 1 and report.failures_duplicate == 1
    assert report.runs_added == 2 and report.idle_added == 2
    assert report.gpu_uuids == (GPU_A, GPU_B)
    assert report.catalog_sources == (catalog.SOURCE,)
    with SweepStore(out) as s:
        keys = sorted((r.gpu_uuid, r.unit_key) for r in s.results())
        assert keys == sorted([(GPU_A, f"net{i}@224") for i in (1, 2, 3, 4)] + [(GPU_B, f"net{i}@224") for i in (1, 2)])
        assert s.done_keys(GPU_B) == {("net1@224", BF16.key), ("net2@224", BF16.key)}
        assert {r.run_id for r in s.runs()} == {"a" * 32, "b" * 32}
    again = merge(out, [b])
    assert again.results_added == 0 and again.results_duplicate == 2 and again.runs_added == 0
    with pytest.raises(ValueError, match="both the output and an input"):
        merge(out, [out])


def test_merge_reads_older_versions_and_rejects_newer_ones_writing_nothing(tmp_path):
    a = _as_version_1(_file_with(tmp_path / "alice_v1.db", GPU_A, "a" * 32, [1]))
    b = _file_with(tmp_path / "bob.db", GPU_B, "b" * 32, [1, 2])
    both = merge(tmp_path / "both.db", [a, b])
    assert both.results_added == 3
    with SweepStore(both.out_path, read_only=True) as s:
        assert s.meta()["schema_version"] == "2"
        assert sorted((r.gpu_uuid, r.warmup_converged) for r in s.results()) == [(GPU_A, None), (GPU_B, False),
                                                                                 (GPU_B, True)]
    conn = sqlite3.connect(b)
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    out = tmp_path / "all.db"
    with pytest.raises(SchemaVersionError, match=r"alice_v1\.db: version 1; .*bob\.db: version 3"):
        merge(out, [a, b])
    assert not out.exists()
    with pytest.raises(StoreError, match="no sweep store"):
        merge(out, [tmp_path / "missing.db"])


def test_export_csv_is_readable_by_the_csv_module(store, tmp_path):
    store.add_result(result(1))
    store.add_result(result(2, config=FP32, energy_per_image_ci95_j=math.nan))
    path = store.export_csv(tmp_path / "results.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert float(rows[0]["energy_per_image_j"]) == 1.5
    assert rows[0]["config_key"] == BF16.key and rows[0]["precision"] == "bf16" and rows[0]["batch_size"] == "64"
    assert rows[0]["channels_last"] == "1" and rows[1]["channels_last"] == "0"
    assert rows[1]["energy_per_image_ci95_j"] == ""
    assert rows[0]["driver_version"] == "580.159.04" and rows[0]["timm_version"] == ""
    assert "host" not in rows[0] and "command" not in rows[0]


def test_export_parquet(store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    store.add_result(result(1))
    store.add_result(result(2, config=FP32, sm_clock_mhz=None))
    table = pq.read_table(store.export_parquet(tmp_path / "results.parquet"))
    assert table.num_rows == 2
    data = table.to_pydict()
    assert data["precision"] == ["bf16", "fp32"]
    assert data["channels_last"] == [True, False]
    assert data["energy_per_image_j"] == [1.5, 2.5]
    assert data["sm_clock_mhz"] == [1980.0, None]
    assert str(table.schema.field("batch_size").type) == "int64"


def test_to_dataframe(store):
    pytest.importorskip("pandas")
    store.add_result(result(1))
    store.add_result(result(2, config=FP32))
    store.add_failure(failure(3))
    df = store.to_dataframe()
    assert list(df["unit_key"]) == ["net1@224", "net2@224"]
    assert df["compile"].dtype == bool and list(df["compile"]) == [False, True]
    assert df.groupby("precision")["energy_per_image_j"].sum().to_dict() == {"bf16": 1.5, "fp32": 2.5}
    assert list(store.to_dataframe("failures")["kind"]) == ["oom"]
    assert len(store.to_dataframe("runs")) == 1
    with pytest.raises(ValueError, match="results, failures, runs, idle"):
        store.to_dataframe("nope")


_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    from test_sweep_store import result, run_info
    from wattscope.sweep.store import SweepStore

    path, limit = sys.argv[1], int(sys.argv[2])
    store = SweepStore(path)
    if not store.runs():
        store.start_run(run_info())
    done = store.done_keys()
    for i in range(limit):
        row = result(i)
        if (row.unit_key, row.config.key) in done:
            continue
        store.add_result(row)
        print(i, flush=True)
    """
)


def _writer(tmp_path, path, limit):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    tests_dir = os.path.dirname(__file__)
    return subprocess.Popen(
        [sys.executable, str(script), str(path), str(limit), tests_dir], stdout=subprocess.PIPE, text=True
    )


def test_kill_9_mid_write_loses_nothing_committed_and_resume_duplicates_nothing(tmp_path):
    path = tmp_path / "sweep.db"
    proc = _writer(tmp_path, path, 1_000_000)
    committed = [int(proc.stdout.readline()) for _ in range(200)]  # rows the writer reported committed
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert os.path.exists(f"{path}-wal")  # killed with its WAL open: recovery has work to do

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    with SweepStore(path) as s:
        rows = s.results()
    indices = sorted(int(r.architecture.removeprefix("net")) for r in rows)
    # every reported commit is there, the rows form a prefix (no hole, no half row), and each is whole
    assert indices[: len(committed)] == committed == list(range(200))
    assert indices == list(range(len(indices)))
    assert rows == [result(i) for i in indices]

    resume = _writer(tmp_path, path, len(indices) + 25)
    out, _ = resume.communicate(timeout=60)
    assert resume.returncode == 0
    assert [int(x) for x in out.split()] == list(range(len(indices), len(indices) + 25))
    with SweepStore(path) as s:
        assert s.results() == [result(i) for i in range(len(indices) + 25)]
        assert len(s.runs()) == 1


def test_kill_9_inside_an_open_transaction_leaves_the_last_commit(tmp_path):
    path = tmp_path / "sweep.db"
    with SweepStore(path) as s:
        s.start_run(run_info())
        s.add_result(result(0))
    script = tmp_path / "stuck.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            sys.path.insert(0, sys.argv[2])
            from test_sweep_store import result
            from wattscope.sweep.store import SweepStore, _RESULT_COLUMNS, _to_sql

            store = SweepStore(sys.argv[1])
            marks = ", ".join("?" * len(_RESULT_COLUMNS))
            names = ", ".join(n for n, _ in _RESULT_COLUMNS)
            with store._transaction() as conn:
                for i in range(1, 2000):  # enough pages to spill into the WAL before the commit
                    conn.execute(f"INSERT INTO results ({names}) VALUES ({marks})", _to_sql(result(i), _RESULT_COLUMNS))
                print("inside", flush=True)
                time.sleep(60)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), os.path.dirname(__file__)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "inside"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with SweepStore(path) as s:
        assert s.results() == [result(0)]
        assert s.add_result(result(1)) is True
        assert s.results() == [result(0), result(1)]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def test_processes_creating_one_store_at_once_all_open_it(tmp_path):
    path = tmp_path / "shared.db"
    code = f"from wattscope.sweep.store import SweepStore\nSweepStore({str(path)!r}).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(6)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    with SweepStore(path) as s:
        assert s.meta()["schema_version"] == "2"
