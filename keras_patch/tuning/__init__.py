"""Joint search of architecture and patch schedule under SRAM/flash budgets, with keras-tuner.

* `PatchSearchSpace` / `PatchHyperModel`: MCUNet-style inverted-residual
  backbones (resolution, width, per-stage depth / expand ratio / kernel,
  where the patch stage ends, its grid, receptive-field redistribution).
* `PatchRandomSearch`, `PatchBayesianOptimization`, `PatchHyperband`
  (`BudgetMixin` on keras-tuner's tuners): `sram_bytes=` / `flash_bytes=`
  budgets measured on the int8 graph before training; over-budget trials are
  recorded with their numbers and never trained. `results_table()`,
  `plot_pareto()`, a progress bar.
* `redistribute` / `compare_redistribution`: MCUNetV2's receptive-field
  redistribution and its MAC overhead before and after.
* `quantization_aware_finetune`: QAT of the best model (tfmot, run in a
  tf_keras worker process), exported patched and checked bit for bit.

See docs/tuning.md and examples/tune_vww.py.
"""

from keras_patch.tuning.architecture import ArchSpec, StageSpec, build_backbone, build_model, receptive_field
from keras_patch.tuning.budget import BudgetReport, measure_model
from keras_patch.tuning.qat import QATResult, quantization_aware_finetune
from keras_patch.tuning.redistribution import compare_redistribution, redistribute
from keras_patch.tuning.results import TrialResult, format_results_table, pareto_front, plot_pareto
from keras_patch.tuning.space import PatchHyperModel, PatchSearchSpace, resize_images
from keras_patch.tuning.tuner import BudgetMixin, PatchBayesianOptimization, PatchHyperband, PatchRandomSearch

__all__ = [
    "ArchSpec",
    "BudgetMixin",
    "BudgetReport",
    "PatchBayesianOptimization",
    "PatchHyperModel",
    "PatchHyperband",
    "PatchRandomSearch",
    "PatchSearchSpace",
    "QATResult",
    "StageSpec",
    "TrialResult",
    "build_backbone",
    "build_model",
    "compare_redistribution",
    "format_results_table",
    "measure_model",
    "pareto_front",
    "plot_pareto",
    "quantization_aware_finetune",
    "receptive_field",
    "redistribute",
    "resize_images",
]
