"""Packaging for selfmoe.

The top-level folder ``kernels/`` is installed as the import package ``selfmoe.kernels`` (never as a
top-level ``kernels``: Hugging Face ships a real package of that name and ``transformers`` probes for it).
"""
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "selfmoe" / "version.py").read_text()).group(1)

setup(
    name="selfmoe",
    version=VERSION,
    description="MiXSE (Self-MoE): self-specialized LoRA experts behind a learned router, with fused Triton kernels",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["selfmoe", "selfmoe.kernels", "selfmoe.benchmark"],
    package_dir={"selfmoe": "selfmoe", "selfmoe.kernels": "kernels"},
    package_data={"selfmoe": ["seeds/*.jsonl"], "selfmoe.benchmark": ["*.jsonl"]},
    install_requires=[
        # The floors are what CI's second stage installs and tests (.ci/run): nn.Module.set_submodule
        # needs torch 2.5; transformers and peft below these fail the model-layer tests.
        "torch>=2.5",
        "transformers>=4.57",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        # The torch path works without Triton; Triton wheels exist for Linux only.
        "triton>=3.0; platform_system == 'Linux'",
    ],
    entry_points={"console_scripts": ["selfmoe=selfmoe.cli:main"]},
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "peft>=0.17", "gguf>=0.10", "accelerate>=1.1", "matplotlib"],
        # the built-in model (a GGUF converted on first use) and the demo's plots
        "demo": ["gguf>=0.10", "accelerate>=1.1", "matplotlib"],
        # lm-evaluation-harness integration test (tests/test_lm_eval.py skips without it)
        "eval": ["lm-eval>=0.4.13,<0.5"],
    },
)
