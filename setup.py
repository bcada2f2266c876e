from setuptools import find_packages, setup

setup(
    name="thanora_ds",
    version="0.1.0",
    description="ThanoRA multi-task LoRA fine-tuning of LLaMA/LLaVA models on DeepSpeed ZeRO-3",
    packages=find_packages(include=["thanora_ds", "thanora_ds.*"]),
    python_requires=">=3.10",
    # torch is left unpinned on purpose: GPU users keep their CUDA build; setup.sh pins the CPU wheel.
    install_requires=[
        "torch>=2.6",            # transformers 5 disables torch < 2.6 (tests/test_docker.py checks it)
        "deepspeed>=0.16",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "pillow>=10.0",
    ],
    entry_points={"console_scripts": [
        "thanora-train=thanora_ds.cli.train:main",
        "thanora-merge=thanora_ds.cli.merge:main",
        "thanora-eval=thanora_ds.cli.eval:main",
    ]},
    extras_require={
        "dev": ["pytest>=8", "peft>=0.13", "psutil>=5.9", "ruff>=0.6",
                "wandb>=0.19", "mlflow-skinny>=2.16", "sqlalchemy>=2.0", "alembic>=1.13"],
        # train.report_to: wandb / mlflow (MLflow's local store is SQLite: sqlalchemy + alembic)
        "trackers": ["wandb>=0.19", "mlflow-skinny>=2.16", "sqlalchemy>=2.0", "alembic>=1.13"],
        "gpu": ["flash-attn>=2.7.4"],   # first release built for torch 2.6
        "mpi": ["mpi4py>=3.1"],
    },
)
