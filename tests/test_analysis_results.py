"""Loading sweep databases for analysis: the catalog join, and a ResultsError that says what to do for every kind
of unusable file."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

from wattscope import WattscopeError  # noqa: E402
from wattscope.analysis import (  # noqa: E402
    PLANTED,
    ResultsError,
    load_results,
    select_slice,
    shipped_database,
    synthetic_database,
)
from wattscope.sweep.catalog import Catalog  # noqa: E402
from wattscope.sweep.store import SweepStore  # noqa: E402


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_database(tmp_path_factory.mktemp("analysis") / "synthetic.sqlite", n_models=24, seed=3)


def test_rows_are_joined_with_the_catalog(synthetic):
    df = load_results(synthetic)
    with SweepStore(synthetic, read_only=True) as store:
        assert len(df) == len(store.results())
    cat = Catalog.load()
    for _, row in df.iterrows():
        unit = cat.get(row["architecture"], int(row["img_size"]))
        assert row["top1"] == unit.weights[0].top1
        assert row["weight"] == unit.weights[0].name
        assert row["gmacs"] == unit.gmacs and row["params_m"] == unit.param_count_m
        assert row["activations_m"] == unit.macts_m and row["family"] == unit.family
    expected_baseline = (df["precision"] == "fp32") & ~df["channels_last"] & ~df["compile"] & ~df["cuda_graphs"]
    assert (df["baseline"] == expected_baseline).all() and df["baseline"].sum() == 24
    assert df["kernels_json"].isna().all()


def test_unknown_architectures_keep_their_rows_without_accuracy(tmp_path, synthetic):
    path = tmp_path / "copy.sqlite"
    with sqlite3.connect(synthetic) as src, sqlite3.connect(path) as dst:
        src.backup(dst)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE results SET architecture = 'my_net', unit_key = 'my_net@' || img_size WHERE id = 1")
    df = load_results(path)
    row = df[df["architecture"] == "my_net"].iloc[0]
    assert np.isnan(row["top1"]) and np.isnan(row["gmacs"]) and row["family"] == "my"


def test_select_slice_defaults_to_the_largest_and_lowest_energy_slice(synthetic):
    df = load_results(synthetic)
    chosen = select_slice(df)
    # fp32 and bf16 at batch 64 both hold every model; bf16 is the cheaper one.
    assert set(chosen["precision"]) == {"bf16"} and set(chosen["batch_size"]) == {64}
    assert not chosen["channels_last"].any() and len(chosen) == 24
    assert set(select_slice(df, precision="fp32")["precision"]) == {"fp32"}
    with pytest.raises(ResultsError, match="no results with precision=tf32"):
        select_slice(df, precision="tf32")


def test_planted_answers_are_in_the_file(synthetic):
    df = load_results(synthetic)
    ref = select_slice(df)
    ratio = ref["energy_per_image_j"] / PLANTED.frontier_energy_j(ref["top1"])
    # Frontier models within the noise of the planted curve, none below it beyond the noise.
    assert ratio.min() > np.exp(-5 * PLANTED.noise_log)
    assert (np.abs(np.log(ratio)) < 5 * PLANTED.noise_log).sum() >= 0.4 * len(ref)


def _write_copy(src, dst) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p, s: None, "no sweep database at"),
        (lambda p, s: p.mkdir(), "is not a file"),
        (lambda p, s: p.write_bytes(b"this is not SQLite at all, just text" * 40), "not an SQLite database"),
        (lambda p, s: sqlite3.connect(p).execute("CREATE TABLE t (x)").connection.commit(), "no meta table"),
        (lambda p, s: SweepStore(p).close(), "no results yet"),
    ],
    ids=["missing", "directory", "not-sqlite", "not-a-sweep", "empty"],
)
def test_unusable_files_are_results_errors(tmp_path, synthetic, make, message):
    path = tmp_path / "bad.sqlite"
    make(path, synthetic)
    with pytest.raises(ResultsError, match=message) as info:
        load_results(path)
    assert isinstance(info.value, WattscopeError)
    assert str(path) in str(info.value)


def test_wrong_schema_version_says_which_version_to_use(tmp_path, synthetic):
    path = tmp_path / "v99.sqlite"
    _write_copy(synthetic, path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(ResultsError, match="schema version 99, but this wattscope reads versions 1-2"):
        load_results(path)


def test_missing_columns_are_named(tmp_path, synthetic):
    path = tmp_path / "edited.sqlite"
    _write_copy(synthetic, path)
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE results DROP COLUMN energy_per_image_ci95_j")
        conn.execute("ALTER TABLE results DROP COLUMN mean_power_w")
    with pytest.raises(ResultsError, match="lacks the columns energy_per_image_ci95_j, mean_power_w"):
        load_results(path)


def test_synthetic_database_refuses_to_overwrite(synthetic):
    with pytest.raises(ValueError, match="exists"):
        synthetic_database(synthetic)


def test_the_shipped_database_is_found_in_the_package_or_the_checkout():
    # A wheel carries a copy inside the package; an editable install or a checkout on sys.path has the repository's.
    path = shipped_database()
    assert path.parts[-3:] == ("data", "h100", "sweep.sqlite")
    df = load_results(path)
    assert len(df) > 0 and df["gpu_name"].str.contains("H100").all()


def test_the_installed_copy_comes_first_and_is_read_without_a_trace(tmp_path, monkeypatch, synthetic):
    """The lookup, with this module's sources placed as in an installed wheel (site/wattscope/analysis/) inside a
    fake checkout (data/h100/ two levels above the package)."""
    from wattscope.analysis import results

    package = tmp_path / "site" / "wattscope"
    monkeypatch.setattr(results, "__file__", str(package / "analysis" / "results.py"))
    packaged, checkout = package / "data/h100/sweep.sqlite", tmp_path / "data/h100/sweep.sqlite"
    with pytest.raises(ResultsError, match="neither in the installed package .* nor in a repository checkout"):
        shipped_database()
    for path in (checkout, packaged):
        path.parent.mkdir(parents=True)
        src, dst = sqlite3.connect(synthetic), sqlite3.connect(path)
        src.backup(dst)
        assert dst.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # as the sweep leaves it
        src.close()
        dst.close()  # the last connection: SQLite removes the -wal and -shm files
    assert sorted(p.name for p in packaged.parent.iterdir()) == ["sweep.sqlite"]
    assert shipped_database() == packaged.resolve()
    # Read-only opens of a WAL database create -shm/-wal files beside it: impossible in a read-only site-packages
    # ("attempt to write a readonly database"), litter in a writable one. The installed copy is opened immutable.
    assert len(load_results(packaged)) > 0
    assert sorted(p.name for p in packaged.parent.iterdir()) == ["sweep.sqlite"]
    packaged.unlink()
    assert shipped_database() == checkout.resolve()
