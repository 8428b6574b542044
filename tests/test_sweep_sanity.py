"""bench/sweep_sanity.py on a tiny sweep file: throughput ratios against timm's table, outliers and their
explanations, the CI list, and the precision and channels_last pairs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")

from wattscope.sweep.catalog import Catalog  # noqa: E402
from wattscope.sweep.store import Config, FailureRow, ResultRow, RunInfo, SweepStore  # noqa: E402

GPU = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
RUN = "a" * 32
# bf16 / RTX 5090 throughput ratios: median 1.0, so 0.3, 0.4 and 2.5 are outliers (beyond 2x either way).
RATIOS = {
    "levit_conv_128s@224": 0.3,
    "dla34@224": 0.4,
    "resnet50d@288": 0.9,
    "deit3_small_patch16_224@224": 1.0,
    "convnext_femto_ols@288": 1.1,
    "regnetz_c16@256": 1.2,
    "coat_tiny@224": 2.5,
}


@pytest.fixture(scope="module")
def sanity():
    path = Path(__file__).resolve().parents[1] / "bench" / "sweep_sanity.py"
    spec = importlib.util.spec_from_file_location("sweep_sanity", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _row(
    catalog: Catalog, key: str, precision: str, minute: int, *, channels_last: bool = False, **fields
) -> ResultRow:
    u = catalog.get(key)
    values = dict(
        energy_per_image_j=0.1,
        energy_per_image_above_idle_j=0.08,
        energy_per_image_ci95_j=0.001,
        images_per_s=1000.0,
        latency_per_batch_ms=64.0,
        mean_power_w=470.0,
        idle_power_w=70.0,
        peak_power_w=600.0,
        peak_memory_bytes=None,
        sm_clock_mhz=1980.0,
        temperature_c=50.0,
        sensor_source="samples",
        sensor_profile="test",
        n_trials=3,
        window_s=1.6,
        warmup_s=2.0,
        measure_s=7.0,
        wall_s=9.0,
        energy_uncertainty_j=0.01,
        coverage=1.0,
        measured_utc=f"2026-11-24T15:{minute:02d}:00+00:00",
    )
    values.update(fields)
    return ResultRow(
        run_id=RUN,
        unit_key=u.key,
        architecture=u.architecture,
        img_size=u.img_size,
        config=Config(64, precision, channels_last, False, False, u.img_size),
        gpu_uuid=GPU,
        gpu_name="NVIDIA H100 80GB HBM3",
        **values,
    )


@pytest.fixture(scope="module")
def report(sanity, tmp_path_factory):
    catalog = Catalog.load()
    db = tmp_path_factory.mktemp("sanity") / "sweep.sqlite"
    rows = []
    for i, (key, ratio) in enumerate(RATIOS.items()):
        fields = {"images_per_s": ratio * catalog.get(key).rtx5090_images_per_s, "warmup_s": 5.0, "wall_s": 12.0}
        if key == "levit_conv_128s@224":  # low power, wide CI: the host bounds it
            fields.update(mean_power_w=170.0, energy_per_image_ci95_j=0.005, n_trials=6)
        rows.append(_row(catalog, key, "bf16", 2 * i, **fields))
    # fp32 after bf16 in the same run (so bf16 carries the model build): energy ratios bf16/fp32 0.5 and 0.25
    rows.append(_row(catalog, "resnet50d@288", "fp32", 20, energy_per_image_j=0.2))
    rows.append(_row(catalog, "dla34@224", "fp32", 21, energy_per_image_j=0.4))
    # channels_last: 10 % less energy, far beyond the CIs
    rows.append(_row(catalog, "resnet50d@288", "bf16", 22, channels_last=True, energy_per_image_j=0.09))
    with SweepStore(db) as store:
        gpu = ("NVIDIA H100 80GB HBM3", GPU, "580.159.04", "13.0", "2.11.0", None, "0.1.0")
        store.start_run(RunInfo(RUN, "2026-11-24T14:59:00+00:00", "host", *gpu, "wattscope sweep", "{}"))
        for r in rows:
            store.add_result(r)
        u = catalog.get("vit_tiny_patch16_224@224")
        config = Config(64, "fp32", False, False, False, u.img_size)
        failure = FailureRow(RUN, u.key, u.architecture, u.img_size, config, GPU, "oom", "out of memory", 3.0, "")
        store.add_failure(failure)
    return sanity.analyse(*sanity.load(db, catalog)), sanity


def test_ratios_outliers_and_their_explanations(report):
    s, sanity = report
    t = s.throughput.set_index("unit_key")
    assert t["ratio"].to_dict() == pytest.approx(RATIOS)
    assert s.median_ratio == pytest.approx(1.0)
    assert list(s.throughput["unit_key"]) == list(RATIOS)  # sorted by ratio
    assert set(t.index[t["outlier"]]) == {"levit_conv_128s@224", "dla34@224", "coat_tiny@224"}
    levit = t.loc["levit_conv_128s@224", "explanation"]
    assert levit.startswith("likely host/launch-bound at bs64 (timm: bs1024)")
    assert "power above idle 100 W = 25% of the median row's" in levit
    assert "CI 5.0% after 6 trials" in levit
    # a low ratio with normal power, a narrow CI and bf16 faster than fp32: nothing in its columns explains it
    assert t.loc["dla34@224", "explanation"] == "unexplained"
    assert t.loc["coat_tiny@224", "explanation"] == "unexplained"
    assert t.loc["resnet50d@288", "explanation"] == ""
    text = sanity.render(s, "test.sqlite")
    assert "Median ratio 1.000 over 7 models" in text and "Outliers: 3" in text
    assert "1 failures.\n- vit_tiny_patch16_224@224 bs64-fp32-cl0-comp0-graph0-224: oom" in text


def test_ci_list_speed_and_pairs(report):
    s, _ = report
    assert list(s.wide_ci["unit_key"]) == ["levit_conv_128s@224"]
    assert s.median_wall_s == pytest.approx(12.0)  # 7 bf16 rows at 12 s, 3 others at 9 s
    build = s.build_warmup.set_index("row")
    assert build.loc["first of its worker (model build)", "rows"] == 7
    assert build.loc["other", "median warmup_s"] == pytest.approx(2.0)
    prec = s.precision.set_index("unit_key")["energy_ratio"]
    assert prec.to_dict() == pytest.approx({"resnet50d@288": 0.5, "dla34@224": 0.25})
    cl = s.channels_last.set_index("unit_key")
    assert cl.loc["resnet50d@288", "energy_ratio"] == pytest.approx(0.9)
    assert bool(cl.loc["resnet50d@288", "beyond_ci"])
    assert len(cl) == 1
