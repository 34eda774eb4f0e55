"""`patchwatch train`: one training loop for every zoo model, dataset and loss (Algorithm 3.1 for SEMEDA).

Resumable: `last.pt` is written atomically after every epoch with the optimiser, grad scaler, schedule position,
RNG seeds and the pretrained SEMEDA network, all on the CPU, so a killed run continues where it stopped with
`--resume`, on this device or another, with this precision or another.

On CUDA the step runs under mixed precision (bf16 autocast where the GPU has it, else fp16 with a grad scaler),
channels_last and torch.compile, fed by DataLoader workers through pinned memory; on the CPU the default is the
eager fp32 forward (torch.compile is asked for with `compile: true`: on 2 CPU cores it took minutes to compile the
LR-ASPP and was no faster after). A SEMEDA loss is compiled on every device: on the CPU inductor fuses the
elementwise work around g_phi's convolutions, and the fair plan's step went from 1.98x to 1.24x a PPCE step for
~40 s of compiling once a run (bench/semeda_step.py; the Sobel step, 1.2x PPCE, was no faster compiled).

Budgets: `max_steps` bounds every optimiser step of the run, the SEMEDA network's pretraining batches included
(pretraining takes its `semeda_pretrain_batches`, training the rest); `epochs` bounds the passes over the training
set. Validation runs after the first epoch, every `eval_every` epochs and after the last, so a run stopped early
has a `best.pt` from its first epoch on.

Batch-norm running statistics are recomputed over `bn_recalibration_batches` training batches (a cumulative
average, `torch.optim.swa_utils.update_bn`) at the end of every epoch that is validated (so before every best.pt and
the final last.pt): the running averages training leaves behind lag the weights (torchvision's MobileNetV3 keeps 1 %
of each batch), and a short CamVid LR-ASPP run evaluated with them predicted one class everywhere (issue 20). The
recalibration starts from nothing each time and training's forward passes never read the running statistics, so
skipping it at the epochs in between changes no validated figure and no final weight; it saves its cost (a quarter
of a DeepLabV3 epoch on the CPU) at those epochs, whose last.pt, kept only to resume from, holds training's own
running averages.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import matplotlib
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch.optim.swa_utils import update_bn
from tqdm.auto import tqdm

from segmenters.data import build_dataset, dataset_classes
from segmenters.data.loading import device_batches, loader_workers
from segmenters.device import DEVICE_HELP, describe_device, native_bf16, resolve_device
from segmenters.evaluate import evaluate
from segmenters.losses import SegmentationLoss
from segmenters.losses.semeda import SemedaNet, pretrain_semeda_net
from segmenters.models import MODELS, build_model
from segmenters.spec import ModelSpec, Normalization
from segmenters.twin import Twin, print_warning, read_checkpoint, save_twin

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AmpMode = Literal["auto", "bf16", "fp16", "off"]
#: the autocast dtype of each reduced precision
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the progress bar shows the loss every this many steps: reading it waits for the device
PROGRESS_EVERY_STEPS = 10
#: what must match for `--resume` to continue a run (device, precision, workers may change)
RESUME_MUST_MATCH = ("arch", "dataset", "loss", "size")


class TrainSetupError(ValueError):
    """A run that cannot start as configured (a precision the device lacks, a checkpoint of another run)."""


class TrainConfig(BaseModel):
    """Everything a run depends on; saved beside the checkpoints as config.yaml."""

    model_config = ConfigDict(extra="forbid")

    arch: str = "unet"
    dataset: str = "shapes"
    data_root: str | None = None
    loss: Literal["ppce", "sobel", "semeda"] = "ppce"
    lambdas: tuple[float, ...] | None = Field(None, description="SEMEDA lambda_1..3 or Sobel lambda_1")
    size: tuple[int, int] = Field((128, 128), description="(height, width) images are brought to")
    crop: tuple[int, int] | None = Field(None, description="training crop of real data; default: size")
    scale_range: tuple[float, float] = (0.5, 2.0)
    train_length: int = Field(2000, description="synthetic shapes: training scenes")
    val_length: int = Field(300, description="synthetic shapes: held-out validation scenes")
    epochs: int = Field(14, description="passes over the training set")
    max_steps: int | None = Field(None, ge=1, description="the run's optimiser steps in all: SEMEDA pretraining "
                                                          "batches plus training steps")
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    semeda_pretrain_batches: int = Field(300, ge=1, description="SEMEDA: optimiser steps (one batch of training "
                                                               "masks each) that pretrain g_phi before training")
    bn_recalibration_batches: int = Field(10, ge=0, description="training batches batch-norm running statistics "
                                                                "are recomputed over before each validation (and "
                                                                "so each best.pt and the final last.pt); 0 keeps "
                                                                "training's running averages")
    val_limit: int | None = Field(None, description="evaluate on at most this many validation images")
    eval_every: int = Field(7, description="validate after epoch 1, every this many epochs and after the last")
    threads: int | None = None
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the training step: auto (the model "
                                                                "on CUDA, a SEMEDA loss everywhere), true or false; "
                                                                "eager if compiling fails")
    device: str = Field("auto", description=f"where to train: {DEVICE_HELP}")
    amp: AmpMode = Field("auto", description="mixed precision: auto (CUDA: bf16 where the GPU has it, else fp16 "
                                             "with a grad scaler; CPU: off), bf16, fp16 or off")
    workers: int | None = Field(None, ge=0, description="DataLoader worker processes; default: on CUDA a few "
                                                        "(pinned memory), on the CPU 0")
    out: str = "runs/default"

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown architecture {value!r}; the zoo has {sorted(MODELS)}")
        return value

    @field_validator("epochs", "batch_size", "train_length", "val_length", "eval_every")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @model_validator(mode="after")
    def _training_steps_left(self) -> TrainConfig:
        if self.loss == "semeda" and self.max_steps is not None and self.max_steps <= self.semeda_pretrain_batches:
            raise ValueError(f"max_steps={self.max_steps} leaves no training step after the "
                             f"semeda_pretrain_batches={self.semeda_pretrain_batches} SEMEDA pretraining steps it "
                             "includes: raise --max-steps or lower --semeda-pretrain-batches")
        return self

    def pretrain_steps(self) -> int:
        """Optimiser steps spent before training: SEMEDA's pretraining batches (0 for other losses)."""
        return self.semeda_pretrain_batches if self.loss == "semeda" else 0

    def training_steps(self, steps_per_epoch: int) -> int:
        """Training's optimiser steps: `epochs` passes, within what `max_steps` leaves after pretraining."""
        by_epochs = self.epochs * steps_per_epoch
        return by_epochs if self.max_steps is None else min(by_epochs, self.max_steps - self.pretrain_steps())

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config is a mapping of fields, got {type(data).__name__}")
        return cls.model_validate({**data, **{k: v for k, v in overrides.items() if v is not None}})


