"""What a patch can never do (seed 000, section 5).

Two maps of a region differ when one pixel's winning class differs; a K-class region of A pixels has K^A maps,
and reaching a different map needs a different linear region of the network. So if a patch could force any
map on the region, the network restricted to the patch would need K^A linear regions; an upper bound B on
those regions gives the largest region where arbitrary maps are possible: A <= log B / log K.

Bounds, for the network restricted to a patch (input dimension D_0 = 3 s^2 for an s x s patch; N_l = the
layer-l units whose receptive field meets the patch — the rest cannot change):
  * dense (Montufar 2017, the deep form of Montufar et al. 2014):
        B = prod_l sum_{j=0}^{d_l} C(N_l, j),   d_l = min(D_0, N_1, ..., N_{l-1})
  * convolutional (Xiong et al. 2020): every layer multiplies the regions by at most
        sum_{i=0}^{D_0} C(N_l, i)
    with N_l = d_l n_l^(1) n_l^(2) (channels x spatial positions of layer l met by the patch), so
        B = prod_l sum_{i=0}^{D_0} C(N_l, i)
    (the last layer's own one-layer count, R_{N'} in the paper, is bounded here by the same hyperplane-
    arrangement sum, which can only loosen the bound).
Everything is in log10: the numbers run to thousands of digits.

Seed 000's own computation (its Table 1; `seed_bound_log10`, the `seed` mode of `audit bounds`, with the table's
networks and published cells in `audit.seed_table`). The seed applies Xiong et al.'s product to the patch; its
equations and the numbers in its worked example did not survive in our copy, so the reading below is the one its
text and surviving numbers pin down:
        B_seed(s) = prod_{l=1}^{L} sum_{i=0}^{D_0} C(d_l n_l^(1) n_l^(2), i),   D_0 = s^2,   n_l^(k) = min(s, h_l^(k))
  * D_0 = n_0^(1) n_0^(2) = s^2, one input value per patch pixel. The worked example: five "typical
    convolutional layer[s] (containing 128 or 256 channels)" over a patch of "around" N x N pixels give the count
    behind "A has to be smaller than 1500" (ten classes), so one layer multiplies the regions by at most 10^300.
    With D_0 = s^2 a 10x10 patch gives 10^252.6 (128 channels) and 10^282.8 (256); with 3 s^2, 10^616 and 10^707,
    under 10^300 only up to 6x6. Table 1's FCN8 column settles it: D_0 = s^2 gives 11/29/59/118 against the
    published 11/30/60/118, D_0 = 3 s^2 gives 18/46/94/188;
  * n_l = the patch side s in every layer ("the spatial dimensions are determined by the receptive field of the
    neurons in which the original patch is present, but these are typically small numbers, since the patch has
    to be small"), capped by the layer's own map (a squeeze-excitation vector has one position);
  * L = every piecewise-linear gate (ReLU family) of the network, d_l = its channels;
  * side = floor(sqrt(floor(log B / log K))), K = 19 Cityscapes classes ("1500 pixels (38x38)": the floor).

`patch_reach` finds N_l for a real zoo model by forward-mode differentiation of a structural copy of the
network (ReLU-like gates as identity, max-pool as average-pool, so no unit is dropped by the input at hand),
with a random tangent on the patch pixels: a unit is reached iff its tangent is non-zero.
`regions_along_lines` counts, for a trained twin, the linear regions met along random lines through the patch
subspace: the empirical side of the same question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

LOG10 = math.log(10.0)


def log10_binomial_sum(n: int, k: int) -> float:
    """log10 of sum_{j=0}^{k} C(n, j), exactly enough for n up to millions (log-sum-exp over the terms)."""
    if n < 0 or k < 0:
        raise ValueError(f"binomial sums need n, k >= 0, got n={n}, k={k}")
    k = min(k, n)
    if k == n:
        return n * math.log10(2.0)
    js = np.arange(k + 1, dtype=np.float64)
    terms = (math.lgamma(n + 1) - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in js])) / LOG10
    top = terms.max()
    return float(top + math.log10(np.power(10.0, terms - top).sum()))


def dense_bound_log10(input_dim: int, widths: list[int]) -> float:
    """Montufar (2017): prod_l sum_{j=0}^{d_l} C(n_l, j), d_l = min(n_0, ..., n_{l-1})."""
    total, dimension = 0.0, input_dim
    for width in widths:
        total += log10_binomial_sum(width, dimension)
        dimension = min(dimension, width)
    return total


def conv_bound_log10(input_dim: int, units: list[int]) -> float:
    """Xiong et al. (2020): prod_l sum_{i=0}^{D_0} C(N_l, i), N_l = d_l n_l^(1) n_l^(2)."""
    return float(sum(log10_binomial_sum(n, input_dim) for n in units))


SEED_VALUES_PER_PIXEL = 1  # seed 000's D_0 = n_0^(1) n_0^(2): one input value per patch pixel (see the docstring)


def seed_bound_log10(patch: int, gate_shapes: list[tuple[int, int, int]]) -> float:
    """Seed 000's bound for an s x s patch: prod_l sum_{i=0}^{D_0} C(d_l min(s, h_l) min(s, w_l), i), D_0 = s^2,
    over the gate layers' (channels, height, width)."""
    input_dim = SEED_VALUES_PER_PIXEL * patch * patch
    return conv_bound_log10(input_dim, [c * min(patch, h) * min(patch, w) for c, h, w in gate_shapes])


