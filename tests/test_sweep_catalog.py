"""The sweep catalog: timm's tables parsed into units, name lookups, filters and presets."""

from __future__ import annotations

import csv
from importlib import resources

import pytest

from wattscope.sweep import catalog as cat
from wattscope.sweep.catalog import PRESETS, Catalog, Unit, UnknownModelError, family_of


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def _packaged_rows(name: str) -> list[dict[str, str]]:
    text = resources.files("wattscope.sweep").joinpath("data", name).read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines()))


def test_units_and_weights_match_the_tables(catalog):
    results = _packaged_rows(cat.RESULTS_FILE)
    bench = _packaged_rows(cat.BENCHMARK_FILE)
    pairs = {(r["model"].split(".")[0], int(r["img_size"])) for r in results}
    bench_pairs = {(r["model"], int(r["infer_img_size"])) for r in bench}
    assert len(catalog.units) == len(pairs | bench_pairs) == 1627
    assert len(catalog.measurable) == len(pairs) == 1193
    assert len({u.architecture for u in catalog.measurable}) == 900
    # every result row is attached once, to the unit of its architecture and size
    attached = [(w.name, u.img_size) for u in catalog.units for w in u.weights]
    assert len(attached) == len(set(attached)) == len(results) == 1556
    assert set(attached) == {(r["model"], int(r["img_size"])) for r in results}
    for u in catalog.units:
        assert all(w.name.split(".")[0] == u.architecture for w in u.weights)
        top1s = [w.top1 for w in u.weights]
        assert top1s == sorted(top1s, reverse=True)
    assert [u.key for u in catalog.units] == sorted(
        (u.key for u in catalog.units), key=lambda k: (k.rsplit("@")[0], int(k.rsplit("@")[1]))
    )


def test_unit_fields_come_from_the_benchmark_rows(catalog):
    r50 = catalog.get("resnet50", 224)
    row = next(
        r for r in _packaged_rows(cat.BENCHMARK_FILE) if r["model"] == "resnet50" and r["infer_img_size"] == "224"
    )
    dyn = next(
        r
        for r in _packaged_rows(cat.BENCHMARK_COMPILED_FILE)
        if r["model"] == "resnet50" and r["infer_img_size"] == "224"
    )
    assert r50.key == "resnet50@224"
    assert r50.family == "resnet"
    assert r50.param_count_m == float(row["param_count"])
    assert r50.gmacs == float(row["infer_gmacs"])
    assert r50.macts_m == float(row["infer_macts"])
    assert r50.rtx5090_images_per_s == float(row["infer_samples_per_sec"])
    assert r50.rtx5090_compiled_images_per_s == float(dyn["infer_samples_per_sec"])
    assert r50.rtx5090_batch_size == int(row["infer_batch_size"])
    expected = sorted(
        (r for r in _packaged_rows(cat.RESULTS_FILE) if r["model"].startswith("resnet50.") and r["img_size"] == "224"),
        key=lambda r: -float(r["top1"]),
    )
    assert len(r50.weights) == len(expected) > 5
    assert r50.best_top1 == float(expected[0]["top1"])
    assert r50.weights[0].crop_pct == float(expected[0]["crop_pct"])
    assert r50.weights[0].interpolation == expected[0]["interpolation"]


def test_param_count_with_a_thousands_comma_is_parsed(catalog):
    assert catalog.get("eva_giant_patch14_560", 560).param_count_m == pytest.approx(1014.45)
    assert cat._number("1,014.45") == pytest.approx(1014.45)
    assert cat._number("") is None
    # when the benchmark lacks a unit, the results' (quoted, comma) parameter count is used
    results = (
        "model,img_size,top1,top1_err,top5,top5_err,param_count,crop_pct,interpolation\n"
        'big_net.x_in1k,224,80.5,19.5,95.0,5.0,"1,234.50",0.9,bicubic\n'
    )
    bench = (
        "model,infer_img_size,infer_samples_per_sec,infer_step_time,infer_batch_size,param_count,infer_gmacs,"
        "infer_macts\n"
    )
    small = Catalog.from_tables(results, bench, bench, "model,pretrain\nbig_net,in21k\n")
    (unit,) = small.units
    assert unit.param_count_m == pytest.approx(1234.5)
    assert unit.gmacs is None and unit.rtx5090_images_per_s is None and unit.rtx5090_batch_size is None
    assert unit.weights[0].pretrain == "in21k"


