"""deepnet-fairseq: DeepNet / DeepNorm ("Scaling Transformers to 1,000 Layers") as a fairseq plugin.

fairseq itself (``fairseq-fixed==0.12.3.1``) is installed by the Makefile with ``--no-deps``
because its metadata requires torchaudio; it is therefore not listed in ``install_requires``.
"""

from setuptools import find_packages, setup

setup(
    name="deepnet-fairseq",
    version="0.1.0",
    description="DeepNorm (DeepNet) for very deep Transformers, as a fairseq --user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["deepnet_fairseq", "deepnet_fairseq.*"]),
    install_requires=[
        "torch>=2.1",
        "numpy",
        "hydra-core>=1.3.2",
        "omegaconf>=2.3",
        "sacrebleu>=2.0",
        "sentencepiece",
        "matplotlib",
    ],
    # --ddp-backend fully_sharded (the 1000-layer recipe): GPU machines only, not installed by make
    extras_require={"fsdp": ["fairscale==0.4.13"]},
    entry_points={
        "console_scripts": [
            "deepnet-average-checkpoints=deepnet_fairseq.cli.average_checkpoints:main",
            "deepnet-coefficients=deepnet_fairseq.cli.coefficients:main",
            "deepnet-analyze=deepnet_fairseq.cli.analyze:main",
            "deepnet-sweep=deepnet_fairseq.cli.sweep:main",
            "deepnet-export=deepnet_fairseq.cli.export:main",
        ],
    },
)
