"""Graph passes that shrink TFLM's arena without changing a single output bit.

Each pass rewrites a `TFLiteModel` in place and has one job:

* `int8_input`: the model takes int8 input instead of float + QUANTIZE;
* `fold_pad`: no PAD op materializes a padded copy;
* `in_place`: depthwise convolutions (and patch arenas) write over their input;
* `offline_plan`: the model carries TFLM's `OfflineMemoryAllocation` plan.

`keras_patch.graph.passes.pipeline` runs them in that order.
"""
