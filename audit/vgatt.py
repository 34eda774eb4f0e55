"""VGatt, value-gradient attribution (thesis 002, section 4.3.2), for segmentation twins.

A ReLU network is piecewise affine: around an input X, in the interior of its linear region, a class score is
exactly F^c(X) = sum_i w_i x_i + b with w = grad F^c(X) (eq. 4.11), the contribution of x_i is S_i = w_i x_i
(eq. 4.13) and the bias is b = F^c(X) - W X (eq. 4.12). The same holds at any layer: the rest of the network
is piecewise affine in that layer's activation (with whatever bypasses the layer held as it is). For a
segmenter the score is the class logit summed over a region (a mask, a box, or the pixels a patch flipped).

Completeness. b = F - W X makes "contributions + bias = score" true by construction, so `VGatt` computes the
bias a second, independent way: the response to a zero input (or a zeroed layer activation) of the network
with every gate frozen as it was on X — ReLU masks, ReLU6/hardtanh clamps, hardsigmoid pieces, max-pool
argmax, the gate g of x*g(x) activations (hardswish, SiLU, GELU), sigmoid/tanh outputs, and the broadcast
factor of products of activations (squeeze-excitation, LR-ASPP attention). For a piecewise-affine network the
frozen network *is* F's affine piece at X, so the miss |sum(S) + b_frozen - F| is round-off. Where a layer is not
piecewise affine its gate moves with the input, the gradient carries a term the frozen network lacks, and the
miss says by how much the decomposition fails; those layers are named in `non_affine_layers`.

The miss is reported relative to |sum(S)| (the headline) and to |F|. Relative to the score it flatters a model
whose bias carries most of the score (LR-ASPP: b ~ 100 % of F), where a miss several times the whole
contributions reads as ~1e-3; relative to the contributions it says how wrong the map itself is.

Only gates that depend on the attributed tensor count against exactness: at an inner layer, a gate on a branch
that does not read the layer's data (LR-ASPP's attention branch, computed from the backbone beside
`classifier.cbr`) is the same in the frozen pass, so it cannot break the decomposition. Dependency is autograd's:
the attributed tensor is the only tensor of the pass that requires grad, so a gate depends on it exactly when the
gate's input requires grad (a path the model itself detaches is not seen; the miss would show it).
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

#: ops whose local state ("gate") is recorded on X and frozen in the independent bias pass
_OPS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", torch.Tensor.relu: "relu", torch.Tensor.relu_: "relu",
    F.relu6: "hardtanh", F.hardtanh: "hardtanh", F.leaky_relu: "leaky_relu", F.hardsigmoid: "hardsigmoid",
    F.max_pool2d: "max_pool2d",
    F.hardswish: "gate", F.silu: "gate", F.gelu: "gate",
    torch.sigmoid: "constant", torch.Tensor.sigmoid: "constant", F.sigmoid: "constant",
    torch.tanh: "constant", torch.Tensor.tanh: "constant", F.tanh: "constant",
    torch.mul: "mul", torch.Tensor.mul: "mul", torch.Tensor.__mul__: "mul", torch.Tensor.__rmul__: "mul",
    # constant bounds: two affine pieces and a flat one (onnx2torch writes ONNX HardSigmoid and Clip this way)
    torch.clamp: "clamp", torch.clip: "clamp", torch.Tensor.clamp: "clamp", torch.Tensor.clip: "clamp",
}
#: what breaks piecewise affinity, as named in reports
_NON_AFFINE = {"gate": "x*g(x) activation", "constant": "sigmoid/tanh", "mul": "product of two activations"}
_MAX_POOL = inspect.signature(F.max_pool2d_with_indices)


@dataclass
class _Entry:
    kind: str
    where: str
    slope: torch.Tensor | None = None
    intercept: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    frozen: torch.Tensor | None = None  # mul: the frozen factor
    frozen_arg: int = 1
    depends: bool = True  # the gate moves with the attributed tensor (its input requires grad from it)


def _is_activation(value) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.dim() == 4


def _clamp_bounds(args, kwargs) -> tuple | None:
    """torch.clamp's (min, max) when both are numbers or None (then piecewise affine), else None."""
    low = args[1] if len(args) > 1 else kwargs.get("min")
    high = args[2] if len(args) > 2 else kwargs.get("max")
    if not all(bound is None or isinstance(bound, (int, float)) for bound in (low, high)):
        return None
    return (-math.inf if low is None else float(low)), (math.inf if high is None else float(high))


def _activation_kwargs(kind: str, args, kwargs) -> dict:
    if kind == "clamp":
        low, high = _clamp_bounds(args, kwargs)
        return {"low": low, "high": high}
    if kind == "hardtanh":
        if len(args) > 1 or "min_val" in kwargs:
            low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            return {"low": float(low), "high": float(high)}
        return {"low": 0.0, "high": 6.0}  # F.relu6
    if kind == "leaky_relu":
        return {"negative_slope": float(args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01))}
    return {}


