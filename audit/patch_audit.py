"""Why did the pixels flip? VGatt over a campaign's stored trials.

For each trial, the flipped pixels (outside the patch, label changed by the patch) are the region; their new
class is the target. VGatt at the network's input decomposes that score on the attacked image, and the share
of the positive contributions that lies inside the patch says how much of the flip the patch carries. The same
share on the clean image, same region, same class and same pixel positions, is the baseline: a patch that
works through the network's long-range context rather than by chance shows a far larger share than the
handful of pixels it covers would.

`run_patch_audit` runs one Ray task per stored, not yet audited trial; the driver stores each audit at once
(an `audits` row keyed by trial id and kind), so a killed audit resumes where it stopped. Each task runs VGatt
(float64) on the device Ray gave it; only the results come back to the host.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from audit.patches import paste
from audit.store import TrialStore
from segmenters.device import describe_device, resolve_device

KIND = "attribution"


@lru_cache(maxsize=4)
def _vgatt(model_path: str, device: torch.device):
    from audit.trial import _twin
    from audit.vgatt import VGatt

    return VGatt(_twin(model_path, device).model)


def positive_share_inside(contribution_map: np.ndarray, inside: np.ndarray) -> float:
    """Share of the positive contributions that falls on `inside` pixels (nan when nothing contributes)."""
    positive = np.clip(contribution_map, 0, None)
    total = positive.sum()
    return float(positive[inside].sum() / total) if total > 0 else float("nan")


def audit_trial(campaign_json: str, row: dict, run_dir: str, device: torch.device | None = None) -> dict:
    """The attribution audit of one stored trial on `device` (default: resolved from auto here):
    {"metrics", "artefacts"}."""
    from audit.campaign import CampaignConfig
    from audit.trial import _dataset, _png, _twin
    from segmenters.visualize import to_uint8

    campaign = CampaignConfig.model_validate_json(campaign_json)
    device = resolve_device("auto") if device is None else device
    twin = _twin(row["model"], device)
    image, _ = _dataset(campaign.images.model_dump_json())[row["image_index"]]
    image = image.to(device)
    patch = np.load(Path(run_dir) / "trials" / row["id"] / "patch.npy")
    top, left = row["metrics"]["top"], row["metrics"]["left"]
    attacked, covered = paste(image[None], torch.as_tensor(patch, device=device), top, left)
    with torch.no_grad():
        clean_labels = twin.labels(image[None])[0]
        attacked_labels = twin.labels(attacked)[0]
    flipped = (attacked_labels != clean_labels) & ~covered
    metrics = {"flipped_pixels": int(flipped.sum()), "patch_area_share": float(covered.float().mean()),
               "device": describe_device(device)}
    if not flipped.any():
        return {"metrics": {**metrics, "target_class": None}, "artefacts": {}}
    # the class the flipped pixels went to (the switch target, or what a vanished class became)
    target = int(torch.bincount(attacked_labels[flipped]).argmax())
    region = (flipped & (attacked_labels == target)).cpu().numpy()
    metrics.update(target_class=target, region_pixels=int(region.sum()))
    maps = _attributions(_vgatt(row["model"], device), twin, {"attacked": attacked, "clean": image[None]}, target,
                         region, covered.cpu().numpy(), metrics)
    panel = np.concatenate([_heat(maps["clean"]), _heat(maps["attacked"]), to_uint8(attacked[0].cpu().numpy())],
                           axis=1)
    return {"metrics": metrics, "artefacts": {"attribution.png": _png(panel)}}


def _attributions(vgatt, twin, pictures: dict[str, torch.Tensor], target: int, region: np.ndarray,
                  inside: np.ndarray, metrics: dict) -> dict[str, np.ndarray]:
    """VGatt maps (host arrays) of each named picture; their inside-patch shares, bias ratios and completeness
    errors (the miss relative to the contributions, the headline, and to the score) go into `metrics`."""
    maps = {}
    for name, picture in pictures.items():
        result = vgatt.attribute(twin.spec.normalization.normalize(picture), target, region)
        maps[name] = result.map
        metrics.update({f"inside_share_{name}": positive_share_inside(result.map, inside),
                        f"bias_ratio_{name}": result.bias_ratio,
                        f"completeness_error_{name}": result.completeness_error,
                        f"completeness_error_vs_contributions_{name}": result.completeness_error_vs_contributions})
    metrics["non_affine_layers"] = len(result.non_affine_layers)
    return maps


def _heat(contribution_map: np.ndarray) -> np.ndarray:
    """Positive contributions as a heat map (uint8 RGB), scaled to the 99th percentile."""
    import matplotlib

    positive = np.clip(contribution_map, 0, None)
    scale = np.percentile(positive, 99) or positive.max() or 1.0
    rgba = matplotlib.colormaps["inferno"](np.clip(positive / scale, 0, 1))
    return (rgba[..., :3] * 255).astype(np.uint8)


def run_patch_audit(run_dir: str | Path, *, address: str | None = None, num_cpus: float = 1.0,
                    num_gpus: float = 0.0, device: str = "auto", local_cpus: int | None = None,
                    progress: bool = True, gpu_wait_s: float | None = None) -> dict:
    """VGatt over the run's stored, not yet audited trials, one Ray task each on `device` (auto|cpu|cuda|cuda:N)
    with `num_gpus` per task; refuses a device the tasks cannot have before anything runs."""
    from audit.runner import check_device_request, run_tasks, starts_local_cluster

    check_device_request(device, num_gpus, local=starts_local_cluster(address))
    with TrialStore(run_dir) as store:
        campaign_json = store.campaign_json()
        rows = store.rows()
        done = store.audited_ids(KIND)
        pending = [row for row in rows if row["id"] not in done]
        summary = {"run": str(run_dir), "trials": len(rows), "already_audited": len(rows) - len(pending)}

        def stored(row, result) -> None:
            store.record_audit(row["id"], KIND, result["metrics"], result["artefacts"])

        def failed(row, error: str) -> None:
            store.record_failure({"id": row["id"], "audit": KIND}, error)

        counts = run_tasks(_audit_task, [(campaign_json, row, str(run_dir)) for row in pending], pending, stored,
                           failed, total=len(rows), done=summary["already_audited"], label="VGatt audit",
                           address=address, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=3,
                           local_cpus=local_cpus, progress=progress, device=device, gpu_wait_s=gpu_wait_s)
    return {**summary, "audited": counts["stored"], "failed": counts["failed"]}


def _audit_task(campaign_json: str, row: dict, run_dir: str, device: str, threads: int) -> dict:
    from audit.runner import task_device

    result = audit_trial(campaign_json, row, run_dir, task_device(device, threads))
    result["metrics"]["worker"] = f"{os.uname().nodename}:{os.getpid()}"
    return result


def summarise_audits(rows: list[dict], audits: dict[str, dict], success: float = 0.5) -> dict:
    """Inside-patch attribution shares for successful attacks (trial success >= `success`), attacked vs clean,
    and the completeness of every VGatt map the audits made (`completeness_summary`)."""
    chosen = [audits[r["id"]] for r in rows if r["id"] in audits and audits[r["id"]].get("target_class") is not None
              and not _nan(r["metrics"]["success"]) and r["metrics"]["success"] >= success]
    attacked = [a["inside_share_attacked"] for a in chosen if not _nan(a["inside_share_attacked"])]
    clean = [a["inside_share_clean"] for a in chosen if not _nan(a["inside_share_clean"])]
    return {"successful_trials": len(chosen), **completeness_summary(audits),
            "inside_share_attacked_mean": float(np.mean(attacked)) if attacked else float("nan"),
            "inside_share_clean_mean": float(np.mean(clean)) if clean else float("nan"),
            "patch_area_share_mean": float(np.mean([a["patch_area_share"] for a in chosen])) if chosen else float("nan"),
            "attacked": attacked, "clean": clean}


#: the completeness figures an audit stores per picture, headline first
COMPLETENESS = ("completeness_error_vs_contributions", "completeness_error")


def completeness_summary(audits: dict[str, dict]) -> dict:
    """The worst completeness error of every VGatt map the audits made (both pictures, every trial that had flips),
    relative to the contributions and to the score, and whether every gate that counts was piecewise affine."""
    ran = [a for a in audits.values() if a.get("target_class") is not None]
    worst = {}
    for figure in COMPLETENESS:
        values = [a[f"{figure}_{name}"] for a in ran for name in ("attacked", "clean")
                  if not _nan(a.get(f"{figure}_{name}"))]  # audits stored before a figure existed lack it
        worst[f"{figure}_max"] = float(max(values)) if values else float("nan")
    return {"vgatt_maps": 2 * len(ran), **worst, "exact": all(a.get("non_affine_layers") == 0 for a in ran)}


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def plot_inside_shares(summary: dict, path: Path) -> None:
    """One figure each: the inside-patch share of positive attribution on attacked and on clean images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, title in ((axes[0], "attacked", "attacked images"), (axes[1], "clean", "clean images")):
        values = summary[key]
        ax.hist(values, bins=np.linspace(0, 1, 21), color="tab:red" if key == "attacked" else "tab:blue")
        ax.axvline(summary["patch_area_share_mean"], color="k", linestyle="--", label="patch share of the image")
        ax.set_title(f"{title}: mean {np.mean(values):.3f}" if values else title, fontsize=10)
        ax.set_xlabel("share of positive VGatt attribution inside the patch")
    axes[0].set_ylabel("successful trials")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    path.write_bytes(buffer.getvalue())
