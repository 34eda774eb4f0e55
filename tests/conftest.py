from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

import pytest

from segmenters.data import default_data_root

DATA_ROOT = default_data_root()
BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """bench/NAME.py, loaded once (bench/ is not an installed package)."""
    module = f"bench_{name}"
    if module not in sys.modules:
        spec = importlib.util.spec_from_file_location(module, BENCH / f"{name}.py")
        sys.modules[module] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module])
    return sys.modules[module]


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA_ROOT.is_dir():
        pytest.skip(f"real data not present at {DATA_ROOT} (../shared/data beside the checkout, or $PATCHWATCH_DATA)")
    return DATA_ROOT


@pytest.fixture(autouse=True, scope="session")
def _quiet_matplotlib():
    os.environ.setdefault("MPLBACKEND", "Agg")


#: the thread a Serve deployment handle starts in its process, never stopped (Ray 2.60's SingletonThreadRouter)
SERVE_ROUTER_THREAD = "_run_router_event_loop"


@pytest.fixture(autouse=True, scope="module")
def _no_serve_router_in_the_test_process():
    """Tests start and stop Ray in this process again and again; a deployment handle used here leaves Serve's
    router thread polling the stopped cluster's actors through every later Ray session, which can crash the
    process (ray-project/ray#31145). Handles belong in the cluster's workers (a Ray task, as a Ray job's monitor)."""
    yield
    routers = [thread.name for thread in threading.enumerate() if SERVE_ROUTER_THREAD in thread.name]
    assert not routers, f"a Serve deployment handle was used in the test process: {routers} outlive its cluster"


def fit_camvid_twin(path: Path, data_root: Path, arch: str = "unet", size=(96, 128), steps: int = 60, seed: int = 0):
    """A briefly trained CamVid twin: its label maps vary across the image, so engine/twin comparisons on it
    can fail (an untrained net predicts one class nearly everywhere)."""
    import torch

    from segmenters.data import build_dataset, dataset_classes
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import load_twin, save_twin

    torch.manual_seed(seed)
    data = build_dataset("camvid", "train", root=data_root / "camvid", size=size)
    images, labels = map(torch.stack, zip(*[data[i] for i in range(0, 64, 8)]))
    spec = ModelSpec(arch=arch, classes=dataset_classes("camvid"), input_size=size, dataset="camvid")
    model = build_model(arch, spec.num_classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs = spec.normalization.normalize(images)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels, ignore_index=255)
        loss.backward()
        optimiser.step()
    save_twin(path, model, spec)
    return load_twin(path)


@pytest.fixture(scope="session")
def camvid_unet(tmp_path_factory, data_root):
    """(checkpoint path, twin) for a briefly trained CamVid U-Net at 96x128."""
    path = tmp_path_factory.mktemp("camvid_unet") / "unet.pt"
    return path, fit_camvid_twin(path, data_root)


@pytest.fixture(scope="session")
def camvid_unet_engines(camvid_unet, tmp_path_factory):
    """The CamVid U-Net as ONNX graphs: FP32 ("1") and FP16 ("2"), the two versions the service tests serve."""
    from export import export_onnx
    from export.onnx_export import save_model
    from export.precision import convert_precision

    _, twin = camvid_unet
    folder = tmp_path_factory.mktemp("served")
    fp32 = export_onnx(twin, folder / "model.onnx")
    save_model(convert_precision(fp32, "fp16"), folder / "model.fp16.onnx")
    return {"1": folder / "model.onnx", "2": folder / "model.fp16.onnx"}


def largest_component(mask):
    import cv2
    import numpy as np

    count, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    sizes = np.bincount(components.reshape(-1))[1:]
    return components == 1 + int(sizes.argmax())


@pytest.fixture(scope="session")
def attack_scene(camvid_unet, data_root):
    """A CamVid val image, the twin's prediction, and an object (a connected component of one predicted class,
    not the majority class) of 100-800 pixels: the size a 16x16 patch can plausibly take over."""
    import numpy as np

    from segmenters.data import build_dataset

    _, twin = camvid_unet
    data = build_dataset("camvid", "val", root=data_root / "camvid", size=(96, 128))
    for index in range(0, 40, 2):
        image, _ = data[index]
        predicted = twin.labels(image[None])[0].numpy()
        counts = np.bincount(predicted.reshape(-1), minlength=twin.spec.num_classes)
        majority = int(counts.argmax())
        candidates = [(int(obj.sum()), c, obj) for c in range(twin.spec.num_classes) if c != majority and counts[c]
                      for obj in [largest_component(predicted == c)] if 100 <= obj.sum() <= 800]
        if candidates:
            _, source, obj = max(candidates, key=lambda item: item[0])
            return twin, image, predicted, obj, source, majority
    pytest.fail("no CamVid val image gives the twin an object of 100-800 pixels")


@pytest.fixture(scope="session")
def shapes_twin(tmp_path_factory) -> Path:
    """An untrained shapes U-Net checkpoint, for tests of machinery (jobs, reports) rather than attack quality."""
    import torch

    from segmenters.data import dataset_classes
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import save_twin

    torch.manual_seed(0)
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(128, 128), dataset="shapes")
    path = tmp_path_factory.mktemp("twin") / "shapes_unet.pt"
    save_twin(path, build_model("unet", spec.num_classes), spec)
    return path
