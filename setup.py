"""hf-emergence: emergence-promoting initialisation for Hugging Face models."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = next(line.split('"')[1] for line in (ROOT / "hf_emergence" / "__init__.py").read_text().splitlines()
               if line.startswith("__version__"))

# torch is pinned by the user's environment: install it first (CPU: `pip install torch==2.13.0`), so that
# this range is already satisfied and pip does not pull a multi-GB CUDA build.
INSTALL_REQUIRES = ["torch>=2.4", "transformers>=5.0,<6", "huggingface_hub>=1.0", "safetensors"]
EXAMPLES = ["accelerate>=1.0", "datasets>=3.0", "evaluate>=0.4.3", "sacrebleu>=2.4", "sacremoses>=0.1",
            "tokenizers>=0.20", "pillow>=10", "tqdm", "matplotlib>=3.8", "numpy"]
DEV = EXAMPLES + ["pytest>=8"]
# DeepSpeed ZeRO-3 (optional; tests/test_distributed.py runs it on CPU when HF_EMERGENCE_TEST_DEEPSPEED=1)
DEEPSPEED = ["deepspeed>=0.16"]

setup(
    name="hf-emergence",
    version=VERSION,
    description="Emergence-promoting initialisation (arXiv 2407.19044) for transformers, timm-style ConvNets and torch models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_emergence", "hf_emergence.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"examples": EXAMPLES, "dev": DEV, "deepspeed": DEEPSPEED},
    entry_points={"console_scripts": ["hf-emergence=hf_emergence.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
