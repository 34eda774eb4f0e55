"""VGatt on the zoo, measured on real CamVid val images (thesis 002, section 4.3 and appendix A).

1. Completeness: the miss |sum(contributions) + b_frozen - F| in float64 at the input and at inner layers of
   every zoo architecture (the bias computed independently by the frozen-gate network; see audit.vgatt), relative
   to |sum(contributions)| (the headline: where the bias is ~100 % of the score, as on LR-ASPP, the miss relative
   to |F| looks small however wrong the map is) and to |F|. LR-ASPP is also measured at `classifier.cbr`, after
   the last hardswish: piecewise affine there, its attention branch reading the backbone beside it.
2. Cost, as ratios against baselines measured in the same run: one VGatt map vs one forward pass, and an
   occlusion map (window 16, stride 8) vs one VGatt map; Grad-CAM for reference.
3. Pixel removal (appendix A.2) on the trained CamVid twin: remove the k % most relevant pixels (k = 1..8) by
   VGatt and by Grad-CAM at the same layers, measure the score change and the label change.
4. Seeds (section 4.4) from the same maps for every ground-truth class of an image, thresholded at k of the
   maximum: pixel accuracy and area ratio against the ground truth (CamVid has no background class, so
   pixels negative for every class stay unknown).

Twins: bench/results/export/twins/<arch>/best.pt (bench/export_parity.py trains them) and the SEMEDA LR-ASPP of
bench/camvid_semeda.py; an architecture without a trained twin is measured with calibrated random weights
(said in the output). Writes completeness/cost/removal .json/.md and removal.png under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

INNER_LAYERS = {
    "unet": ["encoders.1.2", "decoders.0.1"],
    "deeplabv3_resnet18": ["model.backbone.layer2.0.conv1", "model.backbone.layer4.1.bn2"],
    "ladder_densenet121": ["block3.1.denselayer2.relu1", "block4.1.denselayer4.conv2"],
    "lraspp_mobilenetv3": ["model.backbone.6.block.1.0", "model.backbone.12.block.0.1", "model.classifier.cbr"],
    "deeplabv3_mobilenetv3": ["model.backbone.6.block.1.0", "model.backbone.12.block.0.1"],
}
GRADCAM_LAYER = {"unet": "decoders.0.2", "deeplabv3_resnet18": "model.backbone.layer4",
                 "ladder_densenet121": "block4", "lraspp_mobilenetv3": "model.backbone.16",
                 "deeplabv3_mobilenetv3": "model.backbone.16"}
IMAGE_SIZE = (180, 240)  # CamVid at half resolution, as the twins were trained
REMOVAL_LAYERS = ["model.backbone.6", "model.backbone.16"]  # LR-ASPP: a middle and the last backbone stage


def twin_for(arch: str, args):
    from segmenters.data import dataset_classes
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import Twin, load_twin

    candidates = [Path(args.twins) / arch / "best.pt", Path(args.twins) / arch / "last.pt"]
    if arch == "lraspp_mobilenetv3":
        candidates.insert(0, Path(args.lraspp))
    for path in candidates:
        if path.exists():
            return load_twin(path), str(path)
    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, classes=dataset_classes("camvid"), input_size=IMAGE_SIZE, dataset="camvid")
    model = build_model(arch, spec.num_classes)
    for module in model.modules():  # calibrated BN statistics, so depth does not wash the input out
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, *IMAGE_SIZE))
    return Twin(model.eval(), spec), "random weights (no trained twin found)"


def majority_target(twin, image):
    labels = twin.labels(image[None])[0]
    target = int(torch.bincount(labels.reshape(-1)).argmax())
    return target, (labels == target).numpy()


def timed(function, repeats: int) -> float:
    function()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--twins", default="bench/results/export/twins")
    parser.add_argument("--lraspp", default="bench/results/camvid/semeda/best.pt")
    parser.add_argument("--images", type=int, default=3, help="CamVid val images for completeness and cost")
    parser.add_argument("--removal-images", type=int, default=20)
    parser.add_argument("--seed-images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--archs", nargs="+", choices=list(INNER_LAYERS), default=list(INNER_LAYERS))
    parser.add_argument("--completeness-only", action="store_true",
                        help="section 1 only (no cost, pixel removal or seeds): completeness.json/.md")
    parser.add_argument("--out", default="bench/results/vgatt")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from segmenters.data import build_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_dataset("camvid", "val", size=IMAGE_SIZE)
    picks = evenly(data, args.images)
    completeness, cost = [], []
    for arch in tqdm(args.archs, desc="zoo"):
        twin, source = twin_for(arch, args)
        completeness += [measure_completeness(twin, source, arch, layer, data, picks)
                         for layer in [None, *INNER_LAYERS[arch]]]
        if not args.completeness_only:
            cost.append(measure_cost(twin, arch, data[picks[0]][0], args.repeats))
    if args.completeness_only:
        write_completeness(out, completeness)
        print((out / "completeness.md").read_text())
        return
    twin, source = twin_for("lraspp_mobilenetv3", args)  # pixel removal and seeds on the trained CamVid twin
    methods = removal_methods(twin)
    removal_picks = evenly(data, args.removal_images)
    removal = removal_curves(twin, methods, data, removal_picks)
    write_seeds(out, seed_quality_table(twin, methods, data, evenly(data, args.seed_images)))
    write(out, completeness, cost, removal, source, len(removal_picks))


def evenly(data, count: int) -> list[int]:
    """`count` indices spread evenly over `data`."""
    return [int(i) for i in np.linspace(0, len(data) - 1, count)]


def measure_cost(twin, arch: str, image: torch.Tensor, repeats: int) -> dict:
    """Seconds per attribution of each method on one image, and VGatt's cost in forward passes."""
    from audit.attribution import GradCam, OcclusionMap, VGattMap

    model = twin.model.eval()
    x = twin.spec.normalization.normalize(image[None])
    target, region = majority_target(twin, image)
    with torch.no_grad():
        forward = timed(lambda: model(x), repeats)
    vgatt64 = timed(lambda: VGattMap(model).attribute(x, target, region), repeats)
    vgatt32 = timed(lambda: VGattMap(model, dtype=torch.float32).attribute(x, target, region), repeats)
    gradcam = timed(lambda: GradCam(model, GRADCAM_LAYER[arch]).attribute(x, target, region), repeats)
    occlusion = timed(lambda: OcclusionMap(model, window=16, stride=8).attribute(x, target, region), 1)
    return {"arch": arch, "forward_s": forward, "vgatt_f64_s": vgatt64, "vgatt_f32_s": vgatt32,
            "gradcam_s": gradcam, "occlusion_s": occlusion, "vgatt_f32_vs_forward": vgatt32 / forward,
            "vgatt_f64_vs_forward": vgatt64 / forward, "occlusion_vs_vgatt_f32": occlusion / vgatt32}


