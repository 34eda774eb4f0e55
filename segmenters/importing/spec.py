"""`ImportSpec`: the YAML sidecar that says what a foreign model file cannot say about itself.

A network trained elsewhere arrives as a file (ONNX, `torch.export` program, TorchScript, or a Python factory plus a
state dict). Its class names and colours, how it wants its pixels (value range, mean/std, RGB or BGR, NCHW or
NHWC, a fixed input size) and what its output means (logits, softmax probabilities, or one foreground channel
before or after a sigmoid) come from this record. It is validated strictly: an unknown field is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segmenters.spec import ClassInfo, ModelSpec, Normalization

#: what the chosen output holds; the two "foreground" kinds are one channel for a two-class (background, thing) model
OUTPUT_KINDS = ("logits", "probabilities", "foreground_logit", "foreground_probability")
FOREGROUND_KINDS = ("foreground_logit", "foreground_probability")


#: the architecture name of every imported twin starts with this
IMPORTED_ARCH_PREFIX = "imported/"


def is_imported(spec: ModelSpec) -> bool:
    return spec.arch.startswith(IMPORTED_ARCH_PREFIX)


class ImportSpecError(ValueError):
    """A sidecar that cannot describe the model: names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputConvention(_Strict):
    """How the original network wants its pixels. `mean`/`std` are in the network's own channel order."""

    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    size: tuple[int, int] = Field(description="(height, width) the network was trained at")
    fixed_size: bool = Field(
        default=False, description="the graph takes only `size`: images are resized to it and the output back"
    )

    @model_validator(mode="after")
    def _sane(self) -> InputConvention:
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.value_range[1] <= self.value_range[0]:
            raise ValueError(f"value_range must be increasing, got {self.value_range}")
        if min(self.size) < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        return self

    def normalization(self) -> Normalization:
        """The project's `Normalization` for images in [0, 1] RGB, as every twin takes them: the value range is
        folded into mean and std ((low + x (high - low) - mean) / std = (x - mean') / std'), the network's
        per-channel stats put in RGB order."""
        order = (2, 1, 0) if self.channel_order == "bgr" else (0, 1, 2)
        low, high = self.value_range
        return Normalization(mean=tuple((self.mean[i] - low) / (high - low) for i in order),
                             std=tuple(self.std[i] / (high - low) for i in order), value_range=(0.0, 1.0))


class OutputConvention(_Strict):
    """Which output is the segmentation and what it holds."""

    index: int = Field(default=0, ge=0, description="position among the graph's outputs")
    name: str | None = Field(default=None, description="or the output's name (ONNX), which wins over index")
    kind: Literal["logits", "probabilities", "foreground_logit", "foreground_probability"] = "logits"
    layout: Literal["nchw", "nhwc"] = "nchw"


class ImportSpec(_Strict):
    """Sidecar of an imported model; `model_spec()` turns it into the `ModelSpec` the twin carries."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the twin's name; its arch is imported/<name>")
    classes: tuple[ClassInfo, ...]
    input: InputConvention
    output: OutputConvention = Field(default_factory=OutputConvention)
    ignore_index: int = 255
    dataset: str = Field(default="imported", description="where its training images came from, for the record")
    parity_images: str | None = Field(
        default=None, description="dataset name or image folder/glob that gates the import (default: --images)"
    )

    @model_validator(mode="after")
    def _classes_fit_output(self) -> ImportSpec:
        if len(self.classes) < 2:
            raise ValueError("a segmentation model needs at least two classes")
        if self.output.kind in FOREGROUND_KINDS and len(self.classes) != 2:
            raise ValueError(
                f"output.kind {self.output.kind!r} is one foreground channel: classes must be exactly two "
                f"(background, foreground), got {len(self.classes)}"
            )
        return self

    @property
    def output_channels(self) -> int:
        """Channels the chosen output must have."""
        return 1 if self.output.kind in FOREGROUND_KINDS else len(self.classes)

    def model_spec(self, *, source_format: str, source_file: str, source_digest: str, converter: str,
                   gate_images: str) -> ModelSpec:
        """`gate_images`: what the import was gated on, the default for every later gate of this twin."""
        return ModelSpec(
            arch=f"{IMPORTED_ARCH_PREFIX}{self.name}",
            classes=self.classes,
            ignore_index=self.ignore_index,
            normalization=self.input.normalization(),
            input_size=self.input.size,
            dataset=self.dataset,
            training={
                "imported_from": source_file, "format": source_format, "source_digest": source_digest,
                "converter": converter, "gate_images": gate_images,
            },
        )


def read_import_spec(path: str | Path) -> ImportSpec:
    """Parse a YAML sidecar; every problem names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ImportSpecError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ImportSpecError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ImportSpecError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return ImportSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ImportSpecError(f"{path}: {problems}") from exc