class _GateTape(TorchFunctionMode):
    """Records the gates of a forward pass (`replay=False`), or runs the network with them frozen (`True`)."""

    def __init__(self, tape: list[_Entry], replay: bool, context: list[str]):
        super().__init__()
        self.tape, self.replay, self.context, self.position = tape, replay, context, 0
        self.train_norms: list[str] = []  # train-mode batch norms run on data from the attributed tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and not self.replay:
            self._note_norm(args, kwargs)
        kind = _OPS.get(func)
        if kind is None or (kind == "mul" and not (len(args) == 2 and all(_is_activation(a) for a in args))):
            return func(*args, **kwargs)
        if kind == "clamp" and (not _is_activation(args[0]) or _clamp_bounds(args, kwargs) is None):
            return func(*args, **kwargs)  # bounds that are tensors: left to the completeness error
        if kind == "max_pool2d" and (kwargs.get("return_indices") or (len(args) > 6 and args[6])):
            raise NotImplementedError("max_pool2d with return_indices inside the model is not supported")
        if not self.replay:
            result, entry = self._record(kind, func, args, kwargs)
            self.tape.append(entry)
            return result
        if self.position >= len(self.tape) or self.tape[self.position].kind != kind:
            raise RuntimeError("the frozen pass took another path through the network than the recorded one "
                               f"(op {self.position}: {kind}); is the forward deterministic?")
        entry = self.tape[self.position]
        self.position += 1
        return self._frozen(entry, args, kwargs)

    def _note_norm(self, args, kwargs) -> None:
        """F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)"""
        training = args[5] if len(args) > 5 else kwargs.get("training", False)
        if training and args[0].requires_grad:
            self.train_norms.append(self.context[-1] if self.context else "(model)")

    def _record(self, kind: str, func, args, kwargs) -> tuple[torch.Tensor, _Entry]:
        where = self.context[-1] if self.context else "(model)"
        if kind == "max_pool2d":
            bound = _MAX_POOL.bind(*args, **{k: v for k, v in kwargs.items() if k != "return_indices"})
            result, indices = F.max_pool2d_with_indices(*bound.args, **bound.kwargs)
            return result, _Entry(kind, where, indices=indices, depends=args[0].requires_grad)
        if kind == "mul":
            return func(*args, **kwargs), self._mul_entry(where, *args)
        x = args[0].detach().clone()
        depends = args[0].requires_grad
        result = func(*args, **kwargs)
        y = result.detach()
        if kind == "relu":
            return result, _Entry(kind, where, slope=(x > 0).to(x.dtype), depends=depends)
        if kind in ("hardtanh", "clamp"):
            p = _activation_kwargs(kind, args, kwargs)
            slope = ((x > p["low"]) & (x < p["high"])).to(x.dtype)
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            intercept = torch.where(x <= p["low"], p["low"], zero) + torch.where(x >= p["high"], p["high"], zero)
            return result, _Entry(kind, where, slope=slope, intercept=intercept, depends=depends)
        if kind == "leaky_relu":
            p = _activation_kwargs(kind, args, kwargs)
            return result, _Entry(kind, where, slope=torch.where(x > 0, 1.0, p["negative_slope"]).to(x.dtype),
                                  depends=depends)
        if kind == "hardsigmoid":  # relu6(x + 3) / 6: three affine pieces
            middle = (x > -3) & (x < 3)
            intercept = torch.where(middle, 0.5, (x >= 3).to(x.dtype)).to(x.dtype)
            return result, _Entry(kind, where, slope=middle.to(x.dtype) / 6, intercept=intercept, depends=depends)
        if kind == "gate":  # x * g(x): g frozen (g(0) = 1/2 for hardswish, SiLU and GELU alike)
            gate = torch.where(x != 0, y / torch.where(x != 0, x, 1.0), 0.5)
            return result, _Entry(kind, where, slope=gate, depends=depends)
        return result, _Entry(kind, where, intercept=y.clone(), depends=depends)  # constant: the output itself

    @staticmethod
    def _mul_entry(where: str, a: torch.Tensor, b: torch.Tensor) -> _Entry:
        """A product is affine in the attributed tensor unless both factors depend on it; the factor frozen is the
        one that does not (it is the same in the frozen pass), else the broadcast one: the gate."""
        if a.requires_grad != b.requires_grad:
            frozen_arg = 1 if a.requires_grad else 0
        else:
            frozen_arg = 0 if a.numel() < b.numel() else 1
        return _Entry("mul", where, frozen=(a, b)[frozen_arg].detach().clone(), frozen_arg=frozen_arg,
                      depends=a.requires_grad and b.requires_grad)

    @staticmethod
    def _frozen(entry: _Entry, args, kwargs) -> torch.Tensor:
        if entry.kind == "max_pool2d":
            x = args[0]
            flat = x.flatten(2).gather(2, entry.indices.flatten(2))
            return flat.view_as(entry.indices)
        if entry.kind == "mul":
            operands = list(args)
            operands[entry.frozen_arg] = entry.frozen
            return operands[0] * operands[1]
        x = args[0]
        out = torch.zeros_like(x) if entry.slope is None else entry.slope * x
        if entry.intercept is not None:
            out = out + entry.intercept
        if kwargs.get("inplace") or (len(args) > 1 and args[-1] is True):
            return x.copy_(out)
        return out


