"""Install: `pip install -e .` (CPU or GPU), `pip install -e '.[dev]'` for the tests.

The CUDA kernels are an extra for GPU machines only: they build from source against the torch
already installed, so install torch (this package) first, then
`pip install --no-build-isolation -e '.[gpu]'`.
"""
from setuptools import find_packages, setup

# monitoring: TensorBoard (logging.tensorboard_dir), W&B (logging.wandb_project; Composer 0.32
# takes wandb<0.19, which needs protobuf<6, hence tensorboard<2.20), tools/plot_metrics.py
MONITOR = ["tensorboard<2.20", "wandb>=0.13.2,<0.19", "matplotlib"]
# tools/pack.py inputs: Parquet/Arrow, .zst, HF datasets (hub <1.0 keeps transformers 4.53 working),
# PDF, Lance datasets. (SentencePiece tokenizer.model files are read without a package.)
FORMATS = ["pyarrow", "zstandard", "datasets>=2.19,<4.2", "huggingface-hub<1.0", "pypdf>=5", "pylance"]
# transformers is the reference our model is checked against and exported to (<4.54 fits torch 2.7)
TRANSFORMERS = ["transformers>=4.44,<4.54"]

setup(
    name="mamba-recipe",
    version="0.1.0",
    description="Pretrain Mamba language models with Composer and FSDP2: raw text to an exportable model",
    python_requires=">=3.10",
    packages=find_packages(include=["mamba", "mamba.*"]),
    install_requires=[
        "mosaicml==0.32.1",  # pins torch>=2.6,<2.7.1
        "torch>=2.6,<2.7.1",
        "omegaconf>=2.3",
        "numpy",
        "submitit",
        "psutil",  # mamba/training: rank and lock-owner processes (also a Composer dependency)
        "tokenizers>=0.19",
        "safetensors",  # tools/export_hf.py writes model.safetensors
    ],
    extras_require={
        # CUDA kernels: need nvcc and a CUDA torch; 2.3.2 needs triton>=3.5, which torch 2.7 refuses.
        "gpu": ["mamba-ssm==2.3.1", "causal-conv1d>=1.4"],
        "monitor": MONITOR,
        "formats": FORMATS,
        # benchmarks/model_cpu.py: HF transformers' Mamba, default and mamba.py (mambapy) paths
        "bench": TRANSFORMERS + ["mambapy"],
        # the test suite: every CPU-side extra
        # sentencepiece: the reference the converted tokenizer.model files are checked against
        "dev": ["pytest", "hypothesis", "sentencepiece"] + TRANSFORMERS + MONITOR + FORMATS,
        "all": ["pytest", "mambapy"] + TRANSFORMERS + MONITOR + FORMATS,
    },
)
