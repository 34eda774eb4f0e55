"""`patchwatch eval`: metrics over a dataset, a JSON report, overlays and plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import torch
from tqdm.auto import tqdm

from segmenters.data.loading import device_batches, loader_workers
from segmenters.device import describe_device
from segmenters.metrics import DEFAULT_BANDS, SegmentationMetrics, entropy_map
from segmenters.spec import ModelSpec
from segmenters.twin import Twin, TwinHealth, predicted_pixel_counts
from segmenters.visualize import colorize, heatmap, overlay, save_panel, to_uint8

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@torch.no_grad()
def evaluate(
    twin: Twin,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 8,
    bands: tuple[int, ...] = DEFAULT_BANDS,
    out_dir: str | Path | None = None,
    overlays: int = 8,
    limit: int | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Run the twin over `dataset` on the twin's device (batches go there; metrics and overlays read CPU copies of
    labels and entropy); with `out_dir`, write report.json, overlay panels and a trimap plot. `workers`: DataLoader
    workers (default: 0 on the CPU, a few on CUDA).

    The report's `twin_health` is the one-class check over the predictions (`segmenters.twin.TwinHealth`); when it
    fires, `warnings` holds its message (the caller prints it: evaluation itself never fails on it)."""
    twin.model.eval()
    device = model_device(twin.model)
    metrics = SegmentationMetrics(twin.spec.num_classes, twin.spec.ignore_index, bands)
    indices = range(len(dataset) if limit is None else min(limit, len(dataset)))
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = device_batches(subset, batch_size, device, loader_workers(workers, device))
    out = Path(out_dir) if out_dir else None
    written = 0
    predicted = torch.zeros(twin.spec.num_classes, dtype=torch.int64)
    for images, labels in tqdm(loader, desc=f"eval {twin.spec.arch}", disable=not progress):
        logits = twin.logits(images.to(device, non_blocking=True))
        metrics.update(logits, labels.to(device, non_blocking=True))
        predicted += predicted_pixel_counts(logits.argmax(1), twin.spec.num_classes)
        if out is not None and written < overlays:
            written = _write_overlays(out, twin.spec, images, labels, logits, written, overlays)
    report = metrics.report(twin.spec.class_names)
    report["model"] = {"arch": twin.spec.arch, "dataset": twin.spec.dataset, "digest": twin.spec.checkpoint_digest}
    report["images"] = len(subset)
    report["device"] = describe_device(device)
    health = TwinHealth.from_counts(predicted, twin.spec.class_names, len(subset))
    report["twin_health"] = health.as_dict()
    report["warnings"] = [health.message()] if health.one_class else []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        plot_trimap({twin.spec.arch: report}, out / "trimap.png")
        plot_per_class(report, out / "per_class_iou.png")
    return report


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are (all of a twin's are in one place)."""
    return next(model.parameters()).device


def _write_overlays(out: Path, spec: ModelSpec, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                    written: int, overlays: int) -> int:
    """Panels (image, ground truth, prediction, entropy) for the batch's first images until `overlays` are written;
    returns how many are written now. `images` and `labels` are the loader's CPU batch, `logits` on the device."""
    entropy = entropy_map(logits).cpu()
    pred = logits.argmax(1).cpu()
    palette = spec.palette()
    for k in range(min(len(images), overlays - written)):
        save_panel(
            out / "overlays" / f"{written:03d}.png",
            [
                to_uint8(images[k].numpy()),
                colorize(labels[k].numpy(), palette, spec.ignore_index),
                overlay(images[k].numpy(), pred[k].numpy(), palette),
                heatmap(entropy[k].numpy()),
            ],
            titles=["image", "ground truth", "prediction (overlay)", "entropy of the prediction"],
        )
        written += 1
    return written


def plot_trimap(reports: dict[str, dict], path: str | Path) -> None:
    """Boundary and non-boundary mIoU against band width, one line per named report (thesis Fig. 3.5)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharex=True)
    for name, report in reports.items():
        widths = [row["band_width"] for row in report["trimap"]]
        axes[0].plot(widths, [_pct(row["boundary_miou"]) for row in report["trimap"]], marker="o", label=name)
        axes[1].plot(widths, [_pct(row["non_boundary_miou"]) for row in report["trimap"]], marker="o", label=name)
    for ax, title in zip(axes, ("boundary", "non-boundary")):
        ax.set_title(f"{title} mIoU")
        ax.set_xlabel("trimap band width (px)")
        ax.set_ylabel("mIoU (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class(report: dict, path: str | Path) -> None:
    names = list(report["per_class"])
    values = [_pct(report["per_class"][n]["iou"]) for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.55 * len(names) + 1), 3.5))
    ax.bar(range(len(names)), values, color="#4477aa")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_title(f"per-class IoU, mIoU {_pct(report['miou']):.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(value: float | None) -> float:
    return float("nan") if value is None else 100.0 * value


__all__ = ["evaluate", "model_device", "plot_trimap", "plot_per_class"]
