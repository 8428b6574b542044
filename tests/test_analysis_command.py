"""`wattscope analyze` and `wattscope figures`: output on a database with known answers, and clear errors instead
of tracebacks."""

from __future__ import annotations

import argparse
import json
import sqlite3

import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

from wattscope import cli  # noqa: E402
from wattscope.analysis import command, synthetic_database  # noqa: E402


def run(argv: list[str]) -> int:
    # The analysis commands alone: other layers' commands are not under test here.
    parser = argparse.ArgumentParser(prog="wattscope")
    command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_the_commands_are_registered():
    assert "wattscope.analysis.command" in cli._COMMAND_MODULES


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return synthetic_database(tmp_path_factory.mktemp("cmd") / "s.sqlite", n_models=30, seed=2)


def test_analyze_prints_verdict_fit_table_and_scores(db, capsys):
    assert run(["analyze", str(db), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "bs64 bf16, NCHW, eager, 30 models" in out
    assert "The data strongly supports the double exponential" in out
    for form in ("double_exponential", "exponential", "power_law"):
        assert form in out
    assert "best 3:" in out and "worst 3:" in out
    assert "bf16" in out and "channels_last" in out and "gmacs" in out
    # A setting that costs energy reads as a factor: the synthetic batch 1 costs 4x its batch-64 energy per image.
    batch_1 = next(line for line in out.splitlines() if line.strip().startswith("batch_1"))
    assert "costs 4.0" in batch_1 and "%" not in batch_1


def test_analyze_states_the_band_edges_the_score_uses(db, capsys, monkeypatch):
    from wattscope.analysis import score

    monkeypatch.setattr(score, "BAND_EDGES", (1.1, 1.6, 2.0, 2.5, 3.15, 5.0))
    assert run(["analyze", str(db), "--top", "1"]) == 0
    assert "(A <= 1.1, B <= 1.6, C <= 2, D <= 2.5, E <= 3.15, F <= 5, G > 5)" in capsys.readouterr().out


def test_analyze_json_is_strict_json_with_every_part(db, capsys):
    assert run(["analyze", str(db), "--json", "--precision", "fp32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "bs64 fp32" in report["slice"] and report["n_models"] == 30
    assert report["fit"]["best"] == "double_exponential"
    assert len(report["scores"]) == 30 and {"band", "ratio", "straddles"} <= set(report["scores"][0])
    assert {m["method"] for m in report["methods"]} >= {"bf16", "channels_last", "batch_1"}
    assert report["factors"]["regressions"][0]["factor"] == "gmacs"


@pytest.mark.parametrize("which", ["missing", "empty", "schema"])
def test_unusable_databases_are_one_line_errors(tmp_path, db, capsys, which):
    path = tmp_path / "x.sqlite"
    if which == "empty":
        from wattscope.sweep.store import SweepStore

        SweepStore(path).close()
    elif which == "schema":
        with sqlite3.connect(db) as a, sqlite3.connect(path) as b:
            a.backup(b)
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    assert run(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wattscope analyze: error: ") and "Traceback" not in err and str(path) in err


def test_an_impossible_slice_is_an_error(db, capsys):
    assert run(["analyze", str(db), "--precision", "tf32"]) == 2
    assert "no results with precision=tf32" in capsys.readouterr().err


def test_figures_writes_three_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    db = synthetic_database(tmp_path / "small.sqlite", n_models=12, seed=1)  # small: drawing is the slow part
    out = tmp_path / "figs"
    assert run(["figures", str(db), "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["energy_vs_gmacs.png", "frontier.png", "method_savings.png"]
    for p in out.iterdir():
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert "wrote" in capsys.readouterr().out
