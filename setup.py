"""megapack: packed-sequence SFT of LLaMA-3 models with megatron-core."""
import re

from setuptools import find_packages, setup

# the version lives in megapack/__init__.py only (`megapack --version` and importlib.metadata read the same number)
VERSION = re.search(r'^__version__ = "([^"]+)"', open("megapack/__init__.py", encoding="utf-8").read(), re.M).group(1)

setup(
    name="megapack",
    version=VERSION,
    description="Supervised fine-tuning of LLaMA-3 with packed sequences at Megatron scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megapack", "megapack.*"]),
    package_data={"megapack": ["data/packs/FORMAT.md", "assets.json", "evaluation/README.md", "evaluation/tasks/*.yaml",
                               "evaluation/tasks/*.jsonl"]},
    license="Apache-2.0",
    install_requires=[
        # torch is installed first, explicitly (torch==2.13.0 CPU here); a bare requirement would pull a CUDA build.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "psutil>=5.9",  # megatron-core's dist_checkpointing needs it but does not declare it
        "numpy>=1.26",
        "tiktoken>=0.7",
        "sentencepiece>=0.2",
        "tokenizers>=0.19,<1",  # the tokenizer.json backend
        "jinja2>=3.1.6",  # --template hf (older versions have sandbox escapes)
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "pydantic>=2.6",
        "tqdm>=4.66",
        "ijson>=3.2",
        "pyarrow>=14",
        "tensorboard>=2.15",
        "gguf>=0.17,<1",  # the real model asset (SmolLM2 ships as GGUF): read and dequantized with numpy only
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "plot": ["matplotlib>=3.8"],
        "wandb": ["wandb>=0.19,<0.32"],  # logging.wandb (tested with 0.31.0)
        # `megapack eval`: lm-eval pinned (its task YAMLs and results format are versioned with it); ifeval and math
        # are the extras the paper suite's ifeval and minerva_math import; the hf backend needs transformers and
        # accelerate (lm-eval's [hf] extra would add peft, which megapack never loads). vllm: install on GPU nodes.
        "eval": ["lm-eval[ifeval,math]==0.4.13", "transformers>=4.45", "accelerate>=0.26"],
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "transformers>=4.45",
            "accelerate>=1.0",  # transformers' GGUF loader, the reference of tests/test_smollm2.py
            "matplotlib>=3.8",
            "wandb==0.31.0",  # tests/test_wandb.py (offline runs; the version the reader was checked with)
        ],
    },
    entry_points={"console_scripts": ["megapack=megapack.cli:main"]},
)
