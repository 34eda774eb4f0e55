"""Import with the gate closed: a user's model file becomes a twin only if the twin, as saved and loaded back,
computes what the original computes on real images.

The original runs in its own runtime: ONNX Runtime for an ONNX file, the loaded module itself for a PyTorch file.
Both sit behind the same `ImportedNetwork` adapter and go through `export.parity` with the fp32 tolerance, so the
gate measures the conversion and the checkpoint round trip, nothing else. A refused import writes nothing.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.engine import EngineInputError, TorchEngine
from export.parity import DATASET_SOURCES, TOLERANCES, ParityReport, parity_check, parity_images
from segmenters.files import atomic_write_text
from segmenters.importing.adapter import ImportedNetwork
from segmenters.importing.sources import ModelImportError, Source, load_source, sample_output_channels
from segmenters.importing.spec import ImportSpec, read_import_spec
from segmenters.twin import Twin, load_twin, save_twin


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX graph run by ONNX Runtime on the CPU, behind `nn.Module`: the original an import is gated against."""

    def __init__(self, payload: bytes):
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)}
        return torch.from_numpy(self.session.run(None, feed)[0])


@dataclass
class ImportResult:
    twin: Twin
    report: ParityReport
    source: Source
    checkpoint: Path


def original_network(source: Source) -> nn.Module:
    """What the import is gated against: ORT on the (cut) ONNX graph, or the user's own loaded module."""
    if source.format == "onnx":
        return OnnxRuntimeNetwork(source.payload)
    return copy.deepcopy(source.network)


def import_twin_gated(
    model_path: str | Path,
    spec_path: str | Path,
    out: str | Path,
    *,
    images: str | None = None,
    count: int = 16,
    factory: str | None = None,
    factory_kwargs: dict | None = None,
    progress: bool = True,
) -> ImportResult:
    """Convert, save to a temporary file, load back, gate against the original; keep `out` (with its
    `.parity.json`/`.parity.png`) only on a pass. Raises `ModelImportError` naming the file and field at fault."""
    spec = read_import_spec(spec_path)
    source = load_source(model_path, spec, factory=factory, factory_kwargs=factory_kwargs)
    wrapped = source.wrapped(spec)
    check_output_channels(wrapped, spec, model_path, spec_path)
    gate_source, gate_images = _gate_images(spec, images, count, spec_path)
    model_spec = spec.model_spec(source_format=source.format, source_file=Path(model_path).name,
                                 source_digest=source.digest, converter=source.converter, gate_images=gate_source)
    reference = Twin(source.wrapped(spec, original_network(source)), model_spec)
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as scratch:
        staged = Path(scratch) / out.name
        save_twin(staged, wrapped, model_spec, imported=source.record(spec))
        twin = load_twin(staged)  # the gate judges the file as it will be read
        original = TorchEngine(reference, device="cpu")
        original.backend = f"original {source.format}" + (" on onnxruntime:CPUExecutionProvider" if source.format == "onnx" else "")
        try:
            report = parity_check(TorchEngine(twin, device="cpu"), original, gate_images,
                                  source=gate_source, tolerance=TOLERANCES["fp32"],
                                  panel_path=Path(scratch) / "parity.png", progress=progress)
        except EngineInputError as exc:  # the normalised images themselves overflowed
            raise ModelImportError(f"{model_path}: import refused, nothing written: under {spec_path}'s input "
                                   f"convention (input.value_range, input.mean, input.std) {exc}") from exc
        if not report.passed:
            raise ModelImportError(_refusal(model_path, spec_path, report))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(scratch) / "parity.png", f"{out}.parity.png")
        atomic_write_text(f"{out}.parity.json", report.model_dump_json(indent=2))
        shutil.move(staged, out)
    return ImportResult(twin=load_twin(out), report=report, source=source, checkpoint=out)


def check_output_channels(wrapped: ImportedNetwork, spec: ImportSpec, model_path, spec_path) -> None:
    try:
        channels = sample_output_channels(wrapped, spec)
    except Exception as exc:  # a layout or size the network does not take fails here, first
        raise ModelImportError(f"{model_path}: the network fails on a {spec.input.size[0]}x{spec.input.size[1]} "
                               f"{spec.input.layout.upper()} input as {spec_path} describes it (input.layout, "
                               f"input.size): {str(exc).splitlines()[0][:300]}") from exc
    if channels != spec.output_channels:
        raise ModelImportError(
            f"{model_path}: its segmentation output has {channels} channels, but {spec_path} lists "
            f"{len(spec.classes)} classes with output.kind {spec.output.kind!r} ({spec.output_channels} expected): "
            f"check classes, output.kind and output.layout")


def _gate_images(spec: ImportSpec, images: str | None, count: int, spec_path) -> tuple[str, list]:
    """The gate's image source (a dataset name, or a folder/glob made absolute, so later gates find it) and images."""
    source = images or spec.parity_images
    if source and source not in DATASET_SOURCES:
        source = str(Path(source).expanduser().resolve()) if Path(source).exists() else source
    if not source:
        raise ModelImportError(f"{spec_path}: no images to gate the import on: give --images or parity_images")
    try:
        found = parity_images(source, count, size=tuple(spec.input.size))
    except (FileNotFoundError, ValueError) as exc:
        raise ModelImportError(f"images {source!r} for the gate: {exc}") from exc
    if not found:
        raise ModelImportError(f"images {source!r} for the gate: no images found")
    return source, found


def _refusal(model_path, spec_path, report: ParityReport) -> str:
    cause = "; ".join(report.failures)
    hint = ("the logits are not finite under the sidecar's input convention (input.value_range, input.mean, "
            "input.std)" if any("not finite" in f for f in report.failures)
            else "the converted network does not compute what the original does")
    return f"{model_path}: import refused, nothing written: {hint} ({spec_path}). Parity: {cause}\n{report.text()}"