def arbitrary_map_side(bound_log10: float, classes: int) -> int:
    """The largest s such that a K-class s x s region has no more maps than the bound allows: K^(s^2) <= B."""
    if classes < 2:
        raise ValueError("with fewer than two classes there is only one map")
    area = math.floor(bound_log10 / math.log10(classes) + 1e-9)
    return math.isqrt(max(area, 0))


# ops that gate (and would drop units at a given input) and their structural stand-ins
_STRUCTURAL = {F.relu: "identity", torch.relu: "identity", torch.relu_: "identity", F.relu6: "identity",
               F.hardtanh: "identity", F.leaky_relu: "identity", F.hardswish: "identity", F.hardsigmoid: "identity",
               F.silu: "identity", F.gelu: "identity", torch.Tensor.relu: "identity", torch.Tensor.relu_: "identity",
               F.max_pool2d: "avg_pool"}


class _Structural(TorchFunctionMode):
    """Gates become identities (recording how many of their input units the patch reaches); max-pools become
    average-pools over the same windows, so reach is structural, not an accident of the input."""

    def __init__(self):
        super().__init__()
        self.reached: list[tuple[int, int]] = []  # per gate: (units reached, units in the layer)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _STRUCTURAL.get(func)
        if kind is None:
            return func(*args, **kwargs)
        x = args[0]
        if kind == "identity":
            self.reached.append(_reach(x))
            return x * 1.0
        kernel = args[1] if len(args) > 1 else kwargs["kernel_size"]
        stride = (args[2] if len(args) > 2 else kwargs.get("stride")) or kernel
        padding = args[3] if len(args) > 3 else kwargs.get("padding", 0)
        ceil_mode = args[5] if len(args) > 5 else kwargs.get("ceil_mode", False)
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=False)


class _GateShapes(TorchFunctionMode):
    """Records the (channels, height, width) of every gate's input, in forward order; runs nothing else."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _STRUCTURAL.get(func) == "identity":
            channels, height, width = args[0].shape[1:]
            self.shapes.append((int(channels), int(height), int(width)))
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def gate_shapes(builder, size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(channels, height, width) of each gate layer of `builder()` on a `size` image: built and run on the meta
    device, so a full Cityscapes frame through VGG16 costs no memory and no arithmetic."""
    with torch.device("meta"):
        model = builder().eval()
        mode = _GateShapes()
        with mode:
            model(torch.empty((1, 3, *size)))
    return mode.shapes