def resolve_amp(request: str, device: torch.device) -> str:
    """The precision a run trains in: 'bf16', 'fp16' or 'off'. `auto` is bf16 on a CUDA device that has it, fp16 on
    one that does not, and off on the CPU (the default CPU run stays the fp32 step it always was). bf16 asked for on
    a CPU without bf16 hardware runs, with a warning: it is emulated there, and far slower than fp32."""
    if request not in ("auto", "off", *AMP_DTYPES):
        raise TrainSetupError(f"unknown amp mode {request!r}: expected auto, bf16, fp16 or off")
    bf16 = native_bf16(device)
    if request == "auto":
        return ("bf16" if bf16 else "fp16") if device.type == "cuda" else "off"
    if request == "bf16" and device.type == "cuda" and not bf16:
        raise TrainSetupError(f"amp 'bf16' was asked for, but {describe_device(device)} has no bfloat16 arithmetic: "
                              "use fp16 or off")
    if request == "bf16" and not bf16:
        print_warning("this CPU has neither AMX nor AVX512-BF16: bf16 autocast is emulated, several times slower "
                      "than fp32 (--amp off)", "amp bf16")
    return request


class CompilePlan(NamedTuple):
    """Which parts of the training step torch.compile runs: the model's forward, the loss (forward and backward)."""

    model: bool
    loss: bool


def resolve_compile(request: bool | str, device: torch.device, loss: str) -> CompilePlan:
    """`auto`: the model on CUDA only (on the CPU inductor spent minutes compiling the LR-ASPP and the step was no
    faster); a SEMEDA loss everywhere (its step: 1.98x -> 1.24x PPCE's on the CPU; Sobel's gained nothing). True or
    false: both parts or neither. PPCE, one cross entropy, is never compiled: there is nothing to fuse."""
    embedding_term = loss != "ppce"
    if request == "auto":
        return CompilePlan(model=device.type == "cuda", loss=loss == "semeda")
    return CompilePlan(model=bool(request), loss=bool(request) and embedding_term)


