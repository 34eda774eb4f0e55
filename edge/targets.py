"""Vehicles a bundle can be checked against from the bundle alone (`edge verify --target NAME`): the TensorRT
release their system image ships, their GPU's compute capability and their CPU architecture. A TensorRT plan
runs only where all three match what it was built on; ONNX engines run wherever ONNX Runtime does."""

from __future__ import annotations

from export.tensorrt_engine import PlanTarget

VEHICLE_TARGETS: dict[str, PlanTarget] = {
    # JetPack 6.1 / 6.2 (L4T r36.4): TensorRT 10.3.0, Orin's Ampere iGPU is sm_87
    "jetson-orin-jetpack6": PlanTarget(tensorrt_version="10.3.0", compute_capability="8.7",
                                       device_name="Jetson Orin (JetPack 6)", cpu_arch="aarch64"),
    # JetPack 5.1.x (L4T r35): TensorRT 8.5.2
    "jetson-orin-jetpack5": PlanTarget(tensorrt_version="8.5.2", compute_capability="8.7",
                                       device_name="Jetson Orin (JetPack 5)", cpu_arch="aarch64"),
    "jetson-xavier-jetpack5": PlanTarget(tensorrt_version="8.5.2", compute_capability="7.2",
                                         device_name="Jetson AGX Xavier (JetPack 5)", cpu_arch="aarch64"),
}


def vehicle_target(name: str) -> PlanTarget:
    try:
        return VEHICLE_TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown vehicle target {name!r}; known: {', '.join(sorted(VEHICLE_TARGETS))} "
                         "(or give --tensorrt-version, --compute-capability and --cpu-arch)") from None