def test_pretrain_only_where_the_metadata_is_unambiguous(catalog):
    # vit_tiny_patch16_224 has a single weight tag, and the legacy metadata says in21k
    assert [w.pretrain for w in catalog.get("vit_tiny_patch16_224", 224).weights] == ["in21k"]
    # resnet50 has many tags: nothing says which of them the legacy name meant
    assert {w.pretrain for w in catalog.get("resnet50", 224).weights} == {None}


@pytest.mark.parametrize(
    ("architecture", "family"),
    [
        ("resnet50d", "resnet"),
        ("vit_base_patch16_224", "vit"),
        ("efficientnet_b0", "efficientnet"),
        ("convnext_tiny", "convnext"),
        ("tf_efficientnet_b0", "efficientnet"),
        ("convnextv2_large", "convnextv2"),
        ("mobilenetv3_large_100", "mobilenetv3"),
        ("res2net50_14w_8s", "res2net"),
        ("cs3darknet_s", "cs3darknet"),
        ("eva02_base_patch14_448", "eva"),
        ("dm_nfnet_f0", "nfnet"),
        ("wide_resnet50_2", "resnet"),
        ("tiny_vit_5m_224", "tiny_vit"),
        ("regnety_040", "regnety"),
    ],
)
def test_family_of(architecture, family):
    assert family_of(architecture) == family


def test_every_unit_has_its_rule_family(catalog):
    assert all(u.family == family_of(u.architecture) for u in catalog.units)
    assert len(catalog.families) > 100


def test_get_by_architecture_weight_and_key(catalog):
    r50 = catalog.get("resnet50")
    assert r50.best_top1 == max(u.best_top1 for u in catalog.units if u.architecture == "resnet50" and u.weights)
    assert catalog.get("resnet50@160").img_size == 160
    tv = catalog.get("resnet50.tv_in1k")
    assert "resnet50.tv_in1k" in [w.name for w in tv.weights]
    # an architecture without an ImageNet result: its benchmark unit, with no weights
    aim = catalog.get("aimv2_1b_patch14_224")
    assert aim.weights == () and aim.best_top1 is None and aim.gmacs is not None


def test_unknown_model_lists_close_matches(catalog):
    with pytest.raises(UnknownModelError, match="resnet50") as e:
        catalog.get("resnt50")
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnknownModelError, match="vit_base_patch16_224"):
        catalog.get("vit_base_patch16_22")
    with pytest.raises(UnknownModelError, match="resnet50.a1_in1k"):
        catalog.get("resnet50.a1_in1kk")
    with pytest.raises(UnknownModelError, match="its sizes: 160, 176, 224, 288"):
        catalog.get("resnet50", 123)
    with pytest.raises(UnknownModelError, match="close matches: resnet50"):
        catalog.select(names=["resnet50", "resnt50"])


def test_select_defaults_to_every_measurable_unit(catalog):
    units = catalog.select()
    assert [u.key for u in units] == [u.key for u in catalog.measurable]
    assert all(u.weights for u in units)
    assert catalog.select(preset="paper") == units


def test_select_by_names(catalog):
    keys = [u.key for u in catalog.select(names=["resnet50", "densenet121.tv_in1k", "vit_tiny_patch16_224@224"])]
    resnet50_sizes = sorted(u.img_size for u in catalog.measurable if u.architecture == "resnet50")
    assert keys == ["densenet121@224"] + [f"resnet50@{s}" for s in resnet50_sizes] + ["vit_tiny_patch16_224@224"]
    # a weight evaluated at two sizes selects both of its units
    assert [u.key for u in catalog.select(names=["densenet121.ra_in1k"])] == ["densenet121@224", "densenet121@288"]
    # an explicit name may select a unit without ImageNet weights
    assert [u.key for u in catalog.select(names=["aimv2_1b_patch14_224"])] == ["aimv2_1b_patch14_224@224"]


