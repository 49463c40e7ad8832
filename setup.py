from setuptools import find_packages, setup

setup(
    name="crate_kernels",
    version="0.1.0",
    description="Fast, faithful CRATE-MAE: fused Triton/CUDA operators, drop-in model, training and analysis",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["crate_kernels", "crate_kernels.*"]) + ["crate_kernels.csrc"],
    # the CUDA extension's sources ship inside the package; crate_kernels.ops.cuda_ext builds them on first use
    package_dir={"crate_kernels.csrc": "csrc"},
    package_data={"crate_kernels.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"]},
    python_requires=">=3.10",
    install_requires=[
        # triton is not required: CUDA builds of torch bring it, and CPU users need it only for the interpreter tests
        "torch>=2.4",
        "numpy",
        "pyyaml>=5.1",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "scikit-image>=0.20",  # ships the natural photographs of the default training set
        "pillow>=9",
    ],
    entry_points={"console_scripts": ["crate-train = crate_kernels.train:main",
                                      "crate-finetune = crate_kernels.finetune:main",
                                      "crate-probe = crate_kernels.probe:main",
                                      "crate-analyze = crate_kernels.analyze:main"]},
    extras_require={
        # The tests run the Triton kernels through triton's CPU interpreter, which under triton 3.6/3.7 fails with
        # numpy >= 2.4 (range() over a runtime bound: "only 0-dimensional arrays can be converted to Python scalars");
        # triton >= 3.8 works with both. numpy is capped, not triton floored: CUDA torch pins triton exactly
        # (torch 2.11: triton==3.6.0), so a triton floor would make pip replace the user's torch or give up, while
        # numpy < 2.4 works with every triton. The cap binds only this extra; the package itself takes any numpy.
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "numpy<2.4",
                 "triton>=3.0; platform_system == 'Linux'"],
        "jpeg": ["simplejpeg>=1.6"],  # JPEG decoding straight to numpy, about twice PIL's rate (pipeline.data)
        # figures, the probe's logistic regression, fine-tuning's RandAugment and random erasing
        "analysis": ["matplotlib>=3.5", "scikit-learn>=1.1", "kornia>=0.7.1"],
        "tensorboard": ["tensorboard>=2.10"],
    },
)