def non_affine_layers(model: nn.Module, tape: list[_Entry] | None = None,
                      train_norms: list[str] | None = None) -> list[str]:
    """Where the network stops being piecewise affine in the attributed tensor: train-mode batch norms (the
    `train_norms` a recorded pass met on the tensor's data; every one in `model` when None), and (from a recorded
    pass) the layers whose x*g(x) activations, sigmoid/tanh or products of activations depend on the tensor."""
    if train_norms is None:
        train_norms = [name for name, module in model.named_modules()
                       if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training]
    found = [f"{name} (batch norm in train mode)" for name in dict.fromkeys(train_norms)]
    for entry in tape or []:
        label = f"{entry.where} ({_NON_AFFINE[entry.kind]})" if entry.kind in _NON_AFFINE and entry.depends else None
        if label and label not in found:
            found.append(label)
    return found


def region_mask(region, shape: tuple[int, int]) -> torch.Tensor:
    """A region as an (H, W) bool tensor: None (the whole image), a (top, left, bottom, right) box (bottom and
    right exclusive), or an (H, W) mask."""
    height, width = shape
    if region is None:
        mask = torch.ones(shape, dtype=torch.bool)
    elif isinstance(region, tuple) and len(region) == 4:
        top, left, bottom, right = (int(v) for v in region)
        if not (0 <= top < bottom <= height and 0 <= left < right <= width):
            raise ValueError(f"box {region} does not lie inside the {height}x{width} output")
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[top:bottom, left:right] = True
    else:
        mask = (region if isinstance(region, torch.Tensor) else torch.as_tensor(np.asarray(region))).bool()
        if tuple(mask.shape) != (height, width):
            raise ValueError(f"region mask is {tuple(mask.shape)}, the output is {height}x{width}")
    if not mask.any():
        raise ValueError("the region is empty: no pixel to score")
    return mask


def segment_score(logits: torch.Tensor, target: int, mask: torch.Tensor) -> torch.Tensor:
    """(N,) scores: the class-`target` logit summed over the (H, W) `mask` — what every attribution explains."""
    if not 0 <= target < logits.shape[1]:
        raise ValueError(f"target class {target} is outside the model's {logits.shape[1]} classes")
    return (logits[:, target] * mask.to(logits.device, logits.dtype)).sum(dim=(1, 2))


def relative_miss(miss: float, reference: float) -> float:
    """miss / |reference|; a miss against a zero reference is infinitely large (0 when there is no miss)."""
    if reference == 0:
        return 0.0 if miss == 0 else math.inf
    return miss / abs(reference)


@dataclass
class VGattResult:
    """score = contributions.sum() + bias, decomposed at `layer` ("input" = the network's own input tensor).

    Completeness is the miss |sum(contributions) + bias_frozen - score| twice over: relative to
    |sum(contributions)|, the headline (`completeness_error_vs_contributions`: how wrong the map is), and relative
    to |score| (`completeness_error`), which a dominant bias makes look small: on LR-ASPP the bias is ~100 % of the
    score, and a miss of several times the contributions reads as ~1e-3 of it."""

    layer: str
    target: int
    score: float  # F^c(X): class-`target` logit summed over the region
    contributions: np.ndarray  # (C, h, w) w_i x_i at the layer
    bias: float  # eq. 4.12: F - W X
    bias_frozen: float  # the bias computed independently, by the frozen-gate network at zero
    completeness_error: float  # |sum(contributions) + bias_frozen - score| / |score|
    completeness_error_vs_contributions: float  # the same miss / |sum(contributions)|: the headline
    non_affine_layers: list[str] = field(default_factory=list)
    dtype: str = "float64"

    @property
    def map(self) -> np.ndarray:
        """(h, w) contribution per spatial position: the contributions summed over channels."""
        return self.contributions.sum(axis=0)

    @property
    def bias_ratio(self) -> float:
        """bias / score: how much of the score no input element explains (appendix A.1)."""
        return self.bias / self.score if self.score != 0 else float("nan")

    @property
    def exact(self) -> bool:
        """No gate that depends on the attributed tensor moves with it: the decomposition is exact."""
        return not self.non_affine_layers