def test_select_from_a_names_file(catalog, tmp_path):
    f = tmp_path / "models.txt"
    f.write_text("# my models\nresnet18  # small\n\nvit_tiny_patch16_224@224\n")
    assert [u.key for u in catalog.select(names_file=f, names=["resnet34@224"])] == [
        "resnet18@160",
        "resnet18@224",
        "resnet18@288",
        "resnet34@224",
        "vit_tiny_patch16_224@224",
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no model"):
        catalog.select(names_file=empty)


def test_select_filters_combine_with_and(catalog):
    units = catalog.select(families=["resnet", "vit"], params_m=(20, 30), img_size=224)
    assert units and all(u.family in {"resnet", "vit"} for u in units)
    assert all(20 <= u.param_count_m <= 30 and u.img_size == 224 for u in units)
    expected = [
        u
        for u in catalog.measurable
        if u.family in {"resnet", "vit"} and 20 <= u.param_count_m <= 30 and u.img_size == 224
    ]
    assert units == expected
    globbed = catalog.select(globs=["resnet5*", "convnext_t*"])
    assert {u.architecture for u in globbed} >= {"resnet50", "resnet50d", "convnext_tiny"}
    assert all(u.architecture.startswith(("resnet5", "convnext_t")) for u in globbed)
    assert {u.img_size for u in catalog.select(globs=["resnet50@2*"])} == {224, 288}
    top = catalog.select(families=["vit"], top_k=3)
    assert len(top) == 3
    best_vit = sorted((u.best_top1 for u in catalog.measurable if u.family == "vit"), reverse=True)[:3]
    assert sorted((u.best_top1 for u in top), reverse=True) == best_vit
    within_quick = catalog.select(preset="quick", families=["vit"])
    assert len(within_quick) == 1 and within_quick[0] in catalog.select(preset="quick")
    assert catalog.select(params_m=(None, 1.0)) == [u for u in catalog.measurable if u.param_count_m <= 1.0]


def test_select_says_which_filter_emptied_the_list(catalog):
    with pytest.raises(ValueError, match=r"after params_m=\(5000, None\)"):
        catalog.select(families=["resnet"], params_m=(5000, None))
    with pytest.raises(ValueError, match="after img_size=999"):
        catalog.select(img_size=999)
    with pytest.raises(ValueError, match="after globs nothing_like_this"):
        catalog.select(globs=["nothing_like_this*"])
    with pytest.raises(ValueError, match="after names"):
        catalog.select(preset="quick", names=["aimv2_1b_patch14_224"])
    with pytest.raises(ValueError, match="low bound is above"):
        catalog.select(params_m=(10, 1))
    with pytest.raises(ValueError, match="top_k"):
        catalog.select(top_k=0)


def test_unknown_preset_and_family_list_the_valid_ones(catalog):
    with pytest.raises(ValueError, match="paper, quick"):
        catalog.select(preset="fast")
    with pytest.raises(ValueError, match="valid families: .*convnext.*resnet"):
        catalog.select(families=["resnet", "resnett"])


def test_quick_preset_spans_families_and_sizes_within_its_compute_cap(catalog):
    quick = catalog.select(preset="quick")
    assert len(quick) == cat.QUICK_SIZE == 30
    assert len({u.family for u in quick}) == 30
    assert all(u.weights and u.img_size <= 288 and u.gmacs <= 50 and u.family != "test" for u in quick)
    # the largest families are all in it
    archs: dict[str, set[str]] = {}
    for u in catalog.measurable:
        archs.setdefault(u.family, set()).add(u.architecture)
    biggest = sorted(archs, key=lambda f: (-len(archs[f]), f))[:10]
    assert {f for f in biggest if f != "test"} <= {u.family for u in quick}
    # six per parameter-count quintile of the candidates: small and large models alike
    params = sorted(u.param_count_m for u in quick)
    assert params[0] < 8 and params[-1] > 150
    candidates = sorted(
        u.param_count_m for u in catalog.measurable if u.img_size <= 288 and u.gmacs <= 50 and u.family != "test"
    )
    edges = [candidates[len(candidates) * k // 5] for k in range(1, 5)]
    per_bin = [sum(1 for p in params if lo <= p < hi) for lo, hi in zip([0, *edges], [*edges, 1e9], strict=True)]
    assert all(4 <= n <= 8 for n in per_bin), per_bin


def test_quick_preset_is_deterministic(catalog):
    first = [u.key for u in catalog.select(preset="quick")]
    cat._load_packaged.cache_clear()
    fresh = Catalog.load()
    assert fresh is not catalog
    assert [u.key for u in fresh.select(preset="quick")] == first
    assert [u.key for u in Catalog(reversed(fresh.units)).select(preset="quick")] == first
    assert sorted(u.key for u in PRESETS["quick"].rule(fresh)) == sorted(first)


def test_package_data_keeps_its_attribution():
    readme = resources.files("wattscope.sweep").joinpath("data", "README.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in readme
    assert cat.SOURCE.rsplit("@", 1)[1] in readme
    assert "wattscope.sweep.catalog" in readme


def test_catalog_rejects_duplicate_units():
    unit = Unit("a", 224, "a", None, None, None, None, None, None, ())
    with pytest.raises(ValueError, match="share"):
        Catalog([unit, unit])