class _NoCudaRuntimeNotice(logging.Filter):
    """Inductor imports torch's C++ extension loader, which warns "No CUDA runtime is found" wherever a CUDA toolkit
    is installed without a GPU: noise in a CPU run, whose compiled code needs no CUDA."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _quiet_cuda_probe(device: torch.device) -> None:
    extension_log = logging.getLogger("torch.utils.cpp_extension")
    if device.type == "cpu" and not any(isinstance(f, _NoCudaRuntimeNotice) for f in extension_log.filters):
        extension_log.addFilter(_NoCudaRuntimeNotice())


class TrainingStep:
    """One optimiser step of `train()`: the batch to the device (non-blocking), normalised, channels_last; forward
    and loss (each compiled as `compile` says) under the run's autocast; backward through the grad scaler (fp16
    only; a no-op otherwise); update. If a compiled part fails, forward or backward, the step is redone eagerly and
    the run stays eager. The learning rate is the caller's."""

    def __init__(self, model: torch.nn.Module, criterion: SegmentationLoss, optimizer: torch.optim.Optimizer,
                 normalization: Normalization, device: torch.device, amp: str, compile: CompilePlan):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.normalization, self.device, self.amp = normalization, device, amp
        if any(compile):
            _quiet_cuda_probe(device)
        self.forward = torch.compile(model) if compile.model else model
        self.loss = torch.compile(criterion) if compile.loss else criterion
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    @property
    def compiled(self) -> CompilePlan:
        return CompilePlan(model=self.forward is not self.model, loss=self.loss is not self.criterion)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        inputs = self.normalization.normalize(images).contiguous(memory_format=torch.channels_last)
        try:
            loss, parts = self._forward_backward(inputs, labels)
        except Exception as exc:  # no C compiler, unsupported op, a wrong stride in backward...: train eagerly
            if not any(self.compiled):
                raise
            tqdm.write(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly")
            self.forward, self.loss = self.model, self.criterion
            loss, parts = self._forward_backward(inputs, labels)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, parts

    def _forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor):
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss, parts = self.loss(self.forward(inputs), labels)
        self.scaler.scale(loss).backward()
        return loss, parts

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def scaler_state(self) -> dict | None:
        """The grad scaler's state (plain numbers, no tensors), or None when there is no scaler (bf16, fp32)."""
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_scaler_state(self, state: dict | None) -> None:
        """Continue a saved scale; a run saved without one (or resumed without fp16) starts or drops it."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


@dataclass
class RunProgress:
    """Where a run stands, besides weights and optimiser: what `last.pt` records to resume from."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_miou: float = -1.0


def to_cpu(value):
    """`value` with every tensor in it (nested dicts, lists, tuples) moved to the CPU: state that loads anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def _datasets(config: TrainConfig, progress: bool):
    common = {"root": config.data_root, "size": config.size, "seed": config.seed}
    train_set = build_dataset(
        config.dataset, "train", train=True, crop=config.crop, scale_range=config.scale_range,
        length=config.train_length, cache=True, **common,
    )
    val_set = build_dataset(config.dataset, "val", length=config.val_length, cache=True, **common)
    if hasattr(train_set, "warm"):
        train_set.warm(progress=progress)
        val_set.warm(progress=progress)
    return train_set, val_set


def _poly(step: int, total: int, power: float) -> float:
    return max(0.0, 1.0 - step / max(total, 1)) ** power


def _spec(config: TrainConfig, device: torch.device, amp: str) -> ModelSpec:
    return ModelSpec(
        arch=config.arch,
        classes=dataset_classes(config.dataset),
        normalization=Normalization(),
        input_size=config.size,
        dataset=config.dataset,
        training={"loss": config.loss, "lambdas": config.lambdas, "seed": config.seed,
                  "device": describe_device(device), "amp": amp},
    )


def _resume_checkpoint(config: TrainConfig, resume: bool) -> dict | None:
    """The checkpoint `--resume` continues (None without it), refused when it belongs to another kind of run."""
    if not resume:
        return None
    last = Path(config.out) / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {last}")
    checkpoint = read_checkpoint(last)
    saved = TrainConfig.model_validate(checkpoint["config"])
    for key in RESUME_MUST_MATCH:
        if getattr(saved, key) != getattr(config, key):
            raise TrainSetupError(f"cannot resume {last}: it was trained with {key}={getattr(saved, key)!r}, "
                                  f"this run asks for {getattr(config, key)!r}")
    return checkpoint


def _restore(checkpoint: dict | None, step: TrainingStep) -> RunProgress:
    """Weights, optimiser and scaler from a (CPU) checkpoint onto the model's device; where the run stood."""
    if checkpoint is None:
        return RunProgress()
    step.model.load_state_dict(checkpoint["model"])
    step.optimizer.load_state_dict(checkpoint["optimizer"])  # moves the saved state to the parameters' device
    step.load_scaler_state(checkpoint.get("grad_scaler"))
    return RunProgress(checkpoint["epoch"], checkpoint["step"], checkpoint["history"], checkpoint["best_miou"])


