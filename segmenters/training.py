"""`patchwatch train`: one training loop for every zoo model, dataset and loss (Algorithm 3.1 for SEMEDA).

Resumable: `last.pt` is written atomically after every epoch with the optimiser, schedule position, RNG
seeds and the pretrained SEMEDA network, so a killed run continues where it stopped with `--resume`.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Literal

import matplotlib
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from segmenters.data import build_dataset, dataset_classes
from segmenters.evaluate import evaluate
from segmenters.losses import SegmentationLoss
from segmenters.losses.semeda import SemedaNet, pretrain_semeda_net
from segmenters.models import MODELS, build_model
from segmenters.spec import ModelSpec, Normalization
from segmenters.twin import Twin, read_checkpoint, save_twin

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    epochs: int = 14
    max_steps: int | None = Field(None, description="stop after this many optimiser steps (quick runs)")
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    semeda_pretrain_batches: int = 300
    val_limit: int | None = Field(None, description="evaluate on at most this many validation images")
    eval_every: int = 7
    threads: int | None = None
    compile: bool = Field(True, description="torch.compile the training step (~1.8x on CPU); eager if it fails")
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

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config is a mapping of fields, got {type(data).__name__}")
        return cls.model_validate({**data, **{k: v for k, v in overrides.items() if v is not None}})


def _datasets(config: TrainConfig):
    common = {"root": config.data_root, "size": config.size, "seed": config.seed}
    train = build_dataset(
        config.dataset, "train", train=True, crop=config.crop, scale_range=config.scale_range,
        length=config.train_length, cache=True, **common,
    )
    val = build_dataset(config.dataset, "val", length=config.val_length, cache=True, **common)
    return train, val


def _poly(step: int, total: int, power: float) -> float:
    return max(0.0, 1.0 - step / max(total, 1)) ** power


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train, evaluating on the validation split after epochs; returns the final summary."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    classes = dataset_classes(config.dataset)
    spec = ModelSpec(
        arch=config.arch,
        classes=classes,
        normalization=Normalization(),
        input_size=config.size,
        dataset=config.dataset,
        training={"loss": config.loss, "lambdas": config.lambdas, "seed": config.seed},
    )
    train_set, val_set = _datasets(config)
    if hasattr(train_set, "warm"):
        train_set.warm(progress=progress)
        val_set.warm(progress=progress)

    torch.manual_seed(config.seed)
    # channels_last: ~15% faster convolutions on CPU (oneDNN) and on tensor cores.
    model = build_model(config.arch, len(classes)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(train_set) // config.batch_size)
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or 1 << 62)
    start_epoch, step, history, semeda_state, best = 0, 0, [], None, -1.0

    last = out / "last.pt"
    if resume and last.is_file():
        checkpoint = read_checkpoint(last)
        saved = TrainConfig.model_validate(checkpoint["config"])
        for key in ("arch", "dataset", "loss", "size"):
            if getattr(saved, key) != getattr(config, key):
                raise ValueError(f"cannot resume {last}: it was trained with {key}={getattr(saved, key)!r}, "
                                 f"this run asks for {getattr(config, key)!r}")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        history, semeda_state, best = checkpoint["history"], checkpoint.get("semeda_net"), checkpoint["best_miou"]
    elif resume:
        raise FileNotFoundError(f"--resume: no checkpoint at {last}")
    (out / "config.yaml").write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))

    semeda_net, semeda_figures = None, None
    if config.loss == "semeda":
        if semeda_state is not None:
            semeda_net = SemedaNet(len(classes))
            semeda_net.load_state_dict(semeda_state)
        else:
            # Algorithm 3.1, first half: g_phi learns semantic edges from ground-truth masks only.
            loader = torch.utils.data.DataLoader(
                train_set, batch_size=config.batch_size, shuffle=True,
                generator=torch.Generator().manual_seed(config.seed),
            )
            masks = (labels for _ in itertools.count() for _, labels in loader)  # epochs, streamed
            semeda_net, semeda_figures = pretrain_semeda_net(
                masks, config.semeda_pretrain_batches, len(classes), spec.ignore_index, seed=config.seed,
                progress=progress,
            )
            (out / "semeda_net.json").write_text(json.dumps(semeda_figures, indent=2))
        semeda_state = semeda_net.state_dict()
    criterion = SegmentationLoss(config.loss, len(classes), spec.ignore_index, config.lambdas, semeda_net)

    started = time.time()
    twin = Twin(model, spec)  # evaluation runs the eager module; only the training step is compiled
    forward = torch.compile(model) if config.compile else model
    for epoch in range(start_epoch, config.epochs):
        if step >= total_steps:
            break
        model.train()
        torch.manual_seed(config.seed * 10_000 + epoch)  # augmentation draws: identical on resume
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=config.batch_size, shuffle=True, drop_last=len(train_set) > config.batch_size,
            generator=torch.Generator().manual_seed(config.seed * 10_000 + epoch),
        )
        sums: dict[str, float] = {}
        seen = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress)
        for images, labels in bar:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _poly(step, total_steps, config.poly_power)
            try:
                logits = forward(spec.normalization.normalize(images).contiguous(memory_format=torch.channels_last))
            except Exception as exc:  # no C compiler, unsupported op, ...: train eagerly rather than not at all
                if forward is model:
                    raise
                tqdm.write(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly")
                forward = model
                logits = forward(spec.normalization.normalize(images))
            loss, parts = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += 1
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if step >= total_steps:
                break
        record = {"epoch": epoch + 1, "step": step, **{k: v / max(seen, 1) for k, v in sums.items()}}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs or step >= total_steps:
            report = evaluate(twin, val_set, batch_size=config.batch_size, bands=(), limit=config.val_limit,
                              progress=False)
            record["val_miou"] = report["miou"]
            model.train()
        history.append(record)
        extra = {
            "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "step": step, "history": history,
            "config": json.loads(config.model_dump_json()), "semeda_net": semeda_state,
        }
        if record.get("val_miou") is not None and record["val_miou"] > best:
            best = record["val_miou"]
            extra["best_miou"] = best
            save_twin(out / "best.pt", model, spec, **extra)
        extra["best_miou"] = best
        save_twin(last, model, spec, **extra)
        (out / "history.json").write_text(json.dumps(history, indent=2))
        plot_history(history, out / "history.png")
        if progress:
            tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))

    summary = {
        "out": str(out),
        "steps": step,
        "epochs": len(history),
        "best_val_miou": best,
        "final_val_miou": history[-1].get("val_miou") if history else None,
        "train_seconds_this_run": round(time.time() - started, 1),
        "semeda_net": semeda_figures,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_history(history: list[dict], path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h.get("ppce", float("nan")) for h in history], marker="o", label="train PPCE")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h.get("val_miou") or float("nan") for h in history], marker="s", color="C1", label="val mIoU")
    ax2.set_ylabel("val mIoU")
    ax2.set_ylim(0, 1)
    fig.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

