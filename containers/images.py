"""The two images of the platform, as flytekit ImageSpecs: ``cpu_image`` (every Flyte task today: orchestration,
curation, compression, evaluation, registration and the TorchX launcher of a training stage) and ``cuda_image`` (the
torchrun workers of a training stage on a GPU cluster: Megatron-Core, flash-attn).

Declaring an ImageSpec builds nothing: local `pyflyte run` ignores it, and `pyflyte register`/`--remote` builds
it (needs a Docker engine; none on the development machine, so these were not built there). The Dockerfiles
beside this file describe the same images for registries that build from Dockerfiles.
"""
from __future__ import annotations

import os

from flytekit import ImageSpec

REGISTRY = os.environ.get("VGEN_IMAGE_REGISTRY", "ghcr.io/video-gen")

_COMMON = [
    "flytekit==1.16.31", "flytekitplugins-kfpytorch==1.16.31", "mlflow==3.17.2", "minio==7.2.20",
    "pyarrow", "pandas", "pyyaml", "safetensors", "einops", "transformers==5.24.0", "tokenizers==0.23.3",
    "av==18.1.0", "torchx==0.7.0",
]

# CPU image: the Flyte tasks (curation with decord, PySceneDetect, OpenCV; the launcher of TorchX jobs).
cpu_image = ImageSpec(
    name="video-gen-cpu",
    registry=REGISTRY,
    python_version="3.11",
    packages=["torch==2.13.0", "decord==0.6.0", "scenedetect", "opencv-python-headless", *_COMMON],
    apt_packages=["ffmpeg", "libgl1"],
)

# CUDA image: the torchrun workers (Megatron-Core, flash-attn). Base: NVIDIA's PyTorch container, as MUG-V uses.
# A stage on Kubernetes names it in train.launch.image.
cuda_image = ImageSpec(
    name="video-gen-cuda",
    registry=REGISTRY,
    base_image="nvcr.io/nvidia/pytorch:25.02-py3",
    packages=["megatron-core==0.16.1", "psutil", "flash-attn>=2.8", *_COMMON],
)
