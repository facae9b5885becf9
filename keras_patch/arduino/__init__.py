"""Arduino support: the generated `arduino/KerasPatch` library and sketch export.

* `library`: generates `arduino/KerasPatch/src` etc. from `tflm_ops/`
  (`python -m keras_patch.arduino sync|check`).
* `boards`: flash/RAM budgets of supported boards.
* `resolver`: the `MicroMutableOpResolver` calls a model needs.
* `arena`: the tensor arena a model needs on a 32-bit MCU, and why.
* `sketch`: `export_sketch`, behind `keras-patch export-arduino`.
* `examples`: the PersonDetection and MemoryReport sketches
  (`export-arduino --sketch person-detection|memory-report`).

Example:

>>> from keras_patch.arduino import export_sketch
>>> export_sketch("patched.tflite", "MySketch", board="nano33ble")  # doctest: +SKIP
"""

from keras_patch.arduino.boards import BOARDS, Board, get_board


def __getattr__(name):
    # The sketch exporter imports TensorFlow; load it only when asked for, so
    # `python -m keras_patch.arduino sync` stays fast.
    if name in ("BoardBudgetError", "SketchResult", "export_sketch"):
        from keras_patch.arduino import sketch

        return getattr(sketch, name)
    raise AttributeError(f"module 'keras_patch.arduino' has no attribute '{name}'")


__all__ = ["BOARDS", "Board", "BoardBudgetError", "SketchResult", "export_sketch", "get_board"]
