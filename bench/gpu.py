"""GPU benchmark (issue 14): what patchwatch does with one CUDA GPU, in one run of under 8 minutes.

Sections (`--sections`, all by default), each row of the one table printed at the end a figure with the
baseline it is read against, measured in the same run:

  engines   every zoo model (19 classes, random weights) at 1024x2048: the network alone (fp32 with TF32 off,
            fp16 autocast; channels_last, argmax on the device, CUDA-synchronised) at batch 1 and 8, and
            `Engine.segment` of uint8 (N, H, W, 3) frames through torch, ONNX Runtime CUDA (fp32 graph, fp16
            graph) and TensorRT where installed, each as frames/s and as segment/network (acceptance: >= 0.8 at
            batch 8), with the host memory segment grew by per frame (peak RSS over the calls; it must stay far
            below the logits' size: segment never holds a host copy of them)
  parity    the parity gate on ONNX Runtime CUDA for every zoo model, fp32 and fp16, against the twin in fp32
            with TF32 off, on CamVid val images (a folder with `--parity-source`) or random images
  training  `segmenters.training.training_throughput` img/s per zoo model (U-Net 128x128 batch 16, the others
            512x1024 batch 8; bf16/fp16 autocast, torch.compile), against the U-Net on 2 CPU threads
  attack    MIM patch attack iterations/s on a 360x480 U-Net twin at 1 and 8 EOT draws, against 2 CPU threads
  vgatt     VGatt (float64) seconds per 360x480 image, against 2 CPU threads
  serve     where Ray is importable: Ray Serve (one replica, num_gpus=1, binary OIP, uint8 frames in, labels
            out) under concurrent clients against `Engine.segment` in process on the same graph
  monitor   the flip monitor (issue 15) with 4 moving-camera streams at the benchmark's size over the served
            engine, frames/s against the engine alone (goal >= 0.9), and the detector at its working width
            against the full frame

Every section runs in its own try/except: a failure is an "error: ..." row, not the end of the run. The wall
clock is budgeted (`--budget`, 390 s on a GPU, so that the whole script ends within 8 minutes): each section
gets a share of what is left and skips the items it has no time for, saying so in the table. Writes gpu.json
and gpu.md under `--out` (default bench/results/gpu).

Without CUDA (`--device cpu`, or no GPU) the same script runs a reduced set and says so at the top: 256x512,
batches 1 and 4, two models, few steps, a 3.5 minute budget; rows that need a GPU read "no CUDA".

On the lent GPU machine (device tool, nvidia-h200: Python 3.12, torch 2.11 CUDA 13, onnxruntime 1.30 CPU
build, no registry): onnxruntime-gpu 1.31.1 (a 244 MiB wheel), Ray 2.60 and the smaller packages the machine
lacks (pydantic, captum, cityscapesscripts, fastapi, ...) travel as xz-compressed tar streams of their installed
files, split into ~51 MB parts (onnxruntime-gpu 4, Ray 2, the rest 1, with 8 CamVid val images), on consecutive
calls: the machine stays warm ~30 s after a call, so run them back to back. Here, once (~20 minutes on 2 cores):

    bash bench/gpu_carry.sh prepare            # or --no-ray: no serve section, two calls fewer
    cat bench/results/carry/plan.txt           # the carry list of each call, in order

then one device `run` per line of plan.txt: calls 1..N-1 run `bash bench/gpu_carry.sh stash` (copy the carried
parts to /tmp/pw-carry), and the last runs `bash bench/gpu_carry.sh bench` with timeout_s=600, which reassembles
the parts (`cat parts | xz -d | tar -x`, through Python's lzma) into /tmp/pw-site, puts it first on PYTHONPATH
(with the repository, which Ray's workers import), puts torch's nvidia/*/lib folders on LD_LIBRARY_PATH
(onnxruntime-gpu's CUDA provider loads libcudart.so.13 and cuDNN 9 from there), and runs
`python3 bench/gpu.py --out $OUT/gpu --parity-source /tmp/pw-carry/camvid-val`; gpu.md and gpu.json come back.
E.g. run(command="bash bench/gpu_carry.sh stash", carry=[...call 1's paths...]), ..., then
run(command="bash bench/gpu_carry.sh bench", carry=[...the last call's paths...], timeout_s=600).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/gpu.py` from anywhere, without an install (the GPU machine)
    sys.path.insert(0, str(REPO))

CLASSES = 19  # Cityscapes-sized label set, as in seed 001
SEED = 0
SECTIONS = ("engines", "parity", "training", "attack", "vgatt", "serve", "monitor")
#: each section's share of the time left when it starts, relative to the sections still to run
SECTION_WEIGHTS = {"engines": 0.36, "parity": 0.11, "training": 0.26, "attack": 0.07, "vgatt": 0.04, "serve": 0.1,
                   "monitor": 0.06}
GPU_BUDGET_S = 390.0  # + start-up, imports and the last item's overrun: the run ends within 8 minutes
CPU_BUDGET_S = 210.0
SEGMENT_ACCEPTANCE = 0.8  # segment / network at 2 MPix batch 8 (issue 14)
PRECISIONS = ("fp32", "fp16")
ENGINE_PATHS = ("torch", "onnxruntime", "tensorrt")
BASELINE_THREADS = 2  # "this CPU" of the acceptance: the 2-core development machine
ATTACK_SIZE = (360, 480)
ATTACK_PATCH = 48
ATTACK_TO_CLASS = 1
EOT_DRAWS = (1, 8)
MB = 2**20


@dataclass(frozen=True)
class Setup:
    """What one run measures: the full set on a GPU, a reduced one on the CPU."""

    reduced: bool
    size: tuple[int, int]
    batches: tuple[int, ...]
    models: tuple[str, ...]
    budget_s: float
    cell_seconds: float  # timed seconds per (engine, batch) cell, after warm-up
    warmup_calls: int  # untimed calls before a cell's timing (kernel choice, allocations, lazy sessions)
    min_calls: int  # timed calls per cell at least
    parity_count: int
    parity_size: tuple[int, int]
    train_steps: int
    train_warmup: int
    train_compile: bool
    train_large: tuple[tuple[int, int], int]  # (size, batch) for every model but the U-Net
    attack_steps: dict[int, int]  # EOT draws -> iterations timed
    baseline_attack_steps: dict[int, int]
    vgatt_models: tuple[str, ...]
    serve_arch: str
    serve_precision: str
    serve_clients: int
    serve_requests_per_client: int
    monitor_streams: int  # the monitor's camera streams over the served engine (issue 15)
    monitor_frames: int  # frames per stream
    monitor_repeats: int  # alternated rounds of engine alone / monitor
    #: the least time one item of a section takes (one model, one EOT setting, the service): a section starts
    #: no item with less time left than this, so that the run ends within its budget
    item_seconds: dict[str, float]


def gpu_setup(models: tuple[str, ...]) -> Setup:
    return Setup(reduced=False, size=(1024, 2048), batches=(1, 8), models=models, budget_s=GPU_BUDGET_S,
                 cell_seconds=0.8, warmup_calls=2, min_calls=3, parity_count=8, parity_size=(720, 960),
                 train_steps=20, train_warmup=3, train_compile=True, train_large=((512, 1024), 8),
                 attack_steps={1: 60, 8: 30}, baseline_attack_steps={1: 4, 8: 2},
                 vgatt_models=("unet", "deeplabv3_resnet18"), serve_arch="ladder_densenet121",
                 serve_precision="fp16", serve_clients=8, serve_requests_per_client=6,
                 monitor_streams=4, monitor_frames=30, monitor_repeats=3,
                 item_seconds={"engines": 30, "parity": 8, "training": 45, "attack": 5, "vgatt": 3, "serve": 45,
                               # measured on the H200 (2026-12-04): 30 s of clips, 16 s in process, then Ray's start
                               "monitor": 120})


def cpu_setup(models: tuple[str, ...]) -> Setup:
    return Setup(reduced=True, size=(256, 512), batches=(1, 4), models=models, budget_s=CPU_BUDGET_S,
                 cell_seconds=0.3, warmup_calls=2, min_calls=3, parity_count=2, parity_size=(180, 240),
                 train_steps=3, train_warmup=1, train_compile=False, train_large=((128, 256), 4),
                 attack_steps={1: 4, 8: 2}, baseline_attack_steps={}, vgatt_models=("unet",),
                 serve_arch="unet", serve_precision="fp32", serve_clients=4, serve_requests_per_client=3,
                 monitor_streams=4, monitor_frames=10, monitor_repeats=1,
                 item_seconds={"engines": 10, "parity": 4, "training": 6, "attack": 3, "vgatt": 3, "serve": 25,
                               "monitor": 10})


CPU_MODELS = ("unet", "lraspp_mobilenetv3")


@dataclass
class Row:
    section: str
    model: str
    case: str
    value: float | str | None = None
    unit: str = ""
    baseline: float | None = None
    baseline_of: str = ""
    ratio: float | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------------- time


class Budget:
    """The run's wall-clock budget, shared out among the sections still to run by their weights."""

    def __init__(self, seconds: float, sections: tuple[str, ...]):
        self.deadline = time.monotonic() + seconds
        self.pending = list(sections)

    def section(self, name: str) -> float:
        """Start section `name`: its deadline."""
        weights = sum(SECTION_WEIGHTS[s] for s in self.pending)
        share = SECTION_WEIGHTS[name] / weights if weights else 1.0
        self.pending.remove(name)
        return time.monotonic() + share * max(0.0, self.deadline - time.monotonic())


