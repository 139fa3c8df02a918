"""prefrank: exact, fast scoring of preference data for language models.

The Triton kernels live in the top-level folder `kernels/` (the project's layout) but install
as `prefrank.kernels`: a top-level package named `kernels` would clash with Hugging Face's
`kernels` package, which transformers imports (a dependency from transformers 5.25). Run from the
repository root, Python still finds the folder as a top-level `kernels`; its __init__ then hands the
name over to Hugging Face's package.
"""
import re

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

version = re.search(r'__version__ = "(.+)"', open("prefrank/__init__.py").read()).group(1)

cpu_ops = Pybind11Extension(
    "prefrank._cpu_ops",
    ["csrc/cpu_ops.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3", "-fopenmp"],
    extra_link_args=["-fopenmp"],
)

setup(
    name="prefrank",
    version=version,
    description="Exact, fast log-probability scoring of preference data and ranking analysis (Chen et al. 2024)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["prefrank", "prefrank.analysis", "prefrank.data", "prefrank.demo", "prefrank.dpo", "prefrank.kernels",
              "prefrank.ops"],
    package_dir={"prefrank.kernels": "kernels"},
    ext_modules=[cpu_ops],
    cmdclass={"build_ext": build_ext},
    # Ranges, not pins: users bring their own (CUDA) torch. The CPU machine's install
    # command pins torch==2.13.0 before this runs.
    # No triton here: the GPU kernels need it only where torch is a CUDA build, and those builds
    # require it themselves on Linux; a CPU machine is spared its ~290 MB.
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17,<6",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pyarrow>=15",
        "datasets>=3.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "xxhash>=3.0",  # the content hash of model files that --resume compares (prefrank.models.fingerprint)
        "accelerate>=1.0",  # transformers loads a model sharded by its tensor-parallel plan (--tp) only with it
    ],
    # trl: the drop-in test of prefrank's fused loss inside TRL's DPOTrainer (<1.17: PrefrankDPOTrainer
    # overrides a private TRL method); ruff: the lint CI runs before the tests (rules in pyproject.toml);
    # triton: the kernels' tests run them interpreted on CPU tensors (TRITON_INTERPRET=1)
    extras_require={"test": ["pytest>=8", "trl>=1.16,<1.17", "ruff>=0.6", "triton>=3.6; platform_system == 'Linux'"]},
    entry_points={"console_scripts": ["prefrank=prefrank.cli:main"]},
)
