# thanora_ds for GPU clusters: CUDA PyTorch + DeepSpeed + flash-attn (the `gpu` extra) + mpi4py (the `mpi` extra).
# Not built in the project's CI (no Docker engine there); linted with hadolint (tests/test_docker.py).
#   docker build -t thanora_ds .
#   docker run --gpus all --ipc=host -v $PWD/work:/workspace thanora_ds \
#       --nproc_per_node 8 /opt/thanora_ds/launchers/train.py --config config.yaml
# (the working directory is /workspace, writable by the non-root user: relative output_dir lands there)
# The entrypoint is torchrun; give it other launcher arguments (--nnodes, --rdzv_*) as usual, or override
# it: --entrypoint deepspeed, or --entrypoint python for `mpirun ... python launchers/train.py` / srun.
# torch in the base image must satisfy transformers 5 (it disables torch < 2.6), DeepSpeed and setup.py's
# torch minimum: tests/test_docker.py reads this tag and checks it against the installed packages' own minimums.
ARG PYTORCH_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel
FROM ${PYTORCH_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MAX_JOBS=8

# Open MPI with PMIx for mpirun / srun --mpi=pmix launches (the `mpi` extra builds mpi4py against it)
RUN apt-get update \
    && apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/thanora_ds
COPY setup.py ./
COPY thanora_ds ./thanora_ds
# flash-attn is built against the image's torch: --no-build-isolation keeps that torch (the devel image has
# nvcc; flash-attn's setup fetches a prebuilt wheel matching torch/CUDA/C++ ABI when one exists, else compiles)
ARG FLASH_ATTN_VERSION=2.8.3
RUN pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" \
    && pip install --no-build-isolation -e ".[gpu,mpi]"
COPY launchers ./launchers
COPY ds_configs ./ds_configs

RUN useradd --create-home --uid 1000 --user-group thanora \
    && mkdir -p /workspace \
    && chown 1000:1000 /workspace
USER 1000:1000
WORKDIR /workspace

ENTRYPOINT ["torchrun"]
CMD ["--help"]
