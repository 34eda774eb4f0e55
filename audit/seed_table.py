"""Seed 000's Table 1, computed the seed's way (`audit bounds --mode seed`) beside the project's refined bound.

Table 1 gives, for four segmentation networks and patches of 2, 5, 10 and 20 pixels, the largest square region
where a patch could force arbitrary 19-class (Cityscapes) maps. Our copy of the seed lost the table's count rows,
its equations and the names of its last two columns; what survives is the header "UNET | FCN8 | | |" and the
sides below (`SEED_TABLE_1`). The columns are rebuilt as real networks: U-Net (Ronneberger et al. 2015),
FCN-8s on torchvision's VGG16 (Long et al. 2015), and the seed's two Cityscapes models (section 4) for the two
unnamed columns. `audit.bounds.seed_bound_log10` is the seed's computation; `audit.bounds.refined_row` the
project's. `SEED_ASSUMPTIONS` lists where the two differ; `SEED_COLUMN_NOTES` why published cells the seed mode
does not reproduce differ.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg16
from torchvision.models._utils import IntermediateLayerGetter

from audit.bounds import (SEED_VALUES_PER_PIXEL, arbitrary_map_side, conv_bound_log10, gate_shapes, refined_row,
                          seed_bound_log10)
from segmenters.models import build_model
from segmenters.models.unet import conv_block

SEED_CLASSES = 19  # Cityscapes' evaluated classes: Table 1's K
SEED_PATCHES = (2, 5, 10, 20)  # Table 1's patch sides
SEED_IMAGE_SIZE = (1024, 2048)  # a Cityscapes frame: caps n_l only where a map is smaller than the patch
REFINED_IMAGE_SIZE = (256, 256)  # the refined mode's default image (`audit bounds --size`)

# Seed 000, Table 1 as published: the largest region side per column and patch side (the reference values)
SEED_TABLE_1 = {
    "UNET": {2: 13, 5: 33, 10: 62, 20: 114},
    "FCN8": {2: 11, 5: 30, 10: 60, 20: 118},
    "column 3": {2: 13, 5: 31, 10: 51, 20: 85},
    "column 4": {2: 21, 5: 51, 10: 99, 20: 194},
}


class FCN8s(nn.Module):
    """FCN-8s (Long et al. 2015) on torchvision's VGG16: fc6/fc7 as 7x7 and 1x1 convolutions of 4096 channels,
    class scores from fc7, pool4 and pool3 fused at stride 8. Upsampling is bilinear (the paper learns it; both
    are linear, so no gate and no bound changes), and fc6 is padded so any image of 32 px or more fits."""

    def __init__(self, num_classes: int):
        super().__init__()
        # torchvision's VGG16 features: pool3, pool4 and pool5 are modules 16, 23 and 30
        self.backbone = IntermediateLayerGetter(vgg16(weights=None).features,
                                                return_layers={"16": "pool3", "23": "pool4", "30": "pool5"})
        self.fc = nn.Sequential(nn.Conv2d(512, 4096, 7, padding=3), nn.ReLU(inplace=True), nn.Dropout2d(),
                                nn.Conv2d(4096, 4096, 1), nn.ReLU(inplace=True), nn.Dropout2d())
        self.score_fr = nn.Conv2d(4096, num_classes, 1)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.score_pool3 = nn.Conv2d(256, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        y = self.score_fr(self.fc(features["pool5"]))
        y = _upsample(y, features["pool4"]) + self.score_pool4(features["pool4"])
        y = _upsample(y, features["pool3"]) + self.score_pool3(features["pool3"])
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _upsample(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(y, size=like.shape[-2:], mode="bilinear", align_corners=False)


class RonnebergerUNet(nn.Module):
    """U-Net (Ronneberger et al. 2015): two 3x3 convolutions per level, 64 to 1024 channels, 2x2 max-pool down,
    2x2 transposed convolution up, concatenated skips; padded convolutions, so the logits match the input."""

    def __init__(self, num_classes: int, channels: tuple[int, ...] = (64, 128, 256, 512, 1024)):
        super().__init__()
        self.depth = len(channels) - 1
        self.encoders = nn.ModuleList(conv_block(3 if i == 0 else channels[i - 1], c) for i, c in enumerate(channels))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in reversed(range(self.depth)))
        self.decoders = nn.ModuleList(conv_block(2 * channels[i], channels[i]) for i in reversed(range(self.depth)))
        self.classifier = nn.Conv2d(channels[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        x = F.pad(x, (0, (-width) % multiple, 0, (-height) % multiple), mode="replicate")
        skips = [self.encoders[0](x)]
        for encode in self.encoders[1:]:
            skips.append(encode(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up, decode in zip(self.ups, self.decoders):
            y = decode(torch.cat([up(y), skips.pop()], dim=1))
        return self.classifier(y)[..., :height, :width]


# Table 1's columns: published header -> (architecture, builder(num_classes))
SEED_COLUMNS = {
    "UNET": ("unet_ronneberger", RonnebergerUNet),
    "FCN8": ("fcn8s_vgg16", FCN8s),
    "column 3": ("deeplabv3_resnet18", partial(build_model, "deeplabv3_resnet18")),
    "column 4": ("lraspp_mobilenetv3", partial(build_model, "lraspp_mobilenetv3")),
}

SEED_ASSUMPTIONS = [
    ("bound", "both: Xiong et al. (2020), prod_l sum_{i=0}^{D_0} C(N_l, i); refined adds the dense bound "
              "(Montufar 2017) beside it", ""),
    ("input dimension D_0", "seed: s^2, one value per patch pixel (its worked example allows a 128/256-channel "
                            "layer at most 10^300; its FCN8 column gives 11/29/59/118 with s^2, 18/46/94/188 with "
                            "3 s^2)",
     "refined: 3 s^2, the patch's RGB values"),
    ("units N_l of a layer", "seed: d_l x s x s in every layer (the patch's own extent; capped by the map), "
                             "d_l its channels",
     "refined: the units whose value the patch can change, found by forward-mode differentiation: the patch's "
     "footprint grows by each kernel (receptive field) and shrinks by each stride"),
    ("which layers count", "both: every ReLU-family gate (ReLU, ReLU6, hardswish, hardsigmoid) in forward order",
     "refined drops the layers the patch cannot reach"),
    ("image", f"seed: a Cityscapes frame {SEED_IMAGE_SIZE[0]}x{SEED_IMAGE_SIZE[1]}",
     "refined: --size (256x256 by default), so deep maps can cap the reach"),
    ("region side", "both: floor(sqrt(floor(log B / log 19))) for 19 Cityscapes classes (the seed's 1500 px -> "
                    "38x38 is a floor)", ""),
    ("architectures", "UNET: Ronneberger's U-Net (64-1024 channels, 18 ReLU layers; the seed's own section-3 "
                      "U-Net of 8-64 channels gives 9/23/48/96 in the seed mode); FCN8: FCN-8s on VGG16 "
                      "(13 convolutions + fc6/fc7 of 4096; torchvision's FCNHead in their place, one 128-channel gate, "
                      "gives 10/27/55/111, no published cell); columns 3 and 4 (names lost): the seed's section-4 Cityscapes models, "
                      "DeepLabV3-ResNet18 and LR-ASPP-MobileNetV3-Large (128-filter head), in order of size", ""),
]

# why the seed mode misses the published cells it misses, per column (the numbers behind each are in the report)
SEED_COLUMN_NOTES = {
    "UNET": "Table 1's U-Net is not given (the seed's own section-3 U-Net has 8-64 channels, far below every cell). "
            "The published sides shrink relative to s, which n_l = s on maps at least s wide cannot do (see the "
            "per-pixel check): the seed's n_l must exceed s for small patches, a receptive-field margin it does not "
            "state.",
    "FCN8": "n_l = s reproduces 2x2 and 20x20 and falls one short at 5x5 and 10x10. The published 5x5 and 20x20 "
            "cannot both come from n_l = s with any list of layers on maps at least s wide (see the per-pixel "
            "check), so the seed's counts for the middle sizes (lost with its count row) used per-layer extents it "
            "does not state.",
    "column 3": "The name is lost; DeepLabV3-ResNet18 matches 2x2 only. The published log B per patch pixel falls "
                "to about 40 % of 2x2's at 20x20: most of the seed's terms stop growing with s, as with n_l the "
                "patch's footprint on each strided map (the footprint variant shows that fall, not these cells); "
                "the seed names neither the backbone nor its extents.",
    "column 4": "The name is lost. LR-ASPP-MobileNetV3-Large has the column's shape (side / s falls about as much, "
                "through its squeeze-excitation gates, whose maps are 1x1) but about a fifth less log B at every "
                "size (the gaps above), as does its DeepLabV3 head: the seed's network had more or wider gate "
                "layers than torchvision's MobileNetV3-Large, and the seed does not say which.",
}


def footprint_bound_log10(patch: int, shapes: list[tuple[int, int, int]], size: tuple[int, int]) -> float:
    """The seed's product with n_l = the patch's footprint on each map, ceil(s / stride): one s-dependent reading
    of "spatial dimensions determined by the receptive field", shown beside the seed mode as evidence."""
    height, width = size
    units = [c * math.ceil(patch * h / height) * math.ceil(patch * w / width) for c, h, w in shapes]
    return conv_bound_log10(SEED_VALUES_PER_PIXEL * patch * patch, units)


def per_pixel_intervals(column: str, classes: int = SEED_CLASSES) -> dict[int, tuple[float, float]]:
    """log10 B / s^2 for each published cell of a column. With n_l = s, the term of a layer whose map is at least
    s wide, log10 sum_{i<=s^2} C(d s^2, i) / s^2 per patch pixel, never falls as s grows; so a column whose
    interval at a larger s lies wholly below one at a smaller s comes from no list of such layers."""
    return {patch: tuple(v / patch**2 for v in implied_bound_log10(side, classes))
            for patch, side in SEED_TABLE_1[column].items()}


def fits_patch_extent(column: str) -> bool:
    """Whether some non-decreasing log10 B / s^2 passes through every published cell's interval."""
    running_low = -math.inf
    for _, (low, high) in sorted(per_pixel_intervals(column).items()):
        running_low = max(running_low, low)
        if running_low >= high:
            return False
    return True


