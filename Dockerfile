# scalegen on a CUDA PyTorch base image. Build and run (a GPU host with the NVIDIA container toolkit):
#   docker build -t scalegen .
#   docker run --gpus all --ipc=host -v /models:/models -v $PWD/runs:/app/runs scalegen \
#       --config configs/sd/hyper_ingp_asd_mg15.yaml prior.model=/models/sd21-base
# Multi-GPU: the entry point is `accelerate launch train.py`; pass launcher flags through ACCELERATE_* variables
# or override the entry point, e.g. --entrypoint accelerate ... launch --config_file launch/accelerate_8gpu_ddp.yaml train.py
FROM pytorch/pytorch:2.4.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
WORKDIR /app

# Dependencies first (cached while the code changes); torch comes from the base image (>= 2.4).
COPY pyproject.toml README.md ./
COPY scalegen/__init__.py scalegen/__init__.py
RUN pip install --no-cache-dir -e ".[sd,data,wandb]" deepspeed

COPY scalegen/ scalegen/
COPY configs/ configs/
COPY launch/ launch/
COPY train.py ./

ENTRYPOINT ["accelerate", "launch", "train.py"]
CMD ["--help"]
