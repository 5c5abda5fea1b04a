from setuptools import find_packages, setup

# The Triton kernels live in the top-level folder kernels/ (the layout of the product brief)
# and install as the subpackage rgkern.kernels, so rgkern does not claim the generic
# top-level import name "kernels".
setup(
    name="rgkern",
    version="0.1.0",
    description="Kernel-accelerated RG-Flow: a hierarchical, local normalizing flow",
    packages=find_packages(include=["rgkern", "rgkern.*"]) + ["rgkern.kernels"],
    package_dir={"rgkern": "rgkern", "rgkern.kernels": "kernels"},
    # The shipped pretrained models (rgkern/pretrained/NAME.safetensors, its config JSON and its
    # card), found beside the installed package by rgkern.tools.checkpoint.pretrained_path.
    package_data={"rgkern": ["pretrained/*.safetensors", "pretrained/*.json", "pretrained/*.md"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy", "einops", "tqdm", "pillow", "matplotlib", "safetensors"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["rgkern=rgkern.__main__:main"]},
)