def implied_bound_log10(side: int, classes: int = SEED_CLASSES) -> tuple[float, float]:
    """The log10 B interval a published side stands for: side^2 <= log_K B < (side + 1)^2."""
    return side * side * math.log10(classes), (side + 1) ** 2 * math.log10(classes)


def seed_table(patch_sizes=SEED_PATCHES, classes: int = SEED_CLASSES, refined_size=REFINED_IMAGE_SIZE,
               refined: bool = True, columns=None, progress: bool = True) -> list[dict]:
    """One row per Table 1 cell: the published side, the seed mode's bound and side, and (with `refined`) the
    project's refined bounds for the same network."""
    from tqdm import tqdm

    rows = []
    for column in tqdm(columns or list(SEED_COLUMNS), desc="Table 1", disable=not progress):
        arch, builder = SEED_COLUMNS[column]
        shapes = gate_shapes(partial(builder, classes), SEED_IMAGE_SIZE)
        model = builder(classes) if refined else None
        for patch in patch_sizes:
            rows.append(_seed_row(column, arch, patch, classes, shapes))
            if model is not None:
                rows[-1]["refined"] = refined_row(model, arch, patch, classes, refined_size)
    return rows


def _seed_row(column: str, arch: str, patch: int, classes: int, shapes) -> dict:
    bound, footprint = seed_bound_log10(patch, shapes), footprint_bound_log10(patch, shapes, SEED_IMAGE_SIZE)
    published = SEED_TABLE_1[column].get(patch) if classes == SEED_CLASSES else None
    return {"column": column, "arch": arch, "patch": patch, "classes": classes, "gate_layers": len(shapes),
            "seed_bound_log10": bound, "seed_side": arbitrary_map_side(bound, classes), "published_side": published,
            "published_bound_log10": implied_bound_log10(published, classes) if published else None,
            "footprint_bound_log10": footprint, "footprint_side": arbitrary_map_side(footprint, classes)}