def _semeda_net(config: TrainConfig, spec: ModelSpec, train_set, saved_state: dict | None, device: torch.device,
                workers: int, progress: bool) -> tuple[SemedaNet | None, dict | None]:
    """The SEMEDA loss's frozen g_phi on `device` (None for other losses): restored from the checkpoint, or
    pretrained on ground-truth masks only (Algorithm 3.1, first half), with its edge-detection figures."""
    if config.loss != "semeda":
        return None, None
    if saved_state is not None:
        net = SemedaNet(spec.num_classes)
        net.load_state_dict(saved_state)
        return net.to(device), None
    loader = device_batches(train_set, config.batch_size, device, workers, seed=config.seed)
    masks = (labels for _ in itertools.count() for _, labels in loader)  # epochs, streamed
    net, figures = pretrain_semeda_net(masks, config.pretrain_steps(), spec.num_classes, spec.ignore_index,
                                       seed=config.seed, progress=progress, device=device)
    (Path(config.out) / "semeda_net.json").write_text(json.dumps(figures, indent=2))
    return net, figures


@contextlib.contextmanager
def _cudnn_autotune(device: torch.device):
    """On CUDA, let cuDNN time its convolution algorithms for the run's fixed shapes; restored after."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _train_epoch(step: TrainingStep, loader, config: TrainConfig, total_steps: int, run: RunProgress,
                 bar_title: str, progress: bool) -> dict[str, float]:
    """Optimiser steps over `loader` (until `total_steps`); the epoch's mean of each loss part."""
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    bar = tqdm(loader, desc=bar_title, disable=not progress)
    for images, labels in bar:
        for group in step.optimizer.param_groups:
            group["lr"] = config.lr * _poly(run.step, total_steps, config.poly_power)
        loss, parts = step(images, labels)
        run.step += 1
        seen += 1
        for key, value in parts.items():
            sums[key] = sums[key] + value if key in sums else value
        if progress and run.step % PROGRESS_EVERY_STEPS == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{step.optimizer.param_groups[0]['lr']:.2e}")
        if run.step >= total_steps:
            break
    return {key: float(value) / max(seen, 1) for key, value in sums.items()}


