"""`wattscope quickstart`: sweeps and serves where it can measure, serves the shipped results elsewhere."""

from __future__ import annotations

import pytest

from wattscope import cli, quickstart


def test_without_a_gpu_it_says_why_and_serves_the_shipped_results(monkeypatch, capsys):
    calls: list[list[str]] = []
    real_main = cli.main
    monkeypatch.setattr(quickstart, "why_not_measure", lambda: "NVML sees no GPU")
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append(argv) or 0)
    assert real_main(["quickstart", "--no-browser", "--port", "8123"]) == 0
    assert calls == [["serve", "--port", "8123", "--no-browser"]]  # no DB: the shipped H100 results
    assert "not measuring: NVML sees no GPU" in capsys.readouterr().err


def test_with_a_gpu_it_sweeps_then_serves_what_it_measured(monkeypatch, tmp_path):
    calls: list[list[str]] = []
    real_main = cli.main
    monkeypatch.setattr(quickstart, "why_not_measure", lambda: None)
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append(argv) or 0)
    db = str(tmp_path / "mine.sqlite")
    assert real_main(["quickstart", "--db", db, "--no-browser"]) == 0
    assert calls[0][:3] == ["sweep", "--preset", "quick"] and calls[0][-2:] == ["--db", db]
    assert calls[1] == ["serve", "--port", "8050", "--no-browser", db]


@pytest.mark.parametrize("status", [1, 2, 130])
def test_a_failed_sweep_is_not_followed_by_serve(monkeypatch, status):
    calls: list[list[str]] = []
    real_main = cli.main
    monkeypatch.setattr(quickstart, "why_not_measure", lambda: None)
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append(argv) or status)
    assert real_main(["quickstart"]) == status
    assert len(calls) == 1


def test_this_machine_has_a_reason_not_to_measure():
    # CI and the dev machines have no NVIDIA GPU (and no timm): the check must say so rather than try to sweep.
    pytest.importorskip("wattscope._core")
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: nothing to check here")
    reason = quickstart.why_not_measure()
    assert isinstance(reason, str) and reason