def _side(side) -> str:
    return f"{side}x{side}" if side is not None else "-"


def seed_markdown(rows: list[dict]) -> str:
    """Both tables side by side (published, seed mode, refined per cell), the bounds behind them, the cells the
    seed mode does not reproduce and the assumptions where the two computations differ."""
    columns = list(dict.fromkeys(r["column"] for r in rows))
    patches = sorted({r["patch"] for r in rows})
    cell = {(r["column"], r["patch"]): r for r in rows}
    lines = [f"## Seed 000, Table 1: largest region where a patch could force arbitrary {rows[0]['classes']}-class "
             "maps", "", "published = the seed's cell; seed = `--mode seed` (the seed's computation); refined = the "
             "project's bound (Xiong et al. on the units the patch reaches; dense bound in brackets).", "",
             "| patch | " + " | ".join(f"{c} ({cell[c, patches[0]]['arch']}): published / seed / refined"
                                     for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for patch in patches:
        lines.append(f"| {patch}x{patch} | " + " | ".join(_cell(cell[c, patch]) for c in columns) + " |")
    lines += ["", "log10 of the bounds (published: the interval its side stands for, side^2 <= log_19 B < "
              "(side+1)^2):", "", "| patch | " + " | ".join(f"{c}: published / seed / refined" for c in columns)
              + " |", "|---|" + "---|" * len(columns)]
    for patch in patches:
        lines.append(f"| {patch}x{patch} | " + " | ".join(_bound_cell(cell[c, patch]) for c in columns) + " |")
    return "\n".join(lines + [""] + _differences(rows) + [""] + _assumptions()) + "\n"


def _cell(row: dict) -> str:
    refined = row.get("refined")
    mark = "" if row["published_side"] is None else (" =" if row["seed_side"] == row["published_side"] else " ≠")
    text = f"{_side(row['published_side'])} / {_side(row['seed_side'])}{mark}"
    if refined:
        text += f" / {_side(refined['conv_side'])} [{_side(refined['dense_side'])}]"
    return text


def _bound_cell(row: dict) -> str:
    implied = row["published_bound_log10"]
    text = f"[{implied[0]:.1f}, {implied[1]:.1f})" if implied else "-"
    text += f" / {row['seed_bound_log10']:.1f}"
    if row.get("refined"):
        text += f" / {row['refined']['conv_bound_log10']:.1f}"
    return text


def _differences(rows: list[dict]) -> list[str]:
    """Each published cell the seed mode misses, with the bound it stands for, and the column's explanation."""
    published = [r for r in rows if r["published_side"] is not None]
    missed = [r for r in published if r["seed_side"] != r["published_side"]]
    lines = [f"### Cells the seed mode reproduces: {len(published) - len(missed)} of {len(published)}", ""]
    for column in dict.fromkeys(r["column"] for r in missed):
        for r in (r for r in missed if r["column"] == column):
            low, high = r["published_bound_log10"]
            gap = r["seed_bound_log10"] / low - 1 if r["seed_bound_log10"] < low else r["seed_bound_log10"] / high - 1
            lines.append(f"- {column} {r['patch']}x{r['patch']}: published {_side(r['published_side'])} stands for "
                         f"log10 B in [{low:.1f}, {high:.1f}); the seed mode has {r['seed_bound_log10']:.1f} "
                         f"({gap:+.1%}), {_side(r['seed_side'])}")
        lines += _column_evidence([r for r in rows if r["column"] == column])
    return lines


def _column_evidence(rows: list[dict]) -> list[str]:
    """Why, for one column: the note, side / s per reading, and the per-pixel check against n_l = s."""
    column = rows[0]["column"]
    ratios = {name: " ".join(f"{r[key] / r['patch']:.2f}" for r in rows if r[key] is not None)
              for name, key in (("published", "published_side"), ("seed mode (n_l = s)", "seed_side"),
                                ("footprint variant (n_l = ceil(s / stride))", "footprint_side"))}
    intervals = per_pixel_intervals(column, rows[0]["classes"])
    check = ", ".join(f"{p}x{p}: [{low:.1f}, {high:.1f})" for p, (low, high) in sorted(intervals.items()))
    verdict = "some list of such layers could fit" if fits_patch_extent(column) else "no list of such layers fits"
    return [f"  - why: {SEED_COLUMN_NOTES[column]}",
            "  - side / s: " + "; ".join(f"{name} {values}" for name, values in ratios.items()),
            f"  - per-pixel check, published log10 B / s^2: {check}; with n_l = s a layer on a map at least s wide "
            f"never lowers this as s grows, so "
            f"{verdict}"]


def _assumptions() -> list[str]:
    lines = ["### Assumptions: the seed mode and the refined bound", "", "| | seed mode | refined |", "|---|---|---|"]
    for name, seed, refined in SEED_ASSUMPTIONS:
        lines.append(f"| {name} | {seed} | {refined or 'same'} |")
    return lines
