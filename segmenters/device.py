"""The one device policy: `auto | cpu | cuda | cuda:N`, resolved once at the edge of a command (or from the GPU Ray
gave a task or replica) and passed down as a `torch.device`; nothing below picks a device on its own.

Asking for CUDA where there is none is a `DeviceError` naming the device, raised before any work starts.

"fp32" means fp32: on NVIDIA GPUs torch's cuDNN convolutions use TF32 (a 10-bit mantissa) unless told not to, so
anything that claims an fp32 figure runs under `fp32_math()`; TF32 is a precision of its own ("tf32").
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device is resolved, so CLIs can name DEVICE_HELP without it
    import torch

#: what `--device` accepts (help text)
DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A device that cannot be had here, or a device string that is not one."""


def _parse(request: str | torch.device | None) -> tuple[str, int | None]:
    text = "auto" if request is None else str(request).strip().lower()
    match = _PATTERN.match(text)
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"unknown device {str(request)!r}: expected {DEVICE_HELP}")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def device_name(request: str | torch.device | None) -> str:
    """The request's canonical spelling ('auto', 'cpu', 'cuda', 'cuda:1'): its form checked, nothing resolved, so
    that a config naming a GPU can be validated on a machine without one."""
    kind, index = _parse(request)
    return kind if index is None else f"{kind}:{index}"


def _no_cuda_reason() -> str:
    import torch

    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) is built without CUDA"
    return "no CUDA device is visible (CUDA_VISIBLE_DEVICES, driver)"


def resolve_device(request: str | torch.device | None = "auto") -> torch.device:
    """`auto` -> the current CUDA device when there is one, else the CPU; `cpu`; `cuda` -> cuda:0 (or the current
    one); `cuda:N` -> that GPU. Raises `DeviceError` for CUDA on a machine without it, or a GPU index it lacks."""
    import torch

    kind, index = _parse(request)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {str(request)!r} was asked for, but {_no_cuda_reason()}")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if index is None else index
    if index >= count:
        raise DeviceError(f"device {str(request)!r} was asked for, but this machine has {count} CUDA device(s) "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def assigned_device(request: str | torch.device | None, gpu_ids: Sequence) -> torch.device:
    """Inside a Ray task or replica: the GPU Ray assigned to it (`gpu_ids` = `ray.get_gpu_ids()` there).

    Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs, so they are cuda:0.. in the worker. `auto` takes the
    assigned GPU when there is one and the CPU otherwise: a task never uses a GPU Ray did not give it (several
    tasks may share one GPU through fractional `num_gpus`)."""
    import torch

    kind, index = _parse(request)
    if kind == "cpu" or (kind == "auto" and not gpu_ids):
        return torch.device("cpu")
    if not gpu_ids:
        raise DeviceError(f"device {str(request)!r} was asked for, but Ray gave this task no GPU: request one "
                          "with num_gpus (e.g. --gpus-per-trial 0.25)")
    if index is not None and index >= len(gpu_ids):
        raise DeviceError(f"device {str(request)!r} was asked for, but Ray gave this task {len(gpu_ids)} GPU(s)")
    return resolve_device(f"cuda:{index or 0}")


def describe_device(device: torch.device) -> str:
    """'cpu' or 'cuda:0 (NVIDIA H200)': what a report records."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` does bfloat16 arithmetic in hardware: a CUDA GPU with bf16 units (Ampere and later), a CPU
    with AMX or AVX512-BF16. Elsewhere bf16 autocast is emulated and slower than fp32: on a 2-core AVX2 EPYC an
    LR-ASPP training step took 11x its fp32 time, a ladder DenseNet-121's 15x."""
    import torch

    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(probe() for probe in probes if probe is not None)


@contextlib.contextmanager
def fp32_math(enabled: bool = True) -> Iterator[None]:
    """Within: float32 convolutions and matmuls in full fp32 on CUDA (TF32 off); restored after. A no-op for
    `enabled=False` (the caller allows TF32, a precision of its own)."""
    import torch

    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