def _reach(x: torch.Tensor) -> tuple[int, int]:
    """(units of the first sample whose tangent is non-zero, units in the layer)."""
    import torch.autograd.forward_ad as fwAD

    tangent = fwAD.unpack_dual(x).tangent
    if tangent is None:
        return 0, x[0].numel()
    return int((tangent[0] != 0).sum()), x[0].numel()


@dataclass
class PatchReach:
    arch: str
    patch: int
    input_dim: int  # D_0 = 3 s^2
    units: list[int]  # N_l per gate layer, in forward order
    layer_sizes: list[int]  # all units of each gate layer


@torch.no_grad()
def patch_reach(model: nn.Module, patch: int, size: tuple[int, int] = (256, 256), arch: str = "") -> PatchReach:
    """N_l for an s x s patch at the centre of a `size` image: units of every gate layer that the patch reaches."""
    import torch.autograd.forward_ad as fwAD

    model = model.eval().double()
    height, width = size
    top, left = (height - patch) // 2, (width - patch) // 2
    generator = torch.Generator().manual_seed(0)
    # a generic point (a zero image can zero both factors of a product, e.g. a squeeze-excitation gate)
    x = torch.randn((1, 3, height, width), generator=generator, dtype=torch.float64)
    tangent = torch.zeros_like(x)
    tangent[:, :, top:top + patch, left:left + patch] = 1.0 + torch.rand((1, 3, patch, patch), generator=generator,
                                                                          dtype=torch.float64)
    mode = _Structural()
    with fwAD.dual_level(), mode:
        model(fwAD.make_dual(x, tangent))
    return PatchReach(arch, patch, 3 * patch * patch, [r for r, _ in mode.reached if r > 0],
                      [n for r, n in mode.reached if r > 0])


@torch.no_grad()
def regions_along_lines(model: nn.Module, image: torch.Tensor, top: int, left: int, patch: int, lines: int = 4,
                        samples: int = 4096, radius: float = 1.0, seed: int = 0, batch: int = 64,
                        directions: list[torch.Tensor] | None = None) -> list[int]:
    """Linear regions met along `lines` random lines X + t d (t in [-radius, radius], d a unit direction on
    the patch's pixels only; or the given (3, s, s) `directions`): consecutive samples with different
    activation patterns (every gate's state) mark a region boundary; the count is a lower bound for each line
    (boundaries closer than the sampling step are missed)."""
    from audit.vgatt import _Entry, _GateTape

    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    counts = []
    for line in range(len(directions) if directions is not None else lines):
        direction = torch.zeros_like(image)
        direction[:, top:top + patch, left:left + patch] = (
            directions[line] if directions is not None else torch.randn((3, patch, patch), generator=generator))
        direction /= direction.norm()
        ts = torch.linspace(-radius, radius, samples, dtype=image.dtype, device=image.device)
        previous, regions = None, 0
        for start in range(0, samples, batch):
            chunk = image[None] + ts[start:start + batch, None, None, None] * direction[None]
            tape: list[_Entry] = []
            with _GateTape(tape, replay=False, context=[]):
                model(chunk)
            for pattern in _pattern_hashes(tape, len(chunk)):
                if pattern != previous:
                    regions += 1
                    previous = pattern
        counts.append(regions)
    return counts


def _pattern_hashes(tape, rows: int) -> list[int]:
    """Each sample's activation pattern (the state of every gate) as a hash; each gate's states for the
    whole batch come to the host at once."""
    import hashlib

    digests = [hashlib.blake2b(digest_size=16) for _ in range(rows)]
    for entry in tape:
        if entry.slope is not None:
            states = [np.packbits(row.reshape(-1)).tobytes() for row in (entry.slope > 0).cpu().numpy()]
        elif entry.indices is not None:
            states = [row.tobytes() for row in entry.indices.cpu().numpy()]
        else:
            continue
        for digest, state in zip(digests, states):
            digest.update(state)
    return [int.from_bytes(digest.digest(), "big") for digest in digests]