def removal_methods(twin) -> dict:
    """The attributions pixel removal compares: VGatt at the input and, per removal layer, VGatt and Grad-CAM."""
    from audit.attribution import GradCam, VGattMap

    methods = {"VGatt input": VGattMap(twin.model)}
    for layer in REMOVAL_LAYERS:
        methods[f"VGatt {layer}"] = VGattMap(twin.model, layer)
        methods[f"Grad-CAM {layer}"] = GradCam(twin.model, layer)
    return methods


def removal_curves(twin, methods: dict, data, picks: list[int]) -> dict:
    """Per method, the mean score and label change as its top-ranked pixels are blacked out, over `picks`."""
    from tqdm import tqdm

    from audit.attribution import pixel_removal, upsample

    black = twin.spec.normalization.normalize(torch.zeros(1, 3, 1, 1)).reshape(3)
    curves = {name: [] for name in methods}
    for index in tqdm(picks, desc="pixel removal"):
        image, _ = data[index]
        x = twin.spec.normalization.normalize(image[None])
        target, region = majority_target(twin, image)
        for name, method in methods.items():
            ranking = upsample(method.attribute(x, target, region), IMAGE_SIZE)
            curves[name].append(pixel_removal(twin.model, x, target, region, ranking, black))
    return {name: {"fractions": [p.fraction for p in points[0]],
                   "score_change": [float(np.mean([pts[i].score_change for pts in points]))
                                    for i in range(len(points[0]))],
                   "label_change": [float(np.mean([pts[i].label_change for pts in points]))
                                    for i in range(len(points[0]))]}
            for name, points in curves.items()}


def write_seeds(out: Path, seeds: list[dict]) -> None:
    (out / "seeds.json").write_text(json.dumps(seeds, indent=2))
    lines = ["| method | k | pixel accuracy | area ratio |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['k']} | {r['pixel_accuracy']:.3f} | {r['area_ratio']:.3f} |" for r in seeds]
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    print((out / "seeds.md").read_text())


def measure_completeness(twin, source: str, arch: str, layer: str | None, data, picks: list[int]) -> dict:
    """VGatt at `layer` on the picked images: the worst miss relative to the contributions (headline) and to the
    score, the mean bias/score, and whether every map was exact."""
    from audit.vgatt import VGatt

    vgatt = VGatt(twin.model.eval(), layer)
    results = []
    for index in picks:
        image, _ = data[index]
        target, region = majority_target(twin, image)
        results.append(vgatt.attribute(twin.spec.normalization.normalize(image[None]), target, region))
    return {"arch": arch, "twin": source, "layer": layer or "input", "exact": all(r.exact for r in results),
            "completeness_error_vs_contributions_max": max(r.completeness_error_vs_contributions for r in results),
            "completeness_error_max": max(r.completeness_error for r in results),
            "bias_ratio_mean": float(np.mean([r.bias_ratio for r in results]))}


