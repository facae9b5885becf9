"""KP_PATCH_STAGE through the portable C++ kernel core (tflm_ops/), on the host.

The core is the code the TFLM kernel runs (`tflm_ops/patch_stage.cc` is
only glue around it); `setup.py` builds it as the shared library
`keras_patch/_kp_core*.so`, loaded here with ctypes.  `CppStage` does what
the kernel's Prepare does (parse and validate the options bytes, compute the
requantization parameters, plan the patch arena) and its `run` what Eval
does, into buffers allocated once here.  Results are bit-identical to the
reference executor (`keras_patch.stage.executor`).

Example:

>>> from keras_patch.stage import options as o
>>> opts = o.StageOptions(grid=(2, 2), tensor_shapes=[(6, 6, 1), (6, 6, 1)],
...     tensor_scales=[0.1, 0.1], tensor_zero_points=[0, 0],
...     layers=[o.LayerOptions(op=o.OP_MAX_POOL_2D, inputs=(0, -1), kernel=(3, 3), pad=(1, 1))])
>>> stage = CppStage(o.encode_options(opts), [None])
>>> import numpy as np
>>> int(stage.run(np.arange(36, dtype=np.int8).reshape(1, 6, 6, 1))[0, 0, 0, 0])
7
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.machinery
import os
import sys
from typing import List, Optional, Sequence

import numpy as np

from keras_patch.errors import InvalidOptionsError
from keras_patch.stage import geometry
from keras_patch.stage.executor import ConstantTensor

_ERR_SIZE = 1024
_TYPE_CODES = {np.dtype(np.int8): 1, np.dtype(np.int32): 2}


class _ConstTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int32),
        ("num_dims", ctypes.c_int32),
        ("dims", ctypes.c_int32 * 4),
        ("num_scales", ctypes.c_int32),
        ("scales", ctypes.POINTER(ctypes.c_float)),
        ("data", ctypes.c_void_p),
    ]


def library_path() -> Optional[str]:
    """Path of the built core (`keras_patch/_kp_core*.so`), or None.

    Looks next to this file first (`build_ext --inplace`, editable installs),
    then in every `keras_patch/` on sys.path: a source checkout imported from
    the working directory may shadow the `pip install .`ed package that holds
    the library.
    """
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # keras_patch/
    dirs = [here] + [os.path.join(p or os.getcwd(), "keras_patch") for p in sys.path]
    for d in dirs:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(d, "_kp_core" + suffix)
            if os.path.exists(path):
                return path
        found = sorted(glob.glob(os.path.join(d, "_kp_core*.so")))
        if found:
            return found[0]
    return None


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """The C++ core; raises ImportError with build instructions if it is not built."""
    path = library_path()
    if path is None:
        raise ImportError(
            "keras_patch._kp_core (the C++ KP_PATCH_STAGE core) is not built: run "
            "`pip install .` or `python setup.py build_ext --inplace` (needs a C++11 compiler)."
        )
    lib = ctypes.CDLL(path)
    c_err = [ctypes.c_char_p, ctypes.c_size_t]
    lib.kp_stage_persistent_bytes.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int32, ctypes.POINTER(ctypes.c_size_t)] + c_err
    lib.kp_stage_prepare.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_ConstTensor), ctypes.c_int32,
        ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint32)] + c_err
    lib.kp_stage_check_io.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int32, ctypes.c_int32,
        ctypes.POINTER(ctypes.c_int32), ctypes.c_float, ctypes.c_int32] + c_err
    lib.kp_stage_eval.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_ConstTensor),
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t] + c_err
    lib.kp_stage_eval_ctx.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_ConstTensor),
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t] + c_err
    lib.kp_stage_buffers.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_int32, ctypes.POINTER(ctypes.c_int32)]
    lib.kp_cmsis_nn_enabled.argtypes = []
    lib.kp_stage_arena_plan.argtypes = [
        ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int32), ctypes.c_int32]
    lib.kp_stage_save_plan.argtypes = lib.kp_stage_arena_plan.argtypes
    lib.kp_option_key.restype = ctypes.c_char_p
    lib.kp_option_key.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.kp_quantize_multiplier.argtypes = [
        ctypes.c_double, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int32)]
    lib.kp_multiply_by_quantized_multiplier.restype = ctypes.c_int32
    lib.kp_multiply_by_quantized_multiplier.argtypes = [ctypes.c_int32] * 3
    for name in ("kp_stage_persistent_bytes", "kp_stage_prepare", "kp_stage_check_io",
                 "kp_stage_eval", "kp_stage_eval_ctx", "kp_stage_buffers",
                 "kp_cmsis_nn_enabled",
                 "kp_stage_arena_plan", "kp_stage_save_plan", "kp_num_option_keys"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def cmsis_nn_enabled() -> bool:
    """True when the loaded core was built with -DCMSIS_NN (never for the host build)."""
    return bool(load_library().kp_cmsis_nn_enabled())


def is_available() -> bool:
    try:
        load_library()
    except (ImportError, OSError):
        return False
    return True


def option_keys() -> dict:
    """key -> (type, length) as the C++ core's table lists them."""
    lib = load_library()
    keys = {}
    for i in range(lib.kp_num_option_keys()):
        name, kind, length = (lib.kp_option_key(i, f).decode() for f in range(3))
        keys[name] = (kind, length)
    return keys


