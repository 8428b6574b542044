"""Savings of each method: the pairing rule, the interval of one pair, and the planted savings of the synthetic
database recovered per method and per family."""

from __future__ import annotations

import math

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("scipy")

from wattscope.analysis import (  # noqa: E402
    PLANTED,
    load_results,
    method_savings,
    method_savings_by_family,
    synthetic_database,
)


def row(
    unit="net@224", family="net", precision="fp32", batch=64, cl=False, comp=False, graphs=False, energy_j=1.0, ci_j=0.0
):
    key = f"bs{batch}-{precision}-cl{int(cl)}-comp{int(comp)}-graph{int(graphs)}-224"
    return {
        "gpu_uuid": "GPU-1",
        "gpu_name": "G",
        "unit_key": unit,
        "family": family,
        "config_img_size": 224,
        "config_key": key,
        "precision": precision,
        "batch_size": batch,
        "channels_last": cl,
        "compile": comp,
        "cuda_graphs": graphs,
        "energy_per_image_j": energy_j,
        "energy_per_image_ci95_j": ci_j,
    }


def test_pairs_differ_in_exactly_one_setting():
    df = pd.DataFrame(
        [
            row(energy_j=1.0, ci_j=0.01),
            row(precision="bf16", energy_j=0.5, ci_j=0.005),
            row(precision="bf16", cl=True, energy_j=0.4),
            row(precision="fp16", comp=True, energy_j=0.3),  # two settings from fp32: no pair with it
            row(batch=256, energy_j=0.8),
            row(batch=1, energy_j=4.0),
            row(unit="other@224", precision="bf16", energy_j=0.1),  # another model: never paired with net's rows
        ]
    )
    pairs = method_savings(df)
    assert sorted(pairs["method"]) == ["batch_1", "batch_256", "bf16", "channels_last"]
    bf16 = pairs[pairs["method"] == "bf16"].iloc[0]
    assert bf16["saving_frac"] == pytest.approx(0.5)
    half = math.hypot(0.01, 0.01)  # relative half-widths of the two energies, combined in log space
    assert bf16["ci95_low"] == pytest.approx(1 - 0.5 * math.exp(half))
    assert bf16["ci95_high"] == pytest.approx(1 - 0.5 * math.exp(-half))
    assert bf16["beyond_ci"] and bf16["from_config"].startswith("bs64-fp32") and bf16["n_models"] == 1
    cl = pairs[pairs["method"] == "channels_last"].iloc[0]
    assert cl["from_config"] == "bs64-bf16-cl0-comp0-graph0-224" and cl["saving_frac"] == pytest.approx(0.2)
    by_method = pairs.set_index("method")["saving_frac"]
    assert by_method["batch_1"] == pytest.approx(-3.0) and by_method["batch_256"] == pytest.approx(0.2)


def test_a_group_of_one_keeps_its_own_interval_and_many_use_the_spread():
    df = pd.DataFrame(
        [
            row(energy_j=1.0, ci_j=0.02),
            row(precision="bf16", energy_j=0.5, ci_j=0.01),
            row(unit="b@224", energy_j=1.0),
            row(unit="b@224", precision="bf16", energy_j=0.4),
            row(unit="c@224", family="other", energy_j=1.0),
            row(unit="c@224", family="other", precision="bf16", energy_j=0.6),
        ]
    )
    fam = method_savings_by_family(df).set_index("family")
    assert fam.loc["net", "n_models"] == 2 and fam.loc["other", "n_models"] == 1
    assert fam.loc["net", "saving_frac"] == pytest.approx(1 - math.sqrt(0.5 * 0.4))
    assert fam.loc["other", "ci95_low"] == pytest.approx(0.4) == fam.loc["other", "ci95_high"]
    logs = np.log([0.5, 0.4, 0.6])
    half = 4.302653 * logs.std(ddof=1) / math.sqrt(3)  # t(0.975, 2)
    assert fam.loc["all", "ci95_low"] == pytest.approx(1 - math.exp(logs.mean() + half), rel=1e-5)
    assert fam.loc["all", "helps"] and not fam.loc["all", "hurts"]
    assert list(method_savings_by_family(df)["family"])[-1] == "all"


def test_gpu_models_are_never_pooled():
    rows = []
    for gpu, bf16_j in (("G", 0.5), ("H", 0.8)):
        for unit in ("a@224", "b@224"):
            rows += [{**row(unit=unit), "gpu_name": gpu}, {**row(unit=unit, precision="bf16", energy_j=bf16_j),
                                                           "gpu_name": gpu}]
    fam = method_savings_by_family(pd.DataFrame(rows)).set_index(["gpu_name", "family"])
    assert len(fam) == 4  # net and all, per GPU
    assert fam.loc[("G", "all"), "saving_frac"] == pytest.approx(0.5) and fam.loc[("G", "all"), "n_models"] == 2
    assert fam.loc[("H", "net"), "saving_frac"] == pytest.approx(0.2) and fam.loc[("H", "net"), "n_models"] == 2


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return load_results(synthetic_database(tmp_path_factory.mktemp("methods") / "s.sqlite", n_models=40, seed=5))


def test_planted_savings_are_recovered(synthetic):
    overall = method_savings_by_family(synthetic)
    overall = overall[overall["family"] == "all"].set_index("method")
    assert set(overall.index) == set(PLANTED.savings)
    for method, planted in PLANTED.savings.items():
        got = overall.loc[method]
        if method == "channels_last":
            continue  # planted per family, checked below
        assert got["ci95_low"] <= planted <= got["ci95_high"], method
        assert got["saving_frac"] == pytest.approx(planted, abs=0.02 * max(1.0, abs(planted)))
    assert overall.loc["batch_1", "hurts"] and overall.loc["bf16", "helps"]


def test_channels_last_helps_the_families_it_was_planted_for(synthetic):
    pairs = method_savings(synthetic)
    cl = pairs[pairs["method"] == "channels_last"]
    expected = np.array([PLANTED.saving("channels_last", f) for f in cl["family"]])
    assert {0.0, PLANTED.savings["channels_last"]} == set(expected)
    np.testing.assert_allclose(cl["saving_frac"], expected, atol=5 * PLANTED.noise_log)
    inside = (cl["ci95_low"] <= expected) & (expected <= cl["ci95_high"])
    assert inside.mean() >= 0.8  # 95 % intervals, a handful of models
    fam = method_savings_by_family(synthetic)
    fam = fam[(fam["method"] == "channels_last") & (fam["family"] != "all")]
    planted = fam["family"].map(lambda f: PLANTED.saving("channels_last", f))
    assert (fam.loc[planted > 0, "helps"]).all()
    assert not fam.loc[planted == 0, "helps"].any()


def test_no_pairs_give_empty_tables():
    df = pd.DataFrame([row()])
    assert method_savings(df).empty and method_savings_by_family(df).empty