def write_completeness(out: Path, completeness: list[dict]) -> None:
    (out / "completeness.json").write_text(json.dumps(completeness, indent=2))
    lines = ["| arch | layer | piecewise affine | miss / contributions (max, headline) | miss / score (max) | "
             "bias/score |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['layer']} | {'yes' if r['exact'] else 'no (approximate)'} | "
              f"{r['completeness_error_vs_contributions_max']:.2e} | {r['completeness_error_max']:.2e} | "
              f"{r['bias_ratio_mean']:.3f} |" for r in completeness]
    (out / "completeness.md").write_text("\n".join(lines) + "\n")


def seed_quality_table(twin, methods: dict, data, picks: list[int], ks=(0.1, 0.3, 0.5)) -> list[dict]:
    """Section 4.4 seeds per method and k, pooled over images: pixel accuracy and area ratio."""
    from tqdm import tqdm

    from audit.attribution import upsample
    from audit.seeds import attribution_seeds, seed_quality

    pooled = {(name, k): [0, 0, 0] for name in methods for k in ks}  # correct, labelled, valid
    for index in tqdm(picks, desc="seeds"):
        image, truth = data[index]
        truth = truth.numpy()
        x = twin.spec.normalization.normalize(image[None])
        predicted = twin.labels(image[None])[0].numpy()
        present = [int(c) for c in np.unique(truth) if c != twin.spec.ignore_index]
        for name, method in methods.items():
            maps = {}
            for cls in present:
                region = predicted == cls if (predicted == cls).any() else None
                maps[cls] = upsample(method.attribute(x, cls, region), truth.shape)
            for k in ks:
                quality = seed_quality(attribution_seeds(maps, k), truth, twin.spec.ignore_index)
                for i, key in enumerate(("correct_pixels", "seed_pixels", "valid_pixels")):
                    pooled[name, k][i] += quality[key]
    return [{"method": name, "k": k, "pixel_accuracy": c / max(n, 1), "area_ratio": n / max(v, 1)}
            for (name, k), (c, n, v) in pooled.items()]


def write(out: Path, completeness, cost, removal, source: str, images: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_completeness(out, completeness)
    (out / "cost.json").write_text(json.dumps(cost, indent=2))
    (out / "removal.json").write_text(json.dumps({"twin": source, "images": images, "curves": removal}, indent=2))
    lines = ["| arch | forward | VGatt f32 | VGatt f64 | Grad-CAM | occlusion s8 | VGatt f32 / forward | "
             "VGatt f64 / forward | occlusion / VGatt f32 |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['forward_s'] * 1e3:.0f} ms | {r['vgatt_f32_s'] * 1e3:.0f} ms | "
              f"{r['vgatt_f64_s'] * 1e3:.0f} ms | {r['gradcam_s'] * 1e3:.0f} ms | {r['occlusion_s']:.1f} s | "
              f"x{r['vgatt_f32_vs_forward']:.1f} | x{r['vgatt_f64_vs_forward']:.1f} | "
              f"x{r['occlusion_vs_vgatt_f32']:.0f} |"
              for r in cost]
    (out / "cost.md").write_text("\n".join(lines) + "\n")
    names = list(removal)
    lines = ["| method | " + " | ".join(f"k={int(f * 100)}%" for f in removal[names[0]]["fractions"]) + " |",
             "|---|" + "---|" * 8]
    for name in names:
        lines.append(f"| {name} score | " + " | ".join(f"{v:.3f}" for v in removal[name]["score_change"]) + " |")
    for name in names:
        lines.append(f"| {name} labels | " + " | ".join(f"{v:.3f}" for v in removal[name]["label_change"]) + " |")
    (out / "removal.md").write_text(f"Twin: {source}, {images} CamVid val images.\n\n" + "\n".join(lines) + "\n")

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        k = [100 * f for f in removal[name]["fractions"]]
        style = "-" if name.startswith("VGatt") else "--"
        axes[0].plot(k, removal[name]["score_change"], style, marker="o", label=name)
        axes[1].plot(k, removal[name]["label_change"], style, marker="o", label=name)
    axes[0].set_ylabel("|score change| / |score|")
    axes[1].set_ylabel("share of the class's pixels relabelled")
    for ax in axes:
        ax.set_xlabel("pixels removed (%), most relevant first")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Pixel removal on CamVid val ({images} images): VGatt vs Grad-CAM", fontsize=10)
    figure.tight_layout()
    figure.savefig(out / "removal.png", dpi=100)
    plt.close(figure)
    for name in ("completeness.md", "cost.md", "removal.md"):
        print((out / name).read_text())


if __name__ == "__main__":
    main()
