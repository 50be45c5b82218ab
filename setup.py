"""verl-mtp: Multi-Token-Prediction training, speculative rollout and MTP-safe checkpoints for verl."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "verl_mtp", "version.py")) as f:
        scope = {}
        exec(f.read(), scope)
        return scope["__version__"]


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="verl-mtp",
    version=read_version(),
    description="Multi-Token-Prediction (MTP) for RL with verl: MTP head training (incl. OCC), "
    "MTP speculative rollout, MTP-safe checkpoints",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    # Only the import package: the repository's tests/ and scripts/ are never installed, because
    # the verl wheel already owns top-level packages with those names.
    packages=find_packages(include=["verl_mtp", "verl_mtp.*"]),
    package_data={"verl_mtp": ["conf/*.yaml"]},
    install_requires=[
        "verl>=0.9.1,<0.10",
        "torch>=2.6",
        # 0.16.x is the last line for Python 3.11 (legacy MTP API); 0.17+ needs Python 3.12.
        "megatron-core>=0.16.0,<0.19",
        "mbridge>=0.15.1",
        "einops",  # mbridge imports it without declaring it
        "omegaconf>=2.3",
        "hydra-core>=1.3",
        "tensordict>=0.8,<=0.10",
        "packaging",
        # verl 0.9.1's rollout servers and router import these at module level (main_ppo reaches
        # them) but verl declares them only in its verl-core extra, which also pulls pytest, CUDA
        # profilers and vision packages.
        "uvicorn",
        "fastapi",
        "cachetools",
        "matplotlib>=3.7",  # the demo's figure
        # Keeps pip's resolver from backtracking through ~20 releases: verl pins tensordict<=0.10,
        # which needs pyvers<0.2, which needs packaging<26, while virtualenv (from ray[default])
        # needs packaging>=26.3 from 21.14.6 on. Without the bound pip downloads each newer
        # virtualenv before settling on 21.14.5.
        "virtualenv>=20.26,<21.14.6",
    ],
    extras_require={
        "vllm": ["vllm>=0.10"],
        "sglang": ["sglang>=0.5"],
        "demo": [],  # kept so that `verl-mtp[demo]` still resolves: the demo's needs are in the base install
        "test": ["pytest>=8", "pytest-timeout"],
    },
    entry_points={
        # `import verl` imports every module registered in this group (see verl/__init__.py).
        "verl.plugins": ["verl_mtp = verl_mtp.plugin"],
        "console_scripts": ["verl-mtp = verl_mtp.cli:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "License :: OSI Approved :: Apache Software License",
    ],
)
