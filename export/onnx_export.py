"""Twin -> ONNX: dynamic batch and spatial size, the `ModelSpec` in `metadata_props`, `onnx.checker` clean.

Uses torch's `torch.export`-based exporter (the default since torch 2.9). Weights are stored inside the one
`.onnx` file (no external data) so a model is a single file to digest, sign and ship.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import onnx
import torch

from segmenters.files import atomic_write_bytes
from segmenters.importing.spec import is_imported
from segmenters.spec import ModelSpec
from segmenters.twin import Twin

SPEC_KEY = "patchwatch.model_spec"
PRECISION_KEY = "patchwatch.precision"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18


class OnnxExportError(RuntimeError):
    pass


def export_onnx(
    twin: Twin, path: str | Path | None = None, *, opset: int = DEFAULT_OPSET, sample_size: tuple[int, int] | None = None
) -> onnx.ModelProto:
    """Export `twin` (normalised images in, logits out) and, with `path`, save it atomically.

    The graph takes any batch and any height/width; `sample_size` (default the spec's input size) only
    shapes the example the exporter traces with.
    """
    height, width = sample_size or twin.spec.input_size
    model = twin.model.eval()
    if next(model.parameters()).device.type != "cpu":  # trace a CPU copy; the caller's twin stays on its device
        model = copy.deepcopy(model).cpu()
    example = torch.zeros(1, 3, height, width)
    try:
        proto = _trace(model, example, opset, imported=is_imported(twin.spec))
    except Exception as exc:  # the exporter's own messages are long; keep the cause, name the model
        raise OnnxExportError(f"ONNX export of {twin.spec.arch} failed: {exc}") from exc
    proto.producer_name, proto.producer_version = "patchwatch", _version()
    set_metadata(proto, spec=twin.spec, precision="fp32")
    check_model(proto)
    if path is not None:
        save_model(proto, path)
    return proto


def _trace(model: torch.nn.Module, example: torch.Tensor, opset: int, imported: bool) -> onnx.ModelProto:
    """torch.export-based export; an imported network converted by onnx2torch computes shapes as tensors
    (data-dependent for torch.export), so it goes through torch's TorchScript exporter, which onnx2torch's modules
    are written for. That tracer bakes the sizes those shape computations yield: an imported twin's graph keeps a
    dynamic batch but takes the height and width it was traced at (the spec's input size, unless `sample_size`)."""
    dims = {0: "batch", 2: "height", 3: "width"}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if imported:
            import segmenters.importing.onnx_ops  # noqa: F401  (onnx2torch's exporter hooks on this torch)

            buffer = io.BytesIO()
            torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset)
            return onnx.load_from_string(buffer.getvalue())
        return torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                 dynamic_shapes=(dims,), opset_version=opset, verbose=False).model_proto


def set_metadata(proto: onnx.ModelProto, *, spec: ModelSpec, precision: str) -> None:
    entries = {p.key: p.value for p in proto.metadata_props}
    entries.update({SPEC_KEY: spec.to_json(), PRECISION_KEY: precision})
    del proto.metadata_props[:]
    for key, value in sorted(entries.items()):
        proto.metadata_props.add(key=key, value=value)


def check_model(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"onnx.checker rejected the graph: {exc}") from exc
    names = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise OnnxExportError(f"expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}, got {names}")


def save_model(proto: onnx.ModelProto, path: str | Path) -> Path:
    return atomic_write_bytes(path, proto.SerializeToString())


def load_model(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise OnnxExportError(f"{path} is not a readable ONNX model: {exc}") from exc


def model_metadata(source: str | Path | onnx.ModelProto) -> tuple[ModelSpec, str]:
    """The `ModelSpec` and precision stored in an exported model."""
    proto = source if isinstance(source, onnx.ModelProto) else load_model(source)
    entries = {p.key: p.value for p in proto.metadata_props}
    if SPEC_KEY not in entries:
        raise OnnxExportError(f"{source if not isinstance(source, onnx.ModelProto) else 'model'} has no "
                              f"{SPEC_KEY!r} metadata: it was not exported by patchwatch")
    return ModelSpec.from_json(entries[SPEC_KEY]), entries.get(PRECISION_KEY, "fp32")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("patchwatch")
    except PackageNotFoundError:
        return "0+unknown"