def bounds_table(archs: list[str], patch_sizes: list[int], classes: int = 19, size: tuple[int, int] = (256, 256),
                 progress: bool = True) -> list[dict]:
    """Seed 000's Table 1 for the zoo: per architecture and patch size, log10 of both bounds and the largest
    square region where a patch could still force arbitrary `classes`-class maps."""
    from tqdm import tqdm

    from segmenters.models import build_model

    rows = []
    for arch in tqdm(archs, desc="bounds", disable=not progress):
        model = build_model(arch, classes)
        rows.extend(refined_row(model, arch, patch, classes, size) for patch in patch_sizes)
    return rows


def refined_row(model: nn.Module, arch: str, patch: int, classes: int, size: tuple[int, int]) -> dict:
    """The project's bound for one architecture and patch: both bounds on the units the patch really reaches."""
    reach = patch_reach(model, patch, size, arch)
    conv, dense = conv_bound_log10(reach.input_dim, reach.units), dense_bound_log10(reach.input_dim, reach.units)
    return {"arch": arch, "patch": patch, "gate_layers": len(reach.units), "units_reached": int(sum(reach.units)),
            "conv_bound_log10": conv, "dense_bound_log10": dense, "conv_side": arbitrary_map_side(conv, classes),
            "dense_side": arbitrary_map_side(dense, classes), "classes": classes}


def bounds_markdown(rows: list[dict]) -> str:
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    sizes = sorted({r["patch"] for r in rows})
    cell = {(r["arch"], r["patch"]): r for r in rows}
    lines = ["| patch | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for size in sizes:
        lines.append(f"| {size}x{size}: bound (conv / dense) | " + " | ".join(
            f"10^{cell[a, size]['conv_bound_log10']:.0f} / 10^{cell[a, size]['dense_bound_log10']:.0f}" for a in archs) + " |")
        lines.append(f"| {size}x{size}: arbitrary maps up to | " + " | ".join(
            f"{cell[a, size]['conv_side']}x{cell[a, size]['conv_side']} / {cell[a, size]['dense_side']}x{cell[a, size]['dense_side']}"
            for a in archs) + " |")
    return "\n".join(lines) + "\n"


def _first_image(spec) -> torch.Tensor:
    """The first validation image of the twin's dataset; for an imported twin (trained on data not here), the
    first of the images its import was gated on."""
    from segmenters.data import DATASETS, build_dataset
    from segmenters.data.folder import ImageFolder

    gate_images = spec.training.get("gate_images")
    if spec.dataset not in DATASETS and gate_images:
        if gate_images in DATASETS:
            return build_dataset(gate_images, "val", size=spec.input_size)[0][0]
        return ImageFolder(gate_images, size=spec.input_size)[0][0]
    return build_dataset(spec.dataset, "val", size=spec.input_size)[0][0]


def empirical_regions(twin_path: str, patch_sizes: list[int], lines: int = 4, samples: int = 4096,
                      radius: float = 1.0, progress: bool = True, device: torch.device | str = "cpu") -> list[dict]:
    """For a trained twin: linear regions met along random lines through the patch subspace, patch at the
    centre of the first validation image of its dataset (in the network's normalised input space), with the
    twin on `device` (the lines are drawn on the CPU, so they do not depend on it)."""
    from segmenters.twin import load_twin

    twin = load_twin(twin_path, map_location=device)
    image = _first_image(twin.spec)
    x = twin.spec.normalization.normalize(image[None].to(device))[0]
    height, width = x.shape[-2:]
    from tqdm import tqdm

    rows = []
    for patch in tqdm(patch_sizes, desc="regions along lines", disable=not progress):
        top, left = (height - patch) // 2, (width - patch) // 2
        counts = regions_along_lines(twin.model, x, top, left, patch, lines=lines, samples=samples, radius=radius)
        rows.append({"patch": patch, "regions": counts, "samples_per_line": samples, "radius": radius})
    return rows
