"""Results whose energy is not a positive finite number (zero, negative, missing, infinite): every analysis leaves
them out with a warning that names them, and `wattscope analyze`, `wattscope report` and the web app's data work and
say which rows were dropped, instead of a traceback (a zero energy divided the method savings by zero)."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("scipy")

from wattscope import cli  # noqa: E402
from wattscope.analysis import (  # noqa: E402
    AnalysisWarning,
    describe_unusable,
    factors,
    fit_frontier,
    load_results,
    method_savings,
    method_savings_by_family,
    pareto_frontier,
    score_models,
    select_slice,
    synthetic_database,
    unusable_energy,
)
from wattscope.webapp.payload import build_payload  # noqa: E402
from wattscope.webapp.server import make_server  # noqa: E402

# (energy stored, reason): which row gets it is chosen in the fixture.
BAD = {"zero": 0.0, "negative": -0.05, "missing": None, "infinite": math.inf}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[int, str, str]]]:
    """A synthetic database with four broken energies: the zero on an fp32 baseline whose model has a bf16 result
    (the pair that divided by zero), the others in the bf16 reference slice (where a negative energy would top the
    frontier and score A). Returns the path and reason -> (results.id, unit_key, config_key)."""
    path = synthetic_database(tmp_path_factory.mktemp("unusable") / "s.sqlite", n_models=16, seed=7)
    conn = sqlite3.connect(path)
    fp32 = conn.execute("SELECT id, unit_key, config_key FROM results WHERE precision = 'fp32' ORDER BY id").fetchall()
    bf16 = conn.execute(
        "SELECT id, unit_key, config_key FROM results WHERE config_key LIKE 'bs64-bf16-cl0-comp0-graph0-%' ORDER BY id"
    ).fetchall()
    chosen = {"zero": fp32[3], "negative": bf16[5], "missing": bf16[9], "infinite": bf16[12]}
    with conn:
        for reason, (row_id, _, _) in chosen.items():
            conn.execute("UPDATE results SET energy_per_image_j = ? WHERE id = ?", (BAD[reason], row_id))
    conn.close()
    return path, chosen


def test_unusable_energy_finds_and_names_every_bad_row(db) -> None:
    path, chosen = db
    df = load_results(path)
    bad = unusable_energy(df)
    assert sorted(bad["id"]) == sorted(i for i, _, _ in chosen.values())
    assert dict(zip(bad["id"], bad["reason"], strict=True)) == {i: r for r, (i, _, _) in chosen.items()}
    note = describe_unusable(bad)
    assert note.startswith("4 results left out")
    for row_id, unit, config in chosen.values():
        assert f"{unit} ({config}, GPU-00000000, results.id {row_id})" in note
    assert "energy_per_image_j 0;" in note and "-0.05" in note and "missing" in note and "inf" in note
    assert describe_unusable(bad.iloc[:0]) == ""


def _warned(record: pytest.WarningsRecorder, analysis: str, units: list[str]) -> None:
    messages = [str(w.message) for w in record if issubclass(w.category, AnalysisWarning)]
    assert messages, f"no AnalysisWarning from {analysis}"
    assert messages[0].startswith(f"{analysis}: ")
    for unit in units:
        assert unit in messages[0]


def test_frontier_fit_and_score_leave_the_rows_out(db) -> None:
    path, chosen = db
    df = load_results(path)
    rows = select_slice(df, precision="bf16", channels_last=False)
    in_slice = [chosen[r][1] for r in ("negative", "missing", "infinite")]
    with pytest.warns(AnalysisWarning) as record:
        front = pareto_frontier(rows)
    _warned(record, "Pareto frontier", in_slice)
    assert (front["energy_per_image_j"] > 0).all() and np.isfinite(front["energy_per_image_j"]).all()
    assert chosen["negative"][1] not in set(front["unit_key"])  # a negative energy would dominate every model

    clean = rows[np.isfinite(rows["energy_per_image_j"]) & (rows["energy_per_image_j"] > 0)]
    with pytest.warns(AnalysisWarning) as record:
        fit = fit_frontier(rows)
    _warned(record, "frontier fit", in_slice)
    reference = fit_frontier(clean)
    assert fit.best == reference.best and fit.forms["aicc"].tolist() == reference.forms["aicc"].tolist()

    with pytest.warns(AnalysisWarning) as record:
        scores = score_models(rows)
    _warned(record, "score", in_slice)
    bad = rows["unit_key"].isin(in_slice).to_numpy()
    assert scores.index.equals(rows.index)
    assert scores.loc[bad, "ratio"].isna().all() and scores.loc[bad, "band"].isna().all()
    assert not scores.loc[bad, "straddles"].any() and not scores.loc[bad, "extrapolated"].any()
    assert scores.loc[~bad, "band"].notna().all() and (scores.loc[~bad, "ratio"] > 0).all()


def test_method_savings_and_factors_leave_the_rows_out(db) -> None:
    path, chosen = db
    df = load_results(path)
    with pytest.warns(AnalysisWarning) as record:
        pairs = method_savings(df)  # divided by the zero energy before
    _warned(record, "method savings", [u for _, u, _ in chosen.values()])
    assert np.isfinite(pairs[["saving_frac", "ci95_low", "ci95_high"]].to_numpy(float)).all()
    zero_unit, zero_config = chosen["zero"][1], chosen["zero"][2]
    assert not ((pairs["unit_key"] == zero_unit) & (pairs["from_config"] == zero_config)).any()
    assert ((pairs["method"] == "bf16") & (pairs["unit_key"] != zero_unit)).sum() == 16 - 1 - 3
    with pytest.warns(AnalysisWarning):
        by_family = method_savings_by_family(df)
    assert np.isfinite(by_family[["saving_frac", "ci95_low", "ci95_high"]].to_numpy(float)).all()
    assert by_family.set_index(["family", "method"]).loc[("all", "bf16"), "n_models"] == 12

    rows = select_slice(df, precision="bf16", channels_last=False)
    with pytest.warns(AnalysisWarning) as record:
        report = factors(rows)
    _warned(record, "factors", [chosen["negative"][1]])
    assert report.regressions.set_index("factor").loc["gmacs", "n"] == 16 - 3
    assert np.isfinite(report.energy_per_gmac_by_family["energy_per_gmac_j"]).all()


def test_analyze_names_the_rows_once_and_succeeds(db, capsys: pytest.CaptureFixture[str]) -> None:
    path, chosen = db
    assert cli.main(["analyze", str(path)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "AnalysisWarning" not in captured.err
    assert captured.out.count("Note: 4 results left out") == 1
    for row_id, unit, _ in chosen.values():
        assert f"{unit} (" in captured.out and f"results.id {row_id})" in captured.out
    # The default slice has the most usable models: fp32 (15 of 16), no longer bf16 (13 of 16).
    assert "bs64 fp32, NCHW, eager, 15 models with a timm accuracy" in captured.out

    assert cli.main(["analyze", str(path), "--json", "--precision", "bf16", "--channels-last", "off"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {(e["id"], e["reason"]) for e in report["excluded"]} == {(i, r) for r, (i, _, _) in chosen.items()}
    assert report["excluded_note"].startswith("4 results left out") and report["n_models"] == 13
    assert all(s["ratio"] is None or s["ratio"] > 0 for s in report["scores"])


def test_report_and_the_served_data_say_which_rows_were_dropped(
    db, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, chosen = db
    df = load_results(path).reset_index(drop=True)
    positions = sorted(int(i) for i in df.index[df["id"].isin([i for i, _, _ in chosen.values()])])
    with pytest.warns(AnalysisWarning) as record:
        payload = build_payload(path)
    assert len(record) == 1 and str(record[0].message).startswith("s.sqlite: 4 results left out")
    assert payload["excluded"]["rows"] == positions
    for _, unit, _ in chosen.values():
        assert unit in payload["excluded"]["note"]
    for i in positions:
        row = payload["rows"][i]
        assert not row["plotted"] and row["band"] is None and row["ratio"] is None and not row["on_frontier"]
    json.dumps(payload, allow_nan=False)

    out = tmp_path / "r.html"
    with pytest.warns(AnalysisWarning):
        assert cli.main(["report", str(path), "-o", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert '"excluded":{"rows":' + json.dumps(positions).replace(" ", "") in html
    assert "Traceback" not in capsys.readouterr().err

    with pytest.warns(AnalysisWarning):
        server = make_server(path, "127.0.0.1", 0)  # served 500 before
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(server.url + "api/data", timeout=10) as r:
            assert r.status == 200
            data = json.loads(r.read())
        assert data["excluded"]["rows"] == positions
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_figures_leave_the_rows_out(db, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path, chosen = db
    with np.errstate(all="raise"):  # no log of a zero or negative energy on the way
        assert cli.main(["figures", str(path), "-o", str(tmp_path / "figs")]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "energy_vs_gmacs.png",
        "frontier.png",
        "method_savings.png",
    ]
    assert captured.err.startswith("wattscope figures: note: 4 results left out") and "Traceback" not in captured.err
    assert chosen["zero"][1] in captured.err