def time_left(deadline: float) -> float:
    return deadline - time.monotonic()


def synchronizer(device) -> Callable[[], None]:
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def seconds_per_call(call: Callable[[], object], sync: Callable[[], None], min_seconds: float,
                     warmup: int = 2, min_calls: int = 3, max_calls: int = 40) -> float:
    """Median wall time of one call after `warmup` calls, each call synchronised with the device."""
    for _ in range(warmup):
        call()
    sync()
    times: list[float] = []
    while len(times) < min_calls or (sum(times) < min_seconds and len(times) < max_calls):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------- memory


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakHostMemory:
    """Peak resident set over a block, above the resident set at its start (bytes).

    Linux resets the high-water mark on request (`5` into /proc/self/clear_refs), so the peak is exact; where
    that is refused (gVisor), a thread samples the resident set every millisecond instead. glibc hands buffers
    over 32 MiB (its largest mmap threshold) back to the system when they are freed, so a host copy of the logits
    (159 MB a frame at 2 MPix, 19 classes) would show in every call; smaller buffers may be reused from the heap
    and not show, as the CPU run's small frames do."""

    def __enter__(self) -> PeakHostMemory:
        import psutil

        self._process = psutil.Process()
        self.start = self._process.memory_info().rss
        self._exact = False
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
            self._exact = _status_kib("VmHWM") is not None
        self._peak, self._stop = self.start, threading.Event()
        if not self._exact:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self._exact:
            self._peak = max(self.start, 1024 * _status_kib("VmHWM"))
        else:
            self._stop.set()
            self._sampler.join()
        self.growth = max(0, self._peak - self.start)