def persistent_bytes(options: bytes, num_op_inputs: int = -1) -> int:
    """Parses and validates options bytes (no weights); returns the persistent bytes needed.

    Raises:
        InvalidOptionsError: naming the options key at fault.
    """
    lib = load_library()
    data = bytes(options)
    err = ctypes.create_string_buffer(_ERR_SIZE)
    size = ctypes.c_size_t()
    if lib.kp_stage_persistent_bytes(data, len(data), num_op_inputs, ctypes.byref(size), err, _ERR_SIZE):
        raise InvalidOptionsError(_error(err))
    return int(size.value)


def _error(err) -> str:
    return err.value.decode("utf-8", "replace") or "KP_PATCH_STAGE: unknown error"


class CppStage:
    """A KP_PATCH_STAGE prepared by the C++ core: `run` executes it patch by patch.

    Args:
        options: the op's custom options (FlexBuffer bytes).
        op_inputs: as for `executor.prepare_stage`: `op_inputs[0]` stands for
            the stage input (ignored), `op_inputs[i]` for the constant
            filters and biases.
        io: optional (input 0, output 0) of the op, each with `dtype`,
            `shape`, `scale` and `zero_point` as the kernel sees them
            (`patchify.kernel_tensor_view`): checked with `check_io` after
            the core's Prepare and before the patch arena is allocated, as
            the TFLM kernel's Prepare does.

    Raises:
        InvalidOptionsError: the core's message, naming the options key.
    """

    def __init__(self, options: bytes, op_inputs: Sequence[Optional[ConstantTensor]],
                 io: Optional[Sequence] = None):
        self._lib = load_library()
        self._options = bytes(options)
        n = len(op_inputs)
        self._keep: List[np.ndarray] = []  # arrays the C structs point into
        self._inputs = (_ConstTensor * max(n, 1))()
        for i, tensor in enumerate(op_inputs):
            if i == 0 or tensor is None:
                continue
            data = np.ascontiguousarray(tensor.data)
            scales = np.ascontiguousarray(np.asarray(tensor.scales, np.float32).reshape(-1))
            self._keep += [data, scales]
            entry = self._inputs[i]
            entry.type = _TYPE_CODES.get(data.dtype, 0)
            entry.num_dims = data.ndim
            for d in range(min(data.ndim, 4)):
                entry.dims[d] = int(data.shape[d])
            entry.num_scales = scales.size
            entry.scales = scales.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.data = data.ctypes.data
        err = ctypes.create_string_buffer(_ERR_SIZE)
        size = ctypes.c_size_t()
        if self._lib.kp_stage_persistent_bytes(self._options, len(self._options), n,
                                               ctypes.byref(size), err, _ERR_SIZE):
            raise InvalidOptionsError(_error(err))
        self._persistent = np.zeros(max(size.value // 8 + 1, 1), np.int64)  # 8-byte aligned
        arena = ctypes.c_uint32()
        if self._lib.kp_stage_prepare(self._options, len(self._options), self._inputs, n,
                                      self._persistent.ctypes.data, self._persistent.nbytes,
                                      ctypes.byref(arena), err, _ERR_SIZE):
            raise InvalidOptionsError(_error(err))
        self.num_op_inputs = n
        for is_output, tensor in enumerate(io or ()):
            self.check_io(bool(is_output), tensor.dtype, tensor.shape, tensor.scale, tensor.zero_point)
        #: The scratch buffers the TFLM kernel's Prepare requests with this build of the core
        #: (`stage_buffers()`); `run` allocates exactly these.
        self.buffers = self.stage_buffers()
        sizes = {b.name: b.bytes for b in self.buffers}
        #: The patch arena P (`kp_stage_prepare`).
        self.arena_bytes = int(arena.value)
        if sizes.get(geometry.PATCH_ARENA, 0) != self.arena_bytes:
            raise AssertionError("kp_stage_buffers disagrees with kp_stage_prepare on the patch arena")
        self._arena = np.zeros(max(self.arena_bytes, 1), np.uint8)
        #: The CMSIS-NN context Q: 0 unless the core was built with -DCMSIS_NN.
        self.context_bytes = sizes.get(geometry.CMSIS_NN_CONTEXT, 0)
        self._context = np.zeros(max(self.context_bytes // 4 + 1, 1), np.int32)  # 4-byte aligned
        from keras_patch.stage.options import decode_options  # shapes for run()

        self.options = decode_options(self._options)

    def stage_buffers(self, cmsis_nn: Optional[bool] = None) -> tuple:
        """The scratch buffers of the prepared stage, in request order (C++ `KpStageBuffers`).

        A tuple of `geometry.StageBuffer`, the C++ twin of
        `geometry.stage_buffers(options, kernel)`.  `cmsis_nn`: the list of a
        build with (True) or without (False) the CMSIS-NN fast path; default:
        this build's (`cmsis_nn_enabled()`).  The context is computed only by
        a core built with -DCMSIS_NN (0 bytes, so not listed, otherwise).
        """
        if cmsis_nn is None:
            cmsis_nn = bool(self._lib.kp_cmsis_nn_enabled())
        capacity = len(geometry.STAGE_BUFFER_NAMES)
        kinds = (ctypes.c_int32 * capacity)()
        sizes = (ctypes.c_uint32 * capacity)()
        count = ctypes.c_int32()
        if self._lib.kp_stage_buffers(self._persistent.ctypes.data, int(bool(cmsis_nn)), kinds, sizes,
                                      capacity, ctypes.byref(count)):
            raise AssertionError("kp_stage_buffers failed")
        return tuple(geometry.StageBuffer(geometry.STAGE_BUFFER_NAMES[kinds[i]], int(sizes[i]))
                     for i in range(count.value))

    def arena_plan(self) -> tuple:
        """(offsets, sizes) per stage tensor, as the core planned the patch arena."""
        n = self.options.num_layers + 1
        offsets = (ctypes.c_int32 * n)()
        sizes = (ctypes.c_int32 * n)()
        if self._lib.kp_stage_arena_plan(self._persistent.ctypes.data, offsets, sizes, n):
            raise AssertionError("kp_stage_arena_plan failed")
        return list(offsets), list(sizes)

    def save_plan(self) -> tuple:
        """(offsets, sizes) per layer of the in-place save buffers (offset -1: not in place)."""
        n = self.options.num_layers
        offsets = (ctypes.c_int32 * n)()
        sizes = (ctypes.c_int32 * n)()
        if self._lib.kp_stage_save_plan(self._persistent.ctypes.data, offsets, sizes, n):
            raise AssertionError("kp_stage_save_plan failed")
        return list(offsets), list(sizes)

    def check_io(self, is_output: bool, dtype, shape, scale: float, zero_point: int) -> None:
        """The adapter's Prepare check of the op's input / output tensor."""
        dims = (ctypes.c_int32 * 4)(*[int(np.int64(d).astype(np.int32)) for d in tuple(shape)[:4]])
        zero_point = int(np.int64(zero_point).astype(np.int32))  # TfLiteQuantizationParams' int32
        err = ctypes.create_string_buffer(_ERR_SIZE)
        if self._lib.kp_stage_check_io(self._persistent.ctypes.data, int(is_output),
                                       _TYPE_CODES.get(np.dtype(dtype), 0), len(shape), dims,
                                       float(np.float32(scale)), zero_point, err, _ERR_SIZE):
            raise InvalidOptionsError(_error(err))

    def run(self, inputs: np.ndarray, aliased: Optional[bool] = None) -> np.ndarray:
        """(N, H, W, C) int8 -> (N, H', W', C') int8, one Eval per sample.

        `aliased=True` passes one buffer as both input and output (as an
        offline memory plan that aliases them does); only a one-layer in-place
        stage (docs "In place") may run so.  Default: aliased exactly for those.
        """
        from keras_patch.arena.aliases import in_place_stage

        if aliased is None:
            aliased = in_place_stage(self.options)
        if aliased and not in_place_stage(self.options):
            raise ValueError("only a one-layer in-place DEPTHWISE_CONV_2D stage may share its input and output.")
        inputs = np.asarray(inputs)
        expected = tuple(self.options.input_shape)
        if inputs.dtype != np.int8 or inputs.ndim != 4 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(
                f"KP_PATCH_STAGE input must be int8 of shape (N, {expected[0]}, {expected[1]}, "
                f"{expected[2]}), got {inputs.dtype} {inputs.shape}."
            )
        inputs = np.ascontiguousarray(inputs)
        outputs = np.empty((inputs.shape[0], *self.options.output_shape), np.int8)
        err = ctypes.create_string_buffer(_ERR_SIZE)
        out_bytes = outputs[0].nbytes
        for n in range(inputs.shape[0]):
            if aliased:  # one buffer, input first, output written over it
                shared = np.zeros(max(inputs[n].nbytes, out_bytes), np.int8)
                shared[:inputs[n].nbytes] = inputs[n].reshape(-1)
                src = dst = shared.ctypes.data
            else:
                src, dst = inputs[n].ctypes.data, outputs[n].ctypes.data
            if self._lib.kp_stage_eval_ctx(self._persistent.ctypes.data, src, dst, self._inputs,
                                           self.num_op_inputs, self._arena.ctypes.data, self._arena.nbytes,
                                           self._context.ctypes.data, self._context.nbytes, err, _ERR_SIZE):
                raise RuntimeError(_error(err))
            if aliased:
                outputs[n] = shared[:out_bytes].reshape(outputs[n].shape)
        return outputs
