"""sphere_fast: fused kernels and a drop-in model for the Sphere Encoder image generator.

torch is deliberately not a build requirement: the C++/CUDA extensions in csrc/ are compiled on first
use (torch.utils.cpp_extension.load with ninja), against whatever torch the user has installed.
"""

from pathlib import Path

from setuptools import setup

setup(
    name="sphere_fast",
    version="0.2.0",
    description="Fused Triton/CUDA kernels and a drop-in model for the Sphere Encoder image generator",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    classifiers=["Operating System :: POSIX :: Linux", "Programming Language :: Python :: 3"],
    python_requires=">=3.11",
    packages=["sphere_fast", "sphere_fast.ops", "sphere_fast.nn", "sphere_fast.kernels", "sphere_fast.csrc"],
    package_dir={"sphere_fast.kernels": "kernels", "sphere_fast.csrc": "csrc"},
    package_data={"sphere_fast": ["presets.json", "py.typed"], "sphere_fast.csrc": ["*.h", "*.cuh", "*.cpp", "*.cu"]},
    install_requires=["torch>=2.11", "numpy", "ninja", "safetensors", "tqdm", "pillow>=9.1", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": [
            "triton==3.6.0",
            "numpy<2.4",
            "pytest>=8",
            "pytest-benchmark==5.3.1",
            "pytest-timeout",
            "expecttest",
            "hypothesis",
            "mypy==2.4.1",  # the README examples are type-checked (tests/test_readme.py): a newer mypy may differ
        ],
    },
    entry_points={"console_scripts": ["sphere-fast=sphere_fast.cli:main"]},
)
