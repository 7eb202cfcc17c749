"""megatron_latent: latent visual reasoning (LVR, HyLaR, DeepLatent) for Qwen2.5-VL on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_latent",
    version="0.1.0",
    description="Train Qwen2.5-VL to think in latent visual space, on megatron-core",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_latent", "megatron_latent.*"]),
    python_requires=">=3.12,<3.13",
    install_requires=[
        "megatron-core==0.19.2",
        "torch>=2.6",  # pinned in constraints.txt; containers keep their own
        "torchvision",
        "scikit-image",  # sample photos for demos and synthetic data
        "transformers==5.17.0",
        "qwen-vl-utils",
        "safetensors",
        "psutil",  # dist_checkpointing needs it but megatron-core does not declare it
        "wandb",
        "tqdm",
        "numpy",
        "pillow",
        "pyarrow",  # parquet records (Zebra-CoT / HyLaR-SFT-Data, RL parquet)
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "apex": ["apex"],
        "flash": ["flash-attn"],
        "dev": ["pytest", "pytest-timeout"],
    },
)
