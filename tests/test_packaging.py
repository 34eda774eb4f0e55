"""Packaging for GPUs, checked offline: the serving image's CUDA and the `gpu` extra's CUDA libraries agree.

onnxruntime-gpu is built for one CUDA major (1.31: CUDA 13, cuDNN 9), and its `cuda`/`cudnn` extras pull that
major's nvidia-* wheels. `deploy/Dockerfile` installs the extra on a Ray GPU image whose tag names its CUDA
(`-cu130`); if the two majors drift apart, the CUDA provider fails to load in the image. These tests read the
real pyproject.toml and Dockerfile, so editing either one out of step fails them.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ORT_GPU = "onnxruntime-gpu"
#: the extras of onnxruntime-gpu that bring the CUDA runtime and cuDNN as wheels
ORT_GPU_EXTRAS = {"cuda", "cudnn"}
#: nvidia-cudnn-cu13, nvidia-nccl-cu12, ...: the CUDA major is in the distribution's name
SUFFIXED_NVIDIA = re.compile(r"^nvidia-[a-z0-9-]+-cu(\d+)$")
#: nvidia-cuda-runtime, nvidia-cuda-nvrtc, ... (CUDA 13's wheels): the major is the version's first number
UNSUFFIXED_CUDA = re.compile(r"^nvidia-cuda-[a-z0-9-]+$")
#: Ray's image tags name their CUDA as -cuXYZ: major XY, minor Z (cu118 = 11.8, cu128 = 12.8, cu130 = 13.0)
IMAGE_CUDA = re.compile(r"-cu(\d{2,3})(?:-|$)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cuda_major_of_requirement(requirement: Requirement) -> int | None:
    """The CUDA major an nvidia-* requirement pins, None for a requirement that is not a CUDA library.

    An unsuffixed nvidia-cuda-* requirement must bound its major from both sides (`>=13,<14` or `~=13.0`)."""
    name = canonical(requirement.name)
    suffixed = SUFFIXED_NVIDIA.match(name)
    if suffixed:
        return int(suffixed.group(1))
    if not UNSUFFIXED_CUDA.match(name):
        return None
    majors = {major for major in range(8, 40) if any(requirement.specifier.contains(f"{major}.{minor}")
                                                     for minor in range(0, 10))}
    if len(majors) != 1:
        raise ValueError(f"{requirement} does not pin one CUDA major (admits {sorted(majors) or 'none'})")
    return majors.pop()


def cuda_major_of_image(image: str) -> int:
    """`rayproject/ray:2.60.0-py312-cu130` -> 13. A tag that does not name its CUDA (`-gpu`) is refused."""
    _, _, tag = image.rpartition(":")
    found = IMAGE_CUDA.search(tag)
    if not found:
        raise ValueError(f"base image {image!r} does not name its CUDA version (use a -cuXYZ tag, not -gpu)")
    return int(found.group(1)[:-1])


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    pairs = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        pairs.append((keyword.upper(), arguments.strip()))
    return pairs


def final_base_image(path: Path) -> str:
    """The image the last build stage starts FROM (flags such as --platform skipped)."""
    froms = [arguments for keyword, arguments in dockerfile_instructions(path) if keyword == "FROM"]
    if not froms:
        raise ValueError(f"{path} has no FROM")
    words = [word for word in froms[-1].split() if not word.startswith("--")]
    return words[0]


def gpu_extra() -> list[Requirement]:
    extras = tomllib.loads(PYPROJECT.read_text())["project"].get("optional-dependencies", {})
    assert "gpu" in extras, f"pyproject.toml has no `gpu` extra (extras: {sorted(extras)})"
    return [Requirement(text) for text in extras["gpu"]]


def pinned_cuda_majors(requirements: list[Requirement]) -> set[int]:
    majors = {cuda_major_of_requirement(r) for r in requirements}
    return {major for major in majors if major is not None}


def run_commands(path: Path) -> list[str]:
    """The shell commands of every RUN, split at && and ;, in order."""
    commands = []
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "RUN":
            commands += [c.strip() for c in re.split(r"&&|;", arguments) if c.strip()]
    return commands


# The parsers first: a check built on a parser that cannot fail proves nothing.

def test_image_tags_give_their_cuda_major():
    assert cuda_major_of_image("rayproject/ray:2.60.0-py312-cu130") == 13
    assert cuda_major_of_image("rayproject/ray:2.47.1-py311-cu121") == 12
    assert cuda_major_of_image("rayproject/ray:2.9.0-py310-cu118") == 11
    assert cuda_major_of_image("registry:5000/ray:2.60.0-cu128") == 12
    with pytest.raises(ValueError, match="does not name its CUDA"):
        cuda_major_of_image("rayproject/ray:2.60.0-py311-gpu")


def test_nvidia_requirements_give_their_cuda_major():
    assert cuda_major_of_requirement(Requirement("nvidia-cudnn-cu13>=9,<10")) == 13
    assert cuda_major_of_requirement(Requirement("nvidia_nccl_cu12")) == 12
    assert cuda_major_of_requirement(Requirement("nvidia-cuda-runtime>=13,<14")) == 13
    assert cuda_major_of_requirement(Requirement("nvidia-cuda-runtime~=12.8")) == 12
    assert cuda_major_of_requirement(Requirement("onnxruntime-gpu>=1.31")) is None
    with pytest.raises(ValueError, match="one CUDA major"):
        cuda_major_of_requirement(Requirement("nvidia-cuda-runtime>=12"))


def test_dockerfile_parser_joins_continuations(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("# comment\nFROM base:1 AS build\nFROM --platform=linux/amd64 img:2-cu128\n"
                          "RUN pip install a \\\n && pip uninstall -y b\n")
    assert final_base_image(dockerfile) == "img:2-cu128"
    assert run_commands(dockerfile) == ["pip install a", "pip uninstall -y b"]


# The real files.

def test_gpu_extra_names_onnxruntime_gpu_with_its_cuda_and_cudnn_extras():
    ort = [r for r in gpu_extra() if canonical(r.name) == ORT_GPU]
    assert len(ort) == 1, f"the gpu extra must name {ORT_GPU} once, got {[str(r) for r in gpu_extra()]}"
    assert ORT_GPU_EXTRAS <= set(ort[0].extras), f"{ort[0]} lacks the extras {sorted(ORT_GPU_EXTRAS - ort[0].extras)}"


def test_gpu_extra_pins_one_cuda_major_for_runtime_and_cudnn():
    requirements = gpu_extra()
    names = {canonical(r.name) for r in requirements}
    assert any(n.startswith("nvidia-cuda-runtime") for n in names), \
        "the gpu extra must pin the CUDA runtime (nvidia-cuda-runtime...)"
    assert any(n.startswith("nvidia-cudnn") for n in names), "the gpu extra must pin cuDNN (nvidia-cudnn-cuXX)"
    majors = pinned_cuda_majors(requirements)
    assert len(majors) == 1, f"the gpu extra pins CUDA majors {sorted(majors)}; it must pin exactly one"


def test_dockerfile_base_image_has_the_cuda_major_of_the_gpu_extra():
    image = final_base_image(DOCKERFILE)
    (extra_major,) = pinned_cuda_majors(gpu_extra())
    assert cuda_major_of_image(image) == extra_major, \
        f"{DOCKERFILE.name} starts from {image} (CUDA {cuda_major_of_image(image)}) but the gpu extra pins CUDA " \
        f"{extra_major}"


def test_dockerfile_installs_the_project_with_the_gpu_extra():
    installs = [c for c in run_commands(DOCKERFILE) if re.match(r"^(python -m )?pip install\b", c)]
    project = [c for c in installs if re.search(r"""["']?\.\[([a-z,]+)\]["']?""", c)]
    assert project, f"{DOCKERFILE.name} never pip-installs the project ('.[...]'): {installs}"
    extras = set(re.search(r"\.\[([a-z,]+)\]", project[0]).group(1).split(","))
    assert {"gpu", "serve", "tensorrt"} <= extras, f"the image installs .[{','.join(sorted(extras))}]"


def test_dockerfile_restores_onnxruntime_gpu_after_removing_the_cpu_build():
    """Both builds own the `onnxruntime` module: uninstalling the CPU build deletes files of the GPU build, which
    therefore has to be reinstalled afterwards (seen with 1.31.1: `import onnxruntime` is then an empty package)."""
    commands = run_commands(DOCKERFILE)
    uninstall = [i for i, c in enumerate(commands) if re.match(r"^pip uninstall .*\bonnxruntime(\s|$)", c)]
    assert uninstall, f"{DOCKERFILE.name} leaves the CPU onnxruntime installed beside onnxruntime-gpu"
    reinstall = [i for i, c in enumerate(commands)
                 if i > uninstall[-1] and c.startswith("pip install") and "--force-reinstall" in c and ORT_GPU in c]
    assert reinstall, f"{DOCKERFILE.name} removes the CPU onnxruntime but never reinstalls {ORT_GPU} after it"


def test_installed_onnxruntime_gpu_pulls_the_pinned_cuda_major():
    """Where onnxruntime-gpu is installed (the image, a GPU machine), its own metadata must agree with the pins."""
    try:
        requires = metadata.requires(ORT_GPU) or []
    except metadata.PackageNotFoundError:
        pytest.skip(f"{ORT_GPU} is not installed here (the CPU build is); its metadata cannot be read offline")
    pulled = [Requirement(text) for text in requires]
    by_extras = [r for r in pulled if r.marker and any(r.marker.evaluate({"extra": e}) for e in ORT_GPU_EXTRAS)]
    assert pinned_cuda_majors(by_extras) == pinned_cuda_majors(gpu_extra()), \
        f"{ORT_GPU} {metadata.version(ORT_GPU)} pulls {[str(r) for r in by_extras]}"