# ---------------------------------------------------------------------------------------------------- models


def classes():
    from segmenters.spec import ClassInfo

    return tuple(ClassInfo(name=f"class{i}", color=(i * 13 % 256, i * 71 % 256, i * 151 % 256))
                 for i in range(CLASSES))


def make_twin(arch: str, size: tuple[int, int]):
    """`arch` with seeded initial weights (speed does not depend on what weights learnt), on the CPU."""
    import torch

    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import Twin

    torch.manual_seed(SEED)
    spec = ModelSpec(arch=arch, classes=classes(), input_size=size, dataset="benchmark")
    return Twin(build_model(arch, CLASSES).eval(), spec)


def random_frames(count: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, 256, (count, *size, 3), dtype=np.uint8)


def release_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_images(source: str | None, count: int, size: tuple[int, int]) -> tuple[list[tuple[str, np.ndarray]], str]:
    """(name, (3, H, W) float32 in [0, 1]) images and where they came from: `source` (a dataset name or a folder of
    image files), else CamVid val where the data is present, else uniform noise."""
    from export import parity_images
    from segmenters.data import default_data_root

    if source is None and (default_data_root() / "camvid" / "val").is_dir():
        source = "camvid"
    if source is not None:
        return parity_images(source, count, size=size), source
    rng = np.random.default_rng(SEED)
    return [(f"random-{i}", rng.random((3, *size), dtype=np.float32)) for i in range(count)], "random images"