def _save_epoch(config: TrainConfig, spec: ModelSpec, step: TrainingStep, run: RunProgress,
                semeda_state: dict | None) -> None:
    """best.pt when validation improved, last.pt always (every tensor on the CPU), history.json and its plot."""
    out, record = Path(config.out), run.history[-1]
    extra = {
        "optimizer": to_cpu(step.optimizer.state_dict()), "grad_scaler": step.scaler_state(), "epoch": run.epoch,
        "step": run.step, "history": run.history, "config": json.loads(config.model_dump_json()),
        "semeda_net": semeda_state,
    }
    if record.get("val_miou") is not None and record["val_miou"] > run.best_miou:
        run.best_miou = record["val_miou"]
        save_twin(out / "best.pt", step.model, spec, **extra, best_miou=run.best_miou)
    save_twin(out / "last.pt", step.model, spec, **extra, best_miou=run.best_miou)
    (out / "history.json").write_text(json.dumps(run.history, indent=2))
    plot_history(run.history, out / "history.png")


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train, evaluating on the validation split after epochs; returns the final summary.

    Raises `DeviceError` (a device this machine lacks) or `TrainSetupError` before anything is rendered or written."""
    device = resolve_device(config.device)
    amp = resolve_amp(config.amp, device)
    checkpoint = _resume_checkpoint(config, resume)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    spec = _spec(config, device, amp)
    workers = loader_workers(config.workers, device)
    train_set, val_set = _datasets(config, progress)

    torch.manual_seed(config.seed)  # the initial weights: the same on every device
    # channels_last: ~15% faster convolutions on CPU (oneDNN) and on tensor cores.
    model = build_model(config.arch, spec.num_classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    (out / "config.yaml").write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
    semeda_net, semeda_figures = _semeda_net(config, spec, train_set, (checkpoint or {}).get("semeda_net"), device,
                                             workers, progress)
    semeda_state = None if semeda_net is None else to_cpu(semeda_net.state_dict())
    criterion = SegmentationLoss(config.loss, spec.num_classes, spec.ignore_index, config.lambdas, semeda_net)
    step = TrainingStep(model, criterion, optimizer, spec.normalization, device, amp,
                        resolve_compile(config.compile, device, config.loss))
    run = _restore(checkpoint, step)

    started = time.time()
    with _cudnn_autotune(device):
        _run_epochs(config, spec, step, run, train_set, val_set, workers, semeda_state, progress)
    summary = {
        "out": str(out),
        "steps": run.step,
        "semeda_pretrain_steps": config.pretrain_steps(),
        "optimizer_steps": config.pretrain_steps() + run.step,
        "epochs": len(run.history),
        "best_val_miou": run.best_miou,
        "final_val_miou": run.history[-1].get("val_miou") if run.history else None,
        "train_seconds_this_run": round(time.time() - started, 1),
        "semeda_net": semeda_figures,
        "device": describe_device(device),
        "amp": amp,
        "workers": workers,
        "compiled": step.compiled._asdict(),
        # the last validation's one-class warning: a twin that predicts one class everywhere is not refused
        "warnings": [run.history[-1]["val_warning"]] if run.history and "val_warning" in run.history[-1] else [],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run_epochs(config: TrainConfig, spec: ModelSpec, step: TrainingStep, run: RunProgress, train_set, val_set,
                workers: int, semeda_state: dict | None, progress: bool) -> None:
    """The epochs left: train, recalibrate batch norm, validate when due, checkpoint."""
    total_steps = config.training_steps(-(-len(train_set) // config.batch_size))
    loader = device_batches(train_set, config.batch_size, step.device, workers, seed=config.seed,
                            drop_last=len(train_set) > config.batch_size)
    for epoch in range(run.epoch, config.epochs):
        if run.step >= total_steps:
            break
        step.model.train()
        # The epoch's order, and augmentation drawn in this process (workers=0): identical on resume. Worker
        # processes draw theirs from a seed taken when they started.
        loader.generator.manual_seed(config.seed * 10_000 + epoch)
        torch.manual_seed(config.seed * 10_000 + epoch)
        epoch_started = time.perf_counter()
        means = _train_epoch(step, loader, config, total_steps, run, f"epoch {epoch + 1}/{config.epochs}", progress)
        record = {"epoch": epoch + 1, "step": run.step, **means, "device": str(step.device), "amp": step.amp}
        if _validation_due(config, epoch + 1, run.step >= total_steps):
            recalibrate_batch_norm(step.model, loader, spec.normalization, step.device,
                                   config.bn_recalibration_batches, seed=config.seed)
            record.update(_validate(config, spec, step, val_set, workers, f"epoch {epoch + 1}" if progress else None))
        # the epoch's own wall-clock (training, recalibration, validation): a run's time adds up from its history
        # even when a piece of it was killed before train() could report
        record["seconds"] = round(time.perf_counter() - epoch_started, 2)
        run.epoch = epoch + 1
        run.history.append(record)
        _save_epoch(config, spec, step, run, semeda_state)
        if progress:
            tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))


def _validation_due(config: TrainConfig, epoch: int, last: bool) -> bool:
    """After the first epoch (so an early stop leaves a best.pt), every `eval_every`, and after the last."""
    return epoch == 1 or epoch % config.eval_every == 0 or epoch == config.epochs or last


def _validate(config: TrainConfig, spec: ModelSpec, step: TrainingStep, val_set, workers: int,
              announce: str | None) -> dict:
    """The epoch's validation figures: mIoU, and the one-class warning when the twin predicts one class for
    (nearly) everything, printed as `WARNING: validation after <announce>` (not for None: a run without progress
    output; the summary lists it either way)."""
    twin = Twin(step.model, spec)  # evaluation runs the eager module in fp32; only the training step is compiled
    report = evaluate(twin, val_set, batch_size=config.batch_size, bands=(), limit=config.val_limit,
                      progress=False, workers=workers)
    step.model.train()
    figures = {"val_miou": report["miou"]}
    for warning in report["warnings"]:
        figures["val_warning"] = warning
        if announce is not None:
            print_warning(warning, f"validation after {announce}")
    return figures


def recalibrate_batch_norm(model: torch.nn.Module, loader, normalization: Normalization, device: torch.device,
                           batches: int, seed: int) -> None:
    """Recompute every batch norm's running mean and variance as the plain average over the first `batches`
    batches of `loader` (`torch.optim.swa_utils.update_bn`: momentum None), in fp32, on the model's device.

    The batches are the same every time (order and augmentation drawn from `seed`, the caller's random state
    untouched), so a resumed run saves the statistics the uninterrupted one did. `batches=0` leaves them alone."""
    if batches == 0:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loader.generator.manual_seed(seed)
        inputs = (normalization.normalize(images.to(device, non_blocking=True))
                  .contiguous(memory_format=torch.channels_last)
                  for images, _ in itertools.islice(loader, batches))
        update_bn(inputs, model)


def training_throughput(arch: str, size: tuple[int, int], batch_size: int, device: str | torch.device,
                        amp: str = "auto", steps: int = 20, warmup: int = 3, classes: int = 19, loss: str = "ppce",
                        compile: bool | str = "auto", lambdas: tuple[float, ...] | None = None) -> dict:
    """Training images/s of `train()`'s own step (model, criterion, AdamW, precision, channels_last, compile, the
    host-to-device copy of a pinned batch) on random data: `warmup` untimed steps (compilation, autotuning), then
    `steps` timed ones, the device synchronised before and after. Writes nothing. `device`: a `torch.device` or
    what `--device` takes; `amp` as `TrainConfig.amp`; `loss="semeda"` uses an untrained g_phi (it costs the same);
    `lambdas` as `TrainConfig.lambdas` (the loss's default when None: what is computed depends on them); `compile`
    as `TrainConfig.compile`."""
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and batch_size >= 1, got {steps}, {warmup}, {batch_size}")
    device = resolve_device(device)
    amp = resolve_amp(amp, device)
    defaults = TrainConfig()
    torch.manual_seed(defaults.seed)
    model = build_model(arch, classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=defaults.lr, weight_decay=defaults.weight_decay)
    semeda_net = SemedaNet(classes).to(device) if loss == "semeda" else None
    criterion = SegmentationLoss(loss, classes, lambdas=lambdas, semeda_net=semeda_net)
    step = TrainingStep(model.train(), criterion, optimizer, Normalization(), device, amp,
                        resolve_compile(compile, device, loss))
    images, labels = _random_batch(batch_size, size, classes, device)
    with _cudnn_autotune(device):
        for _ in range(warmup):
            step(images, labels)
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            step(images, labels)
        _synchronize(device)
        seconds = time.perf_counter() - started
    return {"arch": arch, "size": list(size), "batch_size": batch_size, "device": describe_device(device), "amp": amp,
            "loss": loss, "lambdas": list(criterion.lambdas), "classes": classes, "compile": step.compiled._asdict(),
            "steps": steps, "seconds": round(seconds, 4),
            "img_per_s": round(batch_size * steps / seconds, 2)}


def _random_batch(batch_size: int, size: tuple[int, int], classes: int, device: torch.device):
    """A batch as the DataLoader hands it over: [0, 1] images and labels on the host, pinned for CUDA."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, *size, generator=generator)
    labels = torch.randint(0, classes, (batch_size, *size), generator=generator)
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return images, labels


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plot_history(history: list[dict], path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h.get("ppce", float("nan")) for h in history], marker="o", label="train PPCE")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h.get("val_miou") or float("nan") for h in history], marker="s", color="C1", label="val mIoU")
    ax2.set_ylabel("val mIoU")
    ax2.set_ylim(0, 1)
    ax.set_title("training history")
    fig.legend(loc="outside upper right", ncols=2, frameon=False)  # above the axes: covers no label, no line
    fig.savefig(path, dpi=110)
    plt.close(fig)
