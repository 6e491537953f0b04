"""The two images of the platform, as flytekit ImageSpecs with the same packages: ``cpu_image`` (orchestration,
curation, the TorchX launcher of a training stage, and every task the config gives no GPU) and ``cuda_image`` (the
torchrun workers of a training stage, and the tasks the config gives a GPU: compress, evaluate, register on the
10B config; ``resources.<task>.image`` in common/config/cluster.py).

    from containers.images import cpu_image, cuda_image, image_for
    cuda_image.image_name()     # ghcr.io/video-gen/video-gen-cuda:<tag>, the tag a hash of the spec
    image_for("cuda")           # the same name, as the pipeline passes it to with_overrides(container_image=...)

Both install ``torch==2.13.0`` (the CPU wheel index for ``cpu_image``; PyPI's Linux wheel, a CUDA build bundling its
CUDA runtime, for ``cuda_image``) and exactly the pins of ``requirements.lock`` (``locked_packages``: the one place
the package list comes from). The tag is ImageSpec's own hash of the spec, and the spec holds every pin, so a
changed lockfile is a new tag; nothing is ever ``:latest``.

Declaring an ImageSpec builds nothing: local ``pyflyte run`` ignores it, ``pyflyte register``/``--remote`` and
``make images`` build it (needs a Docker engine; none on the development machine, so these were not built there).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from flytekit import ImageSpec
from flytekit.constants import CopyFileDetection

REGISTRY = os.environ.get("VGEN_IMAGE_REGISTRY", "ghcr.io/video-gen")
TORCH = "torch==2.13.0"   # the version of the launcher's venv (Makefile); installed with the lock in one resolution
LOCKFILE = Path(__file__).resolve().parents[1] / "requirements.lock"
_CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"   # torch 2.13.0+cpu: ~200 MB instead of a multi-GB CUDA build
_APT = ["ffmpeg", "libgl1"]   # PyAV/decord decode through ffmpeg; OpenCV needs libGL even headless in some wheels


def locked_packages(lockfile: Path = LOCKFILE) -> List[str]:
    """Every ``name==version`` line of the lockfile, in its order (comments and blank lines skipped)."""
    if not lockfile.is_file():
        raise FileNotFoundError(f"{lockfile} not found: the images install exactly its pins (run from a full "
                                "checkout; Flyte's fast registration ships it with the code)")
    pins = []
    for n, raw in enumerate(lockfile.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "==" not in line or line.startswith("-"):
            raise ValueError(f"{lockfile}:{n}: every line must be an exact pin name==version (the images install "
                             f"the lock as it is), got {raw!r}")
        pins.append(line)
    return pins


_PACKAGES = [TORCH, *locked_packages()]

cpu_image = ImageSpec(
    name="video-gen-cpu",
    registry=REGISTRY,
    python_version="3.11",
    packages=_PACKAGES,
    apt_packages=_APT,
    pip_extra_index_url=[_CPU_TORCH_INDEX],
    pip_extra_args="--index-strategy unsafe-best-match",   # uv: torch from the CPU index, every other pin from PyPI
    env={"PYTHONUNBUFFERED": "1"},
    source_copy_mode=CopyFileDetection.NO_COPY,   # the code comes with (fast) registration: the tag is the same
)                                                  # at registration and in a pod (image_for at run time)

cuda_image = ImageSpec(
    name="video-gen-cuda",
    registry=REGISTRY,
    python_version="3.11",
    packages=_PACKAGES,
    apt_packages=_APT,
    env={"PYTHONUNBUFFERED": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1",   # megatron TP ordering (docs/mugv.md §6.3)
         "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    source_copy_mode=CopyFileDetection.NO_COPY,
)

IMAGES = {"cpu": cpu_image, "cuda": cuda_image}


def image_for(kind: str) -> str:
    """The full name (registry/name:content-tag) of the ``"cpu"`` or ``"cuda"`` image."""
    if kind not in IMAGES:
        raise ValueError(f"image must be 'cpu' or 'cuda' (resources.<task>.image), got {kind!r}")
    return IMAGES[kind].image_name()


def main() -> int:
    """``make images``: build and push both images where a Docker engine answers (``docker info``); otherwise say
    that none exists and what would be built. Exits 0 either way, so a machine without Docker is no failure."""
    import shutil
    import subprocess

    names = {kind: image_for(kind) for kind in IMAGES}
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        print("no Docker engine here (`docker info` fails): nothing built. On a machine with one, `make images` "
              "builds and pushes:")
        for kind, name in names.items():
            print(f"  {kind}: {name}")
        return 0
    from flytekit.image_spec.image_spec import ImageBuildEngine

    for kind, spec in IMAGES.items():
        print(f"building {names[kind]}", flush=True)
        ImageBuildEngine.build(spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
