"""keras-patch: memory-efficient patch-based inference for tiny CNNs on microcontrollers."""

import os

from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(HERE, "keras_patch", "_version.py")) as f:
    exec(f.read(), version)

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

# The portable C++ core of the KP_PATCH_STAGE kernel (tflm_ops/), built as a
# plain shared library that keras_patch/runtime/cpp_executor.py loads with ctypes
# (no Python headers needed; only a C++11 compiler).
KP_CORE_SOURCES = [
    "tflm_ops/flexbuffer_reader.cc",
    "tflm_ops/int8_arith.cc",
    "tflm_ops/patch_geometry.cc",
    "tflm_ops/patch_stage_core.cc",
    "tflm_ops/patch_stage_eval.cc",
    "tflm_ops/patch_stage_cmsis.cc",
    "tflm_ops/patch_stage_c_api.cc",
]
kp_core = Extension(
    "keras_patch._kp_core",
    sources=KP_CORE_SOURCES,
    include_dirs=["tflm_ops"],
    language="c++",
    extra_compile_args=["-std=c++11", "-fno-exceptions", "-fno-rtti", "-O2"],
)

setup(
    name="keras-patch",
    version=version["__version__"],
    description="Patch-based inference (MCUNetV2) for Keras models on TFLite Micro",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=find_packages(include=["keras_patch", "keras_patch.*"]),
    ext_modules=[kp_core],
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10",
        "keras-tuner>=1.4",
        "tensorboard",  # keras-tuner imports it in every trial with the TensorFlow backend
        "tf-keras>=2.21,<2.22",
        "tensorflow-model-optimization>=0.8",
        "numpy>=1.26",
        "absl-py",
        "ai-edge-litert>=2.0",
        "tflite-micro",
        "flatbuffers>=24.3",
        "matplotlib>=3.8",
        "tqdm",
    ],
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100"]},
    entry_points={"console_scripts": ["keras-patch=keras_patch.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Software Development :: Embedded Systems",
    ],
)