class VGatt:
    """Value-gradient attribution of a segmentation network's class score, at its input or at a named layer.

    `model` maps a normalised (N, 3, H, W) tensor to (N, C, H, W) logits (`Twin.model`). Computation runs on a
    private copy in `dtype` (float64 by default: the decomposition is then exact to ~1e-15 for piecewise-affine
    networks); the caller's model is never modified.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, dtype: torch.dtype = torch.float64):
        self.model = copy.deepcopy(model).to(dtype)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.dtype = dtype
        self.layer = layer
        modules = dict(self.model.named_modules())
        if layer is not None and layer not in modules:
            raise ValueError(f"no layer {layer!r} in {type(model).__name__}; layers: {', '.join(list(modules)[1:12])}, ...")
        self._module = modules.get(layer) if layer else None
        self._names = {module: name for name, module in self.model.named_modules()}

    @staticmethod
    def _score(logits: torch.Tensor, target: int, mask: torch.Tensor) -> torch.Tensor:
        return segment_score(logits, target, mask)[0]

    def attribute(self, inputs: torch.Tensor, target: int, region=None) -> VGattResult:
        """Decompose the class-`target` score over `region` for one (3, H, W) or (1, 3, H, W) input."""
        x = torch.as_tensor(inputs)
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[:2] != (1, 3):
            raise ValueError(f"VGatt attributes one image at a time: (3, H, W) or (1, 3, H, W), got {tuple(x.shape)}")
        x = x.detach().to(next(self.model.parameters()).device, self.dtype)
        tape: list[_Entry] = []
        captured: dict = {}
        context: list[str] = []
        handles = self._context_hooks(context)
        if self._module is not None:
            def capture(_module, _inputs, output):
                if not isinstance(output, torch.Tensor):
                    raise ValueError(f"layer {self.layer!r} returns {type(output).__name__}, not a tensor")
                # A_l as a leaf: the score's gradient w.r.t. it is W_l; later in-place ops (ReLU(inplace=True))
                # act on the clone handed downstream, never on A_l itself
                captured["activation"] = output.detach().requires_grad_(True)
                return captured["activation"].clone()

            handles.append(self._module.register_forward_hook(capture))
        try:
            with torch.enable_grad():
                if self._module is None:
                    x.requires_grad_(True)
                recorder = _GateTape(tape, replay=False, context=context)
                with recorder:
                    logits = self.model(x)
                mask = region_mask(region, tuple(logits.shape[-2:])).to(logits.device)
                score = self._score(logits, target, mask)
                if self._module is not None and "activation" not in captured:
                    raise ValueError(f"layer {self.layer!r} does not run in the forward pass")
                activation = x if self._module is None else captured["activation"]
                (weights,) = torch.autograd.grad(score, activation)
        finally:
            for handle in handles:
                handle.remove()
        contributions = (weights * activation).detach()[0]
        bias_frozen = self._frozen_bias(x, tape, target, mask)
        return self._result(target, float(score.detach()), contributions, bias_frozen,
                            non_affine_layers(self.model, tape, recorder.train_norms))

    def _result(self, target: int, score: float, contributions: torch.Tensor, bias_frozen: float,
                non_affine: list[str]) -> VGattResult:
        total = float(contributions.sum())
        miss = abs(total + bias_frozen - score)
        return VGattResult(
            layer=self.layer or "input", target=target, score=score, contributions=contributions.cpu().numpy(),
            bias=score - total, bias_frozen=bias_frozen, completeness_error=relative_miss(miss, score),
            completeness_error_vs_contributions=relative_miss(miss, total), non_affine_layers=non_affine,
            dtype=str(self.dtype).replace("torch.", ""))

    @torch.no_grad()
    def _frozen_bias(self, x: torch.Tensor, tape: list[_Entry], target: int, mask: torch.Tensor) -> float:
        handles = []
        if self._module is None:
            x = torch.zeros_like(x)
        else:
            handles.append(self._module.register_forward_hook(lambda _m, _i, output: torch.zeros_like(output)))
        try:
            mode = _GateTape(tape, replay=True, context=[])
            with mode:
                logits = self.model(x)
            if mode.position != len(tape):
                raise RuntimeError("the frozen pass met fewer gates than the recorded one")
        finally:
            for handle in handles:
                handle.remove()
        return float(self._score(logits, target, mask))

    def _context_hooks(self, context: list[str]) -> list:
        """Keep the name of the innermost running module, so a gate is reported with its layer."""
        handles = []
        for module, name in self._names.items():
            if not name:
                continue
            handles.append(module.register_forward_pre_hook(lambda _m, _i, name=name: context.append(name) and None))
            handles.append(module.register_forward_hook(lambda _m, _i, _o: context.pop() and None))
        return handles
