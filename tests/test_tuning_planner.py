"""keras_patch.tuning with the planner: schedule="planner", measure_model(planner=True), never worse."""

import keras_tuner
import pytest

from keras_patch.arena.profiler import profile
from keras_patch.datasets import person_dataset
from keras_patch.errors import KerasPatchError
from keras_patch.tuning import (
    ArchSpec,
    BudgetReport,
    PatchHyperModel,
    PatchRandomSearch,
    PatchSearchSpace,
    StageSpec,
    build_model,
    measure_model,
)

TINY_STAGES = (StageSpec(16, 1, 1, expand=1), StageSpec(24, 1, 2), StageSpec(32, 1, 2))
ARCH = ArchSpec(resolution=48, width=0.35, stages=TINY_STAGES, patch_stages=0)


def test_planner_space_leaves_the_stages_to_the_planner():
    space = PatchSearchSpace(resolutions=(48,), widths=(0.35,), stages=TINY_STAGES, num_stages=3, schedule="planner",
                             max_mac_overhead=1.3)
    hp = keras_tuner.HyperParameters()
    spec = space.spec(hp)
    assert spec.patch_stages == 0
    assert not {"patch_stages", "grid", "redistribute"} & set(hp.values)
    assert PatchHyperModel(space).measure_options() == {"planner": True, "max_mac_overhead": 1.3}
    assert PatchHyperModel(PatchSearchSpace()).measure_options() == {}
    with pytest.raises(KerasPatchError, match="schedule='planned'"):
        PatchSearchSpace(schedule="planned")
    with pytest.raises(KerasPatchError, match="max_mac_overhead=0.9"):
        PatchSearchSpace(schedule="planner", max_mac_overhead=0.9)


@pytest.fixture(scope="module")
def lowest():
    """ARCH measured with the planner and no budget: its lowest head within MAC overhead 1.3."""
    return measure_model(build_model(ARCH), planner=True, max_mac_overhead=1.3)


def test_measure_model_with_the_planner(lowest):
    plan = lowest.plan
    assert plan is not None and not plan.is_empty
    assert lowest.patch_stages == len(plan.stages) >= 1
    assert lowest.peak_sram_bytes == plan.peak_bytes == profile(lowest.tflite).patched_peak_bytes
    assert lowest.peak_sram_bytes < lowest.layer_by_layer_sram_bytes == plan.layer_by_layer_peak_bytes
    assert lowest.patched_macs == plan.patched_macs and 0 < lowest.mac_overhead <= 0.3 + 1e-9
    assert lowest.fits and lowest.metrics()["patch_stages"] == lowest.patch_stages
    assert lowest.to_dict()["plan"]["stages"]


def test_planner_under_a_budget(lowest):
    between = (lowest.peak_sram_bytes + lowest.layer_by_layer_sram_bytes) // 2
    fitted = measure_model(build_model(ARCH), sram_bytes=between, planner=True, max_mac_overhead=1.3)
    assert fitted.fits and fitted.peak_sram_bytes <= between
    assert fitted.patched_macs <= lowest.patched_macs  # the fewest MACs among plans that fit
    too_small = measure_model(build_model(ARCH), sram_bytes=lowest.peak_sram_bytes - 1, planner=True,
                              max_mac_overhead=1.3)
    assert not too_small.fits and too_small.peak_sram_bytes == lowest.peak_sram_bytes
    assert f"peak SRAM {lowest.peak_sram_bytes:,} B > budget" in too_small.reason
    roomy = measure_model(build_model(ARCH), sram_bytes=lowest.layer_by_layer_sram_bytes, planner=True)
    assert roomy.fits and roomy.patch_stages == 0 and roomy.patched_macs == roomy.macs  # no recompute needed


def test_planner_refuses_a_model_with_patch_stages():
    staged = ArchSpec(resolution=32, width=0.25, stages=TINY_STAGES, patch_stages=1, grid=(2, 2))
    with pytest.raises(KerasPatchError, match="PatchStage"):
        measure_model(build_model(staged), planner=True)


def test_a_schedule_above_layer_by_layer_is_not_feasible():
    common = dict(layer_by_layer_sram_bytes=20_000, model_bytes=1, flash_bytes=1, macs=10, patched_macs=12,
                  patch_stages=1)
    worse = BudgetReport(peak_sram_bytes=25_000, **common)
    assert not worse.fits and worse.metrics()["feasible"] == 0.0
    assert "25,000 B, above the 20,000 B layer by layer" in worse.reason and "schedule='planner'" in worse.reason
    assert BudgetReport.from_metrics(worse.metrics()).reason == worse.reason  # as the distributed chief sees it
    assert BudgetReport(peak_sram_bytes=25_000, allow_worse=True, **common).fits
    assert BudgetReport(peak_sram_bytes=20_000, **common).fits


def test_search_with_the_planner(tmp_path):
    space = PatchSearchSpace(resolutions=(32, 48), widths=(0.35,), stages=TINY_STAGES, num_stages=3, depths=(1,),
                             expand_ratios=(3,), kernel_sizes=(3,), schedule="planner", max_mac_overhead=1.3)
    x, y = person_dataset(32, seed=3, image_size=48)
    tuner = PatchRandomSearch(PatchHyperModel(space), max_trials=2, sram_bytes=256 * 1024, seed=1, progress=False,
                              directory=str(tmp_path), project_name="planner")
    tuner.search(x, y, validation_data=(x, y), epochs=1, batch_size=16, verbose=0)
    results = tuner.results()
    assert sorted(r.hyperparameters["resolution"] for r in results) == [32, 48]
    table = tuner.results_table().splitlines()
    assert "stages" in table[0].split() and "no PatchStage" in table[1]
    for r in results:
        assert r.status == "trained"
        assert 0 < r.peak_sram_bytes <= r.metrics["layer_by_layer_sram_bytes"]
        assert r.metrics["mac_overhead"] <= 0.3 + 1e-9
