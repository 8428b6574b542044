"""Two boards of one GPU model (same gpu_name, different gpu_uuid), as in the shipped H100 sweep: the analysis treats
them as one GPU. A model measured on both counts once (slices, frontier fit, factors, the command's scores), and
method pairs form across boards when a model has no pair on one board."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("scipy")

from wattscope.analysis import (  # noqa: E402
    combine_boards,
    factors,
    fit_frontier,
    load_results,
    method_savings,
    method_savings_by_family,
    select_slice,
    slices,
    synthetic_database,
)
from wattscope.analysis.command import _render, _report  # noqa: E402
from wattscope.analysis.synthetic import GPU_UUID  # noqa: E402

BOARD_2 = "GPU-22222222-0000-0000-0000-000000000000"
BOARD_2_FACTOR = 1.08  # board 2 reads 8 % more energy for the same work


def copy_rows(conn: sqlite3.Connection, where: str, factor: float) -> list[str]:
    """Copy the rows matching ``where`` to board 2 with energies times ``factor``; their unit keys."""
    columns = [r[1] for r in conn.execute("PRAGMA table_info(results)") if r[1] != "id"]
    values = [
        "?" if c == "gpu_uuid" else f"{c} * {factor}" if c in ("energy_per_image_j", "energy_per_image_ci95_j") else c
        for c in columns
    ]
    units = [r[0] for r in conn.execute(f"SELECT unit_key FROM results WHERE {where}")]
    conn.execute(
        f"INSERT INTO results ({', '.join(columns)}) SELECT {', '.join(values)} FROM results WHERE {where}",
        (BOARD_2,),
    )
    return units


@pytest.fixture(scope="module")
def boards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    """Board 1 has everything; board 2 repeats the whole fp32 slice (so that slice has twice as many rows as the
    bf16 one has models) and takes over the channels_last results of half the models that have one (moved: those
    models have channels_last on board 2 only, NCHW on board 1 only). Returns the path, the moved units and the
    channels_last units left on board 1."""
    path = synthetic_database(tmp_path_factory.mktemp("boards") / "s.sqlite", n_models=20, seed=11)
    conn = sqlite3.connect(path)
    with conn:
        copy_rows(conn, "precision = 'fp32'", BOARD_2_FACTOR)
        cl_units = [r[0] for r in conn.execute("SELECT unit_key FROM results WHERE channels_last = 1 ORDER BY id")]
        moved = cl_units[::2]
        marks = ",".join("?" * len(moved))
        conn.execute(f"UPDATE results SET gpu_uuid = ? WHERE channels_last = 1 AND unit_key IN ({marks})",
                     (BOARD_2, *moved))
    conn.close()
    return path, moved, [u for u in cl_units if u not in moved]


def test_a_model_on_two_boards_counts_once_in_slices(boards) -> None:
    path, _, _ = boards
    df = load_results(path)
    table = slices(df)
    table = table[(table["batch_size"] == 64) & ~table["compile"] & ~table["cuda_graphs"]]
    table = table.set_index(["precision", "channels_last"])
    fp32 = table.loc[("fp32", False)]
    assert fp32["n_models"] == 20 and fp32["n_rows"] == 40 and fp32["n_boards"] == 2
    assert table.loc[("bf16", True), "n_boards"] == 2 and table.loc[("bf16", False), "n_boards"] == 1
    # 20 models each: the tie goes to the lower median energy (bf16), not to the slice with the most rows.
    assert select_slice(df)["precision"].eq("bf16").all()


def test_combine_boards_gives_one_row_per_model(boards) -> None:
    path, _, _ = boards
    rows = select_slice(load_results(path), precision="fp32")
    combined = combine_boards(rows)
    assert len(combined) == 20 and combined["unit_key"].is_unique and (combined["n_boards"] == 2).all()
    assert (combined["gpu_uuid"] == ",".join(sorted([GPU_UUID, BOARD_2]))).all()
    one = rows[rows["gpu_uuid"] == GPU_UUID].set_index("unit_key")
    got = combined.set_index("unit_key")
    expected = one["energy_per_image_j"] * math.sqrt(BOARD_2_FACTOR)  # geometric mean of E and 1.08 E
    np.testing.assert_allclose(got["energy_per_image_j"], expected.loc[got.index], rtol=1e-12)
    # The interval reaches both boards' values (board 2's is the mean times sqrt(1.08)), wider than the measurements'.
    half = got["energy_per_image_ci95_j"] / got["energy_per_image_j"]
    np.testing.assert_allclose(half, math.sqrt(BOARD_2_FACTOR) - 1, rtol=1e-12)
    alone = combine_boards(rows[rows["gpu_uuid"] == GPU_UUID]).set_index("unit_key")
    assert (alone["n_boards"] == 1).all()
    assert alone["energy_per_image_j"].equals(one["energy_per_image_j"].loc[alone.index])


@pytest.mark.parametrize("energies_j", [(1.0, 1.0, 1.5), (1.0, 1.08), (0.7, 1.0, 1.0, 1.0), (1.0, 1.2, 0.83, 1.1)])
def test_combine_boards_interval_covers_every_board(energies_j: tuple[float, ...]) -> None:
    n = len(energies_j)
    df = pd.DataFrame({
        "gpu_name": "H100", "unit_key": "m@224", "config_key": "bs64-bf16",
        "gpu_uuid": [f"GPU-{i}" for i in range(n)],
        "energy_per_image_j": energies_j,
        "energy_per_image_ci95_j": [0.01 * e for e in energies_j],
    })
    got = combine_boards(df)
    assert len(got) == 1 and got["n_boards"].iloc[0] == n
    mean_j = float(got["energy_per_image_j"].iloc[0])
    half_j = float(got["energy_per_image_ci95_j"].iloc[0])
    assert mean_j == pytest.approx(math.exp(np.mean(np.log(energies_j))), rel=1e-12)
    assert mean_j - half_j <= min(energies_j) * (1 + 1e-12) and max(energies_j) <= (mean_j + half_j) * (1 + 1e-12)
    # No wider than it must be: the farther board lies on an end.
    assert max(max(energies_j) - mean_j - half_j, mean_j - half_j - min(energies_j)) == pytest.approx(0.0, abs=1e-12)


def test_frontier_fit_and_factors_see_each_model_once(boards) -> None:
    path, _, _ = boards
    rows = select_slice(load_results(path), precision="fp32")
    fit = fit_frontier(rows)
    assert fit.frontier["unit_key"].is_unique and (fit.frontier["n_boards"] == 2).all()
    # The same as fitting the combined points: no board's noise pulls the frontier down.
    reference = fit_frontier(combine_boards(rows))
    np.testing.assert_allclose(fit.forms["aic"], reference.forms["aic"], rtol=1e-12)
    assert list(fit.frontier.index) == list(reference.frontier.index)
    report = factors(rows)
    assert (report.regressions.set_index("factor").loc[["gmacs", "params"], "n"] == 20).all()
    assert report.multiple_n == 20


def test_method_pairs_cross_boards_only_when_a_model_has_none_on_one(boards) -> None:
    path, moved, stayed = boards
    df = load_results(path)
    pairs = method_savings(df)
    cl = pairs[pairs["method"] == "channels_last"].set_index("unit_key")
    assert sorted(cl.index) == sorted(moved + stayed)  # the moved models still count
    assert not cl.loc[moved, "same_board"].any() and cl.loc[stayed, "same_board"].all()
    # bf16 pairs: board 1 fp32 -> bf16 on one board for every model; the board-2 fp32 copies add no pair.
    bf16 = pairs[pairs["method"] == "bf16"]
    assert len(bf16) == 20 and bf16["same_board"].all() and bf16["unit_key"].is_unique
    overall = method_savings_by_family(df).set_index(["family", "method"])
    assert overall.loc[("all", "channels_last"), "n_models"] == len(moved) + len(stayed)
    assert overall.loc[("all", "channels_last"), "n_cross_board"] == len(moved)
    assert overall.loc[("all", "bf16"), "n_cross_board"] == 0


def test_the_command_scores_each_model_once(boards) -> None:
    import argparse

    path, moved, stayed = boards
    args = argparse.Namespace(db=str(path), precision="fp32", batch_size=None, gpu=None, channels_last=None,
                              compile=None, cuda_graphs=None, top=3)
    report = _report(args)
    assert report["n_models"] == 20 and report["n_results"] == 40 and report["n_boards"] == 2
    assert len(report["scores"]) == 20 and {s["n_boards"] for s in report["scores"]} == {2}
    cl = next(m for m in report["methods"] if m["method"] == "channels_last")
    assert cl["n_models"] == len(moved) + len(stayed) and cl["n_cross_board"] == len(moved)


def test_the_command_says_across_boards_without_counting_them(boards) -> None:
    import argparse

    path, moved, _ = boards
    args = argparse.Namespace(db=str(path), precision="fp32", batch_size=None, gpu=None, channels_last=None,
                              compile=None, cuda_graphs=None, top=3)
    text = _render(_report(args))
    # A model's pairs may cross any two of several boards: the shipped data has four.
    assert f"({len(moved)} of them only from pairs across boards)" in text
    assert "two boards" not in text
