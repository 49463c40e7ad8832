"""What pyproject.toml cannot say: the CUDA extension's sources (csrc/) ship inside the package as
crate_kernels.csrc, and crate_kernels.ops.cuda_ext builds them on first use. Metadata lives in pyproject.toml."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["crate_kernels", "crate_kernels.*"]) + ["crate_kernels.csrc"],
    package_dir={"crate_kernels.csrc": "csrc"},
    package_data={"crate_kernels.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"]},
)