def rectangle_mask(size: tuple[int, int]) -> np.ndarray:
    """The attacked object: a rectangle in the lower middle of the image (where road and cars are in CamVid)."""
    height, width = size
    mask = np.zeros(size, bool)
    mask[height * 5 // 9: height * 5 // 6, width // 2: width * 5 // 6] = True
    return mask


# ---------------------------------------------------------------------------------------------------- the run


class Bench:
    """The run's state: what it measures, where, and the rows of its table."""

    def __init__(self, setup: Setup, device, out: Path, parity_source: str | None, work: Path):
        self.setup, self.device, self.out = setup, device, out
        self.cuda = device.type == "cuda"
        self.parity_source = parity_source
        self.rows: list[Row] = []
        self.errors: list[dict] = []
        self.onnx_dir = work  # engine files: not results (the device tool returns only small files from $OUT)
        self.sync = synchronizer(device)

    def add(self, section: str, model: str, case: str, **fields) -> Row:
        row = Row(section, model, case, **fields)
        self.rows.append(row)
        return row

    def note(self, section: str, model: str, case: str, note: str) -> None:
        self.add(section, model, case, note=note)

    def guarded(self, section: str, model: str, case: str, work: Callable[[], None]) -> None:
        """Run one item; an exception becomes an "error: ..." row (its traceback goes to the JSON)."""
        try:
            work()
        except Exception as exc:  # one item's failure is a row of the table, not the end of the run
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
            self.add(section, model, case, note=f"error: {message}")
            self.errors.append({"section": section, "model": model, "case": case,
                                "traceback": traceback.format_exc()})
        finally:
            release_device_memory()

    def has_time(self, section: str, deadline: float, model: str, case: str) -> bool:
        """False (and a "skipped" row) when the section has less time left than one of its items takes."""
        if time_left(deadline) >= self.setup.item_seconds[section]:
            return True
        self.note(section, model, case, "skipped: out of time (section budget; --budget to give more)")
        return False

    def onnx_file(self, arch: str, precision: str) -> Path:
        """The twin of `arch` exported to ONNX (fp32, or converted to fp16), once per run."""
        from export import export_onnx
        from export.onnx_export import load_model, save_model
        from export.precision import convert_precision

        path = self.onnx_dir / f"{arch}.{precision}.onnx"
        if path.is_file():
            return path
        fp32 = self.onnx_dir / f"{arch}.fp32.onnx"
        if not fp32.is_file():  # traced small: the graph takes any size
            export_onnx(make_twin(arch, self.setup.size), fp32, sample_size=self.setup.parity_size)
        if precision != "fp32":
            save_model(convert_precision(load_model(fp32), precision), path)
        return path

    def seconds_per_call(self, call: Callable[[], object], already_warm: int = 0) -> float:
        """Median seconds of one synchronised call, with this run's warm-up and number of calls."""
        return seconds_per_call(call, self.sync, self.setup.cell_seconds, self.setup.warmup_calls - already_warm,
                                self.setup.min_calls)

    @property
    def ort_device(self) -> str:
        return f"cuda:{self.device.index or 0}" if self.cuda else "cpu"


# ---------------------------------------------------------------------------------------------------- engines


def math_context(device, precision: str):
    import torch

    from segmenters.device import fp32_math

    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return fp32_math(device.type == "cuda")


def network_rates(bench: Bench, twin, precision: str) -> dict[int, float]:
    """Frames/s of the network alone: normalised input already on the device, argmax there, synchronised."""
    import torch

    model = copy.deepcopy(twin.model).to(bench.device).eval()
    layout = torch.channels_last if bench.cuda else torch.contiguous_format  # tensor cores read NHWC
    model = model.to(memory_format=layout)
    rates = {}
    for batch in bench.setup.batches:
        x = torch.randn(batch, 3, *bench.setup.size, device=bench.device).contiguous(memory_format=layout)

        def call():
            with torch.inference_mode(), math_context(bench.device, precision):
                return model(x).argmax(1)

        rates[batch] = batch / bench.seconds_per_call(call)
        bench.add("engines", twin.spec.arch, f"network {precision} b{batch}", value=rates[batch], unit="frames/s",
                  note="baseline: the model alone, argmax on the device")
    return rates


def build_engine(bench: Bench, twin, path: str, precision: str):
    """(engine, None), or (None, why this path does not run here)."""
    from export import OnnxRuntimeEngine, TorchEngine

    if path == "torch":
        return TorchEngine(twin, device=bench.device, precision=precision), None
    if path == "onnxruntime":
        if bench.cuda:
            from export.onnxruntime_engine import provider_problem

            problem = provider_problem("CUDAExecutionProvider")
            if problem:
                return None, f"skipped: {problem} (pip install 'patchwatch[gpu]')"
        return OnnxRuntimeEngine(bench.onnx_file(twin.spec.arch, precision), device=bench.ort_device), None
    if not bench.cuda:
        return None, "no CUDA"
    from export.tensorrt_engine import TensorRTEngine, build_plan, tensorrt_missing_reason

    reason = tensorrt_missing_reason()
    if reason:
        return None, f"skipped: {reason}"
    onnx_path = bench.onnx_file(twin.spec.arch, precision)
    plan = onnx_path.with_suffix(".plan")
    largest = (max(bench.setup.batches), 3, *bench.setup.size)
    build_plan(onnx_path, plan, profile={"min": (1, 3, *bench.setup.size), "opt": largest, "max": largest})
    return TensorRTEngine(plan, device=bench.device.index or 0), None


def segment_rows(bench: Bench, engine, arch: str, path: str, precision: str, network: dict[int, float]) -> None:
    """Frames/s of `engine.segment` on uint8 frames, as a share of the network alone, and its host memory."""
    frames = random_frames(max(bench.setup.batches), bench.setup.size)
    logits_mb = CLASSES * bench.setup.size[0] * bench.setup.size[1] * 4 / MB
    for batch in bench.setup.batches:
        batch_frames = frames[:batch]
        engine.segment(batch_frames)  # first call: lazy sessions, pinned buffers, kernel choice (not memory use)
        with PeakHostMemory() as memory:
            rate = batch / bench.seconds_per_call(lambda: engine.segment(batch_frames), already_warm=1)
        per_frame = memory.growth / batch / MB
        where = "" if bench.cuda else "; on the CPU the logits are host memory"
        verdict = ""
        if bench.cuda and batch == max(bench.setup.batches):
            met = rate / network[batch] >= SEGMENT_ACCEPTANCE
            verdict = f"; >= {SEGMENT_ACCEPTANCE} {'met' if met else 'MISSED'}"
        bench.add("engines", arch, f"{path} {precision} b{batch}", value=rate, unit="frames/s",
                  baseline=network[batch], baseline_of="network", ratio=rate / network[batch],
                  note=f"{engine.backend}; host +{per_frame:.1f} MB/frame (logits {logits_mb:.0f} MB){where}{verdict}")


def engine_path(bench: Bench, twin, path: str, precision: str, network: dict[int, float]) -> None:
    engine, why = build_engine(bench, twin, path, precision)
    if engine is None:
        bench.note("engines", twin.spec.arch, f"{path} {precision}", why)
        return
    try:
        segment_rows(bench, engine, twin.spec.arch, path, precision, network)
    finally:
        del engine


def engines_for_model(bench: Bench, arch: str, deadline: float) -> None:
    twin = make_twin(arch, bench.setup.size)
    for precision in PRECISIONS:
        if precision != "fp32" and not bench.cuda:
            bench.note("engines", arch, f"{precision} (network and every engine)", "no CUDA")
            continue
        network = network_rates(bench, twin, precision)
        for path in ENGINE_PATHS:
            if path == "tensorrt" and not bench.cuda:
                bench.note("engines", arch, f"{path} {precision}", "no CUDA")
                continue
            if time_left(deadline) <= 0:
                bench.note("engines", arch, f"{path} {precision}", "skipped: out of time (section budget)")
                continue
            bench.guarded("engines", arch, f"{path} {precision}",
                          lambda: engine_path(bench, make_twin(arch, bench.setup.size), path, precision, network))


def run_engines(bench: Bench, deadline: float) -> None:
    from tqdm import tqdm

    for arch in tqdm(bench.setup.models, desc="engines", leave=False):
        if bench.has_time("engines", deadline, arch, "every engine"):
            bench.guarded("engines", arch, "network", lambda: engines_for_model(bench, arch, deadline))


# ---------------------------------------------------------------------------------------------------- parity


def parity_for_model(bench: Bench, arch: str, images: list, source: str) -> None:
    from export import TOLERANCES, OnnxRuntimeEngine, TorchEngine, parity_check

    if bench.cuda:
        from export.onnxruntime_engine import provider_problem

        problem = provider_problem("CUDAExecutionProvider")
        if problem:
            bench.note("parity", arch, "onnxruntime", f"skipped: {problem}")
            return
    reference = TorchEngine(make_twin(arch, bench.setup.size), device=bench.device, precision="fp32")
    for precision in PRECISIONS:
        engine = OnnxRuntimeEngine(bench.onnx_file(arch, precision), device=bench.ort_device)
        report = parity_check(engine, reference, images, source=source, tolerance=TOLERANCES[precision])
        where = "" if bench.cuda else " (CPU provider: no CUDA)"
        bench.add("parity", arch, f"onnxruntime {precision} gate", value="PASS" if report.passed else "FAIL",
                  note=f"max |dlogit| {report.max_abs_rel:.2g} x range, labels {100 * report.label_agreement:.4f} %, "
                       f"mIoU {report.miou:.5f}; {engine.math} vs twin {reference.math} on {len(images)} "
                       f"{source} images{where}")
        del engine


def run_parity(bench: Bench, deadline: float) -> None:
    from tqdm import tqdm

    images, source = sample_images(bench.parity_source, bench.setup.parity_count, bench.setup.parity_size)
    for arch in tqdm(bench.setup.models, desc="parity", leave=False):
        if bench.has_time("parity", deadline, arch, "onnxruntime gate"):
            bench.guarded("parity", arch, "onnxruntime gate", lambda: parity_for_model(bench, arch, images, source))


# ---------------------------------------------------------------------------------------------------- training


def images_per_second(result: dict) -> float:
    """The img/s figure of a `training_throughput` result, whatever its key is called."""
    for key in ("img_per_s", "images_per_s", "img_s", "images_per_second", "throughput"):
        if isinstance(result.get(key), (int, float)):
            return float(result[key])
    for key, value in result.items():
        if isinstance(value, (int, float)) and ("img" in key or "image" in key):
            return float(value)
    raise KeyError(f"no img/s among the keys {sorted(result)}")


def training_case(bench: Bench, arch: str) -> tuple[tuple[int, int], int]:
    return ((128, 128), 16) if arch == "unet" else bench.setup.train_large


def train_rate(measure, bench: Bench, arch: str, device, compile_: bool, steps: int, warmup: int) -> tuple[float, dict]:
    size, batch = training_case(bench, arch)
    result = measure(arch, size, batch, device, amp="auto", steps=steps, warmup=warmup, classes=CLASSES,
                     loss="ppce", compile=compile_)
    return images_per_second(result), result


def run_training(bench: Bench, deadline: float) -> None:
    import torch
    from tqdm import tqdm

    from segmenters import training

    measure = getattr(training, "training_throughput", None)
    if measure is None:
        bench.note("training", "every model", "img/s", "error: segmenters.training.training_throughput is not there")
        return
    baseline: dict[str, float] = {}
    if bench.cuda:  # the acceptance's "this CPU": the default U-Net on 2 threads, eager
        def cpu_baseline():
            with torch_threads(BASELINE_THREADS):
                baseline["unet"], _ = train_rate(measure, bench, "unet", torch.device("cpu"), False, 4, 1)
        bench.guarded("training", "unet", "cpu baseline", cpu_baseline)
    ordered = sorted(bench.setup.models, key=lambda arch: arch != "unet")  # the acceptance's model first
    for arch in tqdm(ordered, desc="training", leave=False):
        if bench.has_time("training", deadline, arch, "img/s"):
            bench.guarded("training", arch, "img/s", lambda: training_row(bench, measure, arch, baseline))


def training_row(bench: Bench, measure, arch: str, baseline: dict[str, float]) -> None:
    setup = bench.setup
    rate, result = train_rate(measure, bench, arch, bench.device, setup.train_compile, setup.train_steps,
                              setup.train_warmup)
    size, batch = training_case(bench, arch)
    base = baseline.get(arch)
    details = {k: result[k] for k in ("amp", "compile", "loss") if k in result}
    bench.add("training", arch, f"{size[0]}x{size[1]} b{batch}", value=rate, unit="img/s", baseline=base,
              baseline_of=f"cpu {BASELINE_THREADS} threads" if base else "", ratio=rate / base if base else None,
              note=", ".join(f"{k}={v}" for k, v in details.items()) or f"compile={setup.train_compile}")


# ---------------------------------------------------------------------------------------------------- attack, VGatt


def attack_rate(twin, image: np.ndarray, eot: int, steps: int, sync, warm: bool) -> float:
    """Iterations/s of the MIM patch attack under `eot` EOT draws on the twin's device."""
    from audit.attack import AttackConfig, class_switch_target, patch_attack

    mask = rectangle_mask(ATTACK_SIZE)
    target = class_switch_target(mask, ATTACK_TO_CLASS)
    rows, cols = np.nonzero(mask)
    top, left = int(rows.min()), max(0, int(cols.min()) - ATTACK_PATCH - 8)  # beside the object, as in seed 000
    if warm:  # kernel choice and allocations out of the timing
        patch_attack(twin, image, target, ATTACK_PATCH, top, left, AttackConfig(steps=1, eot_samples=eot), seed=0)
    sync()
    start = time.perf_counter()
    patch_attack(twin, image, target, ATTACK_PATCH, top, left, AttackConfig(steps=steps, eot_samples=eot), seed=0)
    sync()
    return steps / (time.perf_counter() - start)


def twin_on(twin, device):
    from segmenters.twin import Twin

    return Twin(copy.deepcopy(twin.model).to(device).eval(), twin.spec)


def attack_baseline(bench: Bench, twin, image: np.ndarray) -> dict[int, float]:
    """It/s of the same attack on the CPU with the acceptance's 2 threads (CUDA runs only)."""
    import torch

    cpu_twin, rates = twin_on(twin, torch.device("cpu")), {}

    def measure(eot: int, steps: int) -> None:
        rates[eot] = attack_rate(cpu_twin, image, eot, steps, lambda: None, warm=False)

    with torch_threads(BASELINE_THREADS):
        for eot, steps in bench.setup.baseline_attack_steps.items():
            bench.guarded("attack", "unet", f"cpu baseline, {eot} EOT draws", lambda: measure(eot, steps))
    return rates


def run_attack(bench: Bench, deadline: float) -> None:
    twin = make_twin("unet", ATTACK_SIZE)
    image = sample_images(bench.parity_source, 1, ATTACK_SIZE)[0][0][1]
    baseline = attack_baseline(bench, twin, image) if bench.setup.baseline_attack_steps else {}
    device_twin, rates = twin_on(twin, bench.device), {}
    for eot in EOT_DRAWS:
        if bench.has_time("attack", deadline, "unet", f"{eot} EOT draws"):
            bench.guarded("attack", "unet", f"{eot} EOT draws",
                          lambda: attack_row(bench, device_twin, image, eot, baseline, rates))


def attack_row(bench: Bench, twin, image: np.ndarray, eot: int, baseline: dict[int, float],
               rates: dict[int, float]) -> None:
    """One EOT setting's it/s, against the CPU baseline (CUDA) or, on the CPU, against one draw per step."""
    rates[eot] = rate = attack_rate(twin, image, eot, bench.setup.attack_steps[eot], bench.sync, warm=bench.cuda)
    base, base_of = baseline.get(eot), f"cpu {BASELINE_THREADS} threads"
    if base is None and eot != EOT_DRAWS[0] and EOT_DRAWS[0] in rates:
        base, base_of = rates[EOT_DRAWS[0]], f"{EOT_DRAWS[0]} EOT draw"
    bench.add("attack", "unet", f"{ATTACK_SIZE[0]}x{ATTACK_SIZE[1]}, {eot} EOT draws", value=rate, unit="it/s",
              baseline=base, baseline_of=base_of if base else "", ratio=rate / base if base else None,
              note=f"MIM, {ATTACK_PATCH} px patch, {bench.setup.attack_steps[eot]} iterations")


def vgatt_seconds(twin, x, region: np.ndarray, device, sync, warm: bool):
    from audit.vgatt import VGatt

    vgatt = VGatt(copy.deepcopy(twin.model).to(device).eval())  # float64 copy
    x = x.to(device)
    if warm:
        vgatt.attribute(x, ATTACK_TO_CLASS, region)
    sync()
    start = time.perf_counter()
    result = vgatt.attribute(x, ATTACK_TO_CLASS, region)
    sync()
    return time.perf_counter() - start, result


def vgatt_row(bench: Bench, arch: str, image: np.ndarray) -> None:
    import torch

    twin = make_twin(arch, ATTACK_SIZE)
    x = twin.spec.normalization.normalize(torch.from_numpy(image)[None])[0]
    region = rectangle_mask(ATTACK_SIZE)
    base = None
    if bench.cuda:
        with torch_threads(BASELINE_THREADS):
            base, _ = vgatt_seconds(twin, x, region, torch.device("cpu"), lambda: None, warm=False)
    seconds, result = vgatt_seconds(twin, x, region, bench.device, bench.sync, warm=bench.cuda)
    bench.add("vgatt", arch, f"{ATTACK_SIZE[0]}x{ATTACK_SIZE[1]} float64", value=seconds, unit="s/image",
              baseline=base, baseline_of=f"cpu {BASELINE_THREADS} threads" if base else "",
              ratio=base / seconds if base else None,
              note=f"completeness error {result.completeness_error_vs_contributions:.1e} of the contributions "
                   f"({result.completeness_error:.1e} of the score)"
                   + (f"; not piecewise affine: {', '.join(result.non_affine_layers[:3])}"
                      if result.non_affine_layers else ""))


def run_vgatt(bench: Bench, deadline: float) -> None:
    image = sample_images(bench.parity_source, 1, ATTACK_SIZE)[0][0][1]
    for arch in bench.setup.vgatt_models:
        if bench.has_time("vgatt", deadline, arch, "s/image"):
            bench.guarded("vgatt", arch, "s/image", lambda: vgatt_row(bench, arch, image))


# ---------------------------------------------------------------------------------------------------- serving


def concurrent_rate(call, frames: np.ndarray, clients: int, per_client: int) -> float:
    """Frames/s with `clients` threads each sending `per_client` one-frame requests (bench/serve_load.py's load)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_load import concurrent

    return concurrent(call, frames, clients, per_client)[0]


def in_process_segment(bench: Bench, path: Path, frames: np.ndarray) -> tuple[float, np.ndarray, str]:
    """Frames/s of `Engine.segment` in this process at the served batch size, one frame's labels, the backend."""
    from export import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(path, device=bench.ort_device)
    rate = len(frames) / bench.seconds_per_call(lambda: engine.segment(frames))
    return rate, engine.segment(frames[:1]), engine.backend


def serve_rows(bench: Bench, deadline: float) -> None:
    from serving.client import OipClient
    from serving.cluster import free_port, start_local
    from serving.config import ServeConfig

    setup = bench.setup
    path = bench.onnx_file(setup.serve_arch, setup.serve_precision)
    frames = random_frames(setup.serve_clients, setup.size)
    local_rate, local_labels, backend = in_process_segment(bench, path, frames)
    release_device_memory()
    model = {"name": "bench", "path": str(path.resolve()), "max_batch_size": setup.serve_clients,
             "batch_wait_ms": 5.0, "num_gpus": 1.0 if bench.cuda else 0.0,
             "max_ongoing_requests": 4 * setup.serve_clients}
    service = start_local(ServeConfig(models=[model], port=free_port()), metrics_port=free_port(),
                          timeout_s=max(60.0, time_left(deadline)))
    try:
        client = OipClient(service.url, timeout=120)

        def served(batch):
            return client.infer("bench", {"frames": batch}, {"labels": True})["labels"]

        agreement = float((served(frames[:1]) == local_labels).mean())
        concurrent_rate(served, frames, setup.serve_clients, 1)  # warm-up: every replica path, batch shapes
        rate = concurrent_rate(served, frames, setup.serve_clients, setup.serve_requests_per_client)
    finally:
        service.stop()
    bench.add("serve", setup.serve_arch, f"{setup.serve_precision} {setup.size[0]}x{setup.size[1]}, "
              f"{setup.serve_clients} clients x 1 frame", value=rate, unit="frames/s", baseline=local_rate,
              baseline_of=f"segment b{setup.serve_clients} in process", ratio=rate / local_rate,
              note=f"Ray Serve, binary OIP, num_gpus={model['num_gpus']:g}, {backend}; labels agree with "
                   f"in-process on {100 * agreement:.3f} % of pixels")


def run_serve(bench: Bench, deadline: float) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        bench.note("serve", bench.setup.serve_arch, "served vs in process", "skipped: Ray is not installed")
        return
    if bench.has_time("serve", deadline, bench.setup.serve_arch, "served vs in process"):
        bench.guarded("serve", bench.setup.serve_arch, "served vs in process", lambda: serve_rows(bench, deadline))


# ---------------------------------------------------------------------------------------------------- monitor


def monitor_clips(setup: Setup) -> list[list[np.ndarray]]:
    """The monitor's streams: bench/monitor_throughput.py's moving-camera clips, rendered at a quarter of the
    benchmark's size (rendering is the slow part) and enlarged to it, as a high-resolution camera delivers them."""
    import cv2

    sys.path.insert(0, str(Path(__file__).parent))
    from monitor_throughput import make_clips

    height, width = setup.size
    small = make_clips((height // 4, width // 4), setup.monitor_streams, setup.monitor_frames)
    return [[cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR) for frame in clip] for clip in small]


def monitor_rows(bench: Bench) -> None:
    """The monitor over the served engine on this device: frames/s kept against the engine alone (issue 15's
    goal: >= 0.9 with 4 streams), and the detector's cost at its working width against the full frame."""
    from monitor_throughput import detector_alone, throughput_placements

    from export import OnnxRuntimeEngine
    from monitor.flips import FlipConfig

    setup = bench.setup
    engine = OnnxRuntimeEngine(bench.onnx_file(setup.serve_arch, setup.serve_precision), device=bench.ort_device)
    clips = monitor_clips(setup)
    result = throughput_placements({"in_process": (engine, None)}, setup.monitor_streams, setup.monitor_frames,
                                   setup.monitor_repeats, clips)
    kept, config = result["in_process"], FlipConfig()
    size = f"{setup.size[0]}x{setup.size[1]}"
    bench.add("monitor", setup.serve_arch, f"{setup.serve_precision} {size}, {setup.monitor_streams} streams",
              value=kept["pipeline_fps"], unit="frames/s", baseline=kept["engine_fps"],
              baseline_of=f"engine alone, batch {setup.monitor_streams}", ratio=kept["kept_share"],
              note=f"{kept['detect_workers']} detector threads, {kept['engine_busy_share']:.0%} of the time in engine "
                   f"calls; detector {result['detector']['ms_per_frame']:.1f} ms/frame at work_width "
                   f"{config.work_width}; goal >= 0.9")
    sample = [clip[:setup.monitor_frames] for clip in clips[:1]]
    labels = [engine.segment(np.stack(clip)) for clip in sample]
    names = [c.name for c in engine.spec.classes]
    working = detector_alone(sample, labels, names, config)
    full = detector_alone(sample, labels, names, FlipConfig(work_width=setup.size[1]))
    bench.add("monitor", "detector", f"work_width {config.work_width} vs the full {size} frame",
              value=1000.0 / working, unit="ms/frame", baseline=1000.0 / full, baseline_of="full frame",
              ratio=working / full, note="one thread; ratio: times faster")


def run_monitor(bench: Bench, deadline: float) -> None:
    if bench.has_time("monitor", deadline, bench.setup.serve_arch, "monitor vs engine alone"):
        bench.guarded("monitor", bench.setup.serve_arch, "monitor vs engine alone", lambda: monitor_rows(bench))


RUNNERS = {"engines": run_engines, "parity": run_parity, "training": run_training, "attack": run_attack,
           "vgatt": run_vgatt, "serve": run_serve, "monitor": run_monitor}


# ---------------------------------------------------------------------------------------------------- report


def environment(device) -> dict:
    import torch

    from segmenters.device import describe_device

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "device": describe_device(device)}
    with contextlib.suppress(Exception):
        import onnxruntime

        from export import available_providers

        info["onnxruntime"] = f"{onnxruntime.__version__} ({', '.join(available_providers())})"
    from export.tensorrt_engine import tensorrt_missing_reason

    info["tensorrt"] = tensorrt_missing_reason() or __import__("tensorrt").__version__
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = "not installed"
    return info


def header(bench: Bench, env: dict, sections: tuple[str, ...], budget: float) -> list[str]:
    setup = bench.setup
    lines = [f"patchwatch GPU benchmark: {env['device']}; torch {env['torch']} (CUDA {env['torch_cuda']}); "
             f"onnxruntime {env.get('onnxruntime', '?')}; tensorrt: {env['tensorrt']}; ray: {env['ray']}",
             f"sections {', '.join(sections)}; budget {budget:.0f} s; {len(setup.models)} models at "
             f"{setup.size[0]}x{setup.size[1]}, batches {', '.join(map(str, setup.batches))}"]
    if setup.reduced:
        lines.insert(0, "NO CUDA HERE: this is the reduced CPU set (smaller frames, fewer models and steps, a shorter "
                        "budget); rows that need a GPU read 'no CUDA'. The acceptance figures need a CUDA machine "
                        "(see this script's docstring).")
    return lines


def cell(value, unit: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if abs(value) >= 1 else 3
    return f"{value:.{digits}f} {unit}".strip()


def table(rows: list[Row]) -> str:
    lines = ["| section | model | case | value | baseline | x baseline | note |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        baseline = f"{cell(row.baseline)} ({row.baseline_of})" if row.baseline is not None else ""
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else ""
        lines.append(f"| {row.section} | {row.model} | {row.case} | {cell(row.value, row.unit)} | {baseline} | "
                     f"{ratio} | {row.note} |")
    return "\n".join(lines)


def acceptance(bench: Bench) -> list[str]:
    """Issue 14's GPU acceptance, judged from the rows (only where they were measured)."""
    if not bench.cuda:
        return ["acceptance: not judged (it needs a CUDA GPU)"]
    big = max(bench.setup.batches)

    def rows(section: str, case_start: str = "", model: str | None = None) -> list[Row]:
        return [r for r in bench.rows if r.section == section and r.case.startswith(case_start)
                and (model is None or r.model == model) and r.value is not None]

    checks = []
    for path in ("torch", "onnxruntime"):
        ratios = [r.ratio for r in rows("engines", path) if r.case.endswith(f"b{big}") and r.ratio is not None]
        checks.append((f"{path} segment >= {SEGMENT_ACCEPTANCE} x network at batch {big}",
                       min(ratios) if ratios else None, SEGMENT_ACCEPTANCE))
    ladder = [r.value for r in rows("engines", model="ladder_densenet121")
              if r.case.endswith(f"fp16 b{big}") and not r.case.startswith("network")]
    checks.append(("ladder DenseNet segment fp16 >= 100 frames/s", max(ladder) if ladder else None, 100.0))
    gates = rows("parity")
    checks.append(("every parity gate passes", sum(r.value == "PASS" for r in gates) / len(gates) if gates else None,
                   1.0))
    for section, case, goal in (("training", "", 20.0), ("attack", f"{ATTACK_SIZE[0]}x{ATTACK_SIZE[1]}, 8 EOT", 50.0),
                                ("serve", "", 0.8)):
        ratios = [r.ratio for r in rows(section, case, "unet" if section != "serve" else None) if r.ratio]
        checks.append((f"{section} >= {goal:g} x its baseline", ratios[0] if ratios else None, goal))
    return [f"acceptance: {name}: " + ("not measured" if figure is None else
                                       f"{figure:.3g} -> {'met' if figure >= goal else 'MISSED'}")
            for name, figure, goal in checks]


def write_report(bench: Bench, env: dict, lines: list[str], started: float) -> str:
    text = "\n".join(lines + ["", table(bench.rows), "",
                              "x baseline: the figure over its baseline (seconds: the baseline over the figure), "
                              f"so above 1 is faster; run took {time.monotonic() - started:.0f} s", ""]
                      + acceptance(bench))
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / "gpu.md").write_text(text + "\n")
    (bench.out / "gpu.json").write_text(json.dumps(
        {"environment": env, "setup": asdict(bench.setup), "rows": [asdict(r) for r in bench.rows],
         "errors": bench.errors, "elapsed_s": time.monotonic() - started}, indent=2, default=str))
    return text


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"wall-clock seconds for the sections (default {GPU_BUDGET_S:.0f} on CUDA, "
                             f"{CPU_BUDGET_S:.0f} on the CPU)")
    parser.add_argument("--out", default="bench/results/gpu")
    parser.add_argument("--models", default=None, help="comma-separated zoo models (default: the zoo on CUDA, "
                                                       f"{', '.join(CPU_MODELS)} on the CPU)")
    parser.add_argument("--parity-source", default=None,
                        help="images for the parity gate, attack and VGatt: a dataset name or a folder of images "
                             "(default: CamVid val where the data is present, else random images)")
    return parser.parse_args(argv)


def make_bench(args: argparse.Namespace, work: Path) -> tuple[Bench, tuple[str, ...], float]:
    from segmenters.device import DeviceError, resolve_device
    from segmenters.models import MODELS

    try:
        device = resolve_device(args.device)
    except DeviceError as exc:
        raise SystemExit(f"bench/gpu.py: {exc}") from None
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; expected some of {', '.join(SECTIONS)}")
    default_models = tuple(sorted(MODELS)) if device.type == "cuda" else CPU_MODELS
    models = tuple(args.models.split(",")) if args.models else default_models
    missing = sorted(set(models) - set(MODELS))
    if missing:
        raise SystemExit(f"unknown models {missing}; the zoo has {', '.join(sorted(MODELS))}")
    setup = gpu_setup(models) if device.type == "cuda" else cpu_setup(models)
    budget = args.budget if args.budget is not None else setup.budget_s
    return Bench(setup, device, Path(args.out), args.parity_source, work), sections, budget


def main(argv: list[str] | None = None) -> None:
    import tempfile

    from tqdm import tqdm

    started = time.monotonic()
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pw-gpu-bench-") as work:
        bench, sections, budget_s = make_bench(args, Path(work))
        env = environment(bench.device)
        lines = header(bench, env, sections, budget_s)
        print("\n".join(lines), flush=True)
        budget = Budget(budget_s, sections)
        for name in tqdm(sections, desc="sections"):
            deadline = budget.section(name)
            bench.guarded(name, "-", "section", lambda: RUNNERS[name](bench, deadline))
            write_report(bench, env, lines, started)  # after each section: a run cut short still leaves its rows
    print(write_report(bench, env, lines, started))


if __name__ == "__main__":
    main()
