"""Foreign model files -> a PyTorch network, and the record that rebuilds it from a checkpoint.

Four ways a segmentation network arrives:
- `onnx`: an ONNX file, converted with onnx2torch (plus `onnx_ops` for opset 18). The graph is first cut down to
  the segmentation output with ONNX's own extractor; a final Sigmoid or channel Softmax on a probability output
  is cut off too, so the twin holds the network's exact logits instead of the log of rounded probabilities.
- `torch.export`: a `.pt2` program saved by `torch.export.save`; its `.module()` is the network.
- `torchscript`: a scripted or traced module saved by `torch.jit.save`.
- `python`: a factory `package.module:function` (with keyword arguments) and a state dict file.

The checkpoint embeds what rebuilds the network (the ONNX bytes, the program, the script; a factory's name), so a
twin is one file that loads anywhere the factory's package is installed.
"""

from __future__ import annotations

import importlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from segmenters.importing.spec import ImportSpec
from segmenters.spec import file_digest

# onnx2torch's Slice indexes with a list; torch warns on every call, about nothing this project can change
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")

FORMATS = ("onnx", "torch.export", "torchscript", "python")
#: file suffixes read as each format when no factory is given
SUFFIXES = {".onnx": "onnx", ".pt2": "torch.export", ".ts": "torchscript", ".pt": "torchscript",
            ".pth": "torchscript", ".jit": "torchscript", ".torchscript": "torchscript"}
#: final activations that a probability output may end in, cut off to reach the logits
PEELABLE = {"foreground_probability": ("Sigmoid", "foreground_logit"), "probabilities": ("Softmax", "logits")}


class ModelImportError(ValueError):
    """A model file that cannot become a twin: names the file (and the spec field, where one is at fault)."""


@dataclass
class Source:
    """A loaded network, what the checkpoint must hold to rebuild it, and what was done to it on the way."""

    format: str
    network: nn.Module
    output_index: int
    output_kind: str
    digest: str
    converter: str
    payload: bytes | None = None
    factory: str | None = None
    factory_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    batch_of_one: bool = False

    def record(self, spec: ImportSpec) -> dict:
        """What `rebuild_network` needs, in types `torch.load(weights_only=True)` reads back."""
        payload = torch.frombuffer(bytearray(self.payload), dtype=torch.uint8) if self.payload else None
        return {"format": self.format, "import_spec": spec.model_dump_json(), "payload": payload,
                "factory": self.factory, "factory_kwargs": json.dumps(self.factory_kwargs),
                "output_index": self.output_index, "output_kind": self.output_kind, "converter": self.converter,
                "batch_of_one": self.batch_of_one}

    def wrapped(self, spec: ImportSpec, network: nn.Module | None = None) -> nn.Module:
        """`network` (default: the converted one) behind the zoo's contract, in eval mode."""
        from segmenters.importing.adapter import ImportedNetwork

        return ImportedNetwork(self.network if network is None else network, spec, self.output_index,
                               self.output_kind, self.batch_of_one).eval()


def detect_format(path: Path, factory: str | None) -> str:
    if factory:
        return "python"
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ModelImportError(f"{path}: unknown model file type {path.suffix!r}; expected one of {sorted(SUFFIXES)}, "
                               f"or a state dict with --factory package.module:function")
    return fmt


def load_source(path: str | Path, spec: ImportSpec, *, factory: str | None = None,
                factory_kwargs: dict | None = None) -> Source:
    """Read `path` as the format its suffix (or `factory`) says and convert it to a PyTorch network."""
    path = Path(path)
    if not path.is_file():
        raise ModelImportError(f"model file not found: {path}")
    fmt = detect_format(path, factory)
    digest = file_digest(path)
    if fmt == "onnx":
        return _onnx_source(path, spec, digest)
    if fmt == "python":
        return _python_source(path, spec, digest, factory, factory_kwargs or {})
    payload = path.read_bytes()
    network = _torch_network(fmt, payload, label=str(path))
    source = Source(fmt, network, spec.output.index, spec.output.kind, digest, f"torch {torch.__version__}", payload)
    if fmt == "torch.export":
        source.batch_of_one = check_input_dims(exported_input_dims(payload), spec, path, "the program's input")
    return source


def exported_input_dims(payload: bytes) -> list[int | None]:
    """The static sizes (None where dynamic) of a torch.export program's first user input."""
    program = torch.export.load(io.BytesIO(payload))
    name = program.graph_signature.user_inputs[0]
    value = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name).meta["val"]
    return [d if isinstance(d, int) else None for d in value.shape]


def _torch_network(fmt: str, payload: bytes, label: str) -> nn.Module:
    try:
        if fmt == "torch.export":
            return torch.export.load(io.BytesIO(payload)).module()
        return torch.jit.load(io.BytesIO(payload), map_location="cpu").eval()
    except Exception as exc:  # torch's own message says what it found instead
        hint = "" if fmt == "torch.export" else " (a state dict needs --factory package.module:function)"
        raise ModelImportError(f"{label}: not a {fmt} file{hint}: {str(exc).splitlines()[0][:300]}") from exc


def _python_source(path: Path, spec: ImportSpec, digest: str, factory: str, kwargs: dict) -> Source:
    network = build_factory(factory, kwargs)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelImportError(f"{path}: not a PyTorch state dict: {str(exc).splitlines()[0][:300]}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a Lightning or mmseg checkpoint holds it one level down
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelImportError(f"{path}: expected a state dict (parameter name -> tensor)")
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelImportError(f"{path}: does not fit {factory}: {str(exc)[:400]}") from exc
    return Source("python", network.eval(), spec.output.index, spec.output.kind, digest, f"torch {torch.__version__}",
                  factory=factory, factory_kwargs=kwargs)


def build_factory(factory: str, kwargs: dict) -> nn.Module:
    """`package.module:function` called with `kwargs` -> the (untrained) network."""
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise ModelImportError(f"--factory {factory!r}: expected package.module:function")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelImportError(f"--factory {factory!r}: {exc}") from exc
    network = builder(**kwargs)
    if not isinstance(network, nn.Module):
        raise ModelImportError(f"--factory {factory!r} returned {type(network).__name__}, not a torch.nn.Module")
    return network


def _onnx_source(path: Path, spec: ImportSpec, digest: str) -> Source:
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise ModelImportError(f"{path}: not a readable ONNX model: {str(exc)[:300]}") from exc
    input_name, batch_of_one = check_onnx_input(proto, spec, path)
    output_name = onnx_output_name(proto, spec, path)
    output_kind, notes = spec.output.kind, []
    peel = PEELABLE.get(output_kind)
    producer = next((n for n in proto.graph.node if output_name in n.output), None)
    if peel and producer is not None and producer.op_type == peel[0] and _softmax_on_channels(producer, spec):
        notes.append(f"final {producer.op_type} cut off: the twin holds the logits before it")
        output_name, output_kind = producer.input[0], peel[1]
    inline_weight_identities(proto)
    payload = extract_graph(proto, input_name, output_name, path).SerializeToString()
    network = convert_onnx(payload, label=str(path))
    import onnx2torch

    if batch_of_one:
        notes.append("the graph takes one image at a time: batches are split")
    converter = f"onnx2torch {getattr(onnx2torch, '__version__', '')}".strip()
    return Source("onnx", network, 0, output_kind, digest, converter, payload, notes=notes, batch_of_one=batch_of_one)


def inline_weight_identities(proto) -> None:
    """torch's TorchScript exporter shares equal weights through `Identity` nodes (every zero bias of an untrained
    ResNet, say); onnx2torch reads a convolution's weights only from initializers. Each such Identity becomes a
    copy of its weight under the Identity's output name."""
    weights = {w.name: w for w in proto.graph.initializer}
    shared = [n for n in proto.graph.node if n.op_type == "Identity" and n.input and n.input[0] in weights]
    graph_outputs = {o.name for o in proto.graph.output}
    for node in shared:
        if node.output[0] in graph_outputs:
            continue
        copy = proto.graph.initializer.add()
        copy.CopyFrom(weights[node.input[0]])
        copy.name = node.output[0]
        proto.graph.node.remove(node)


def _softmax_on_channels(node, spec: ImportSpec) -> bool:
    if node.op_type != "Softmax":
        return True
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axis in ((1, -3) if spec.output.layout == "nchw" else (3, -1))


def check_onnx_input(proto, spec: ImportSpec, path: Path) -> tuple[str, bool]:
    """The graph's one image input, checked against the sidecar's layout and size; and whether its batch axis is
    fixed at one."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelImportError(f"{path}: expected one image input, the graph has {[i.name for i in inputs]}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, check_input_dims(dims, spec, path, f"input {inputs[0].name!r}")


def check_input_dims(dims: list[int | None], spec: ImportSpec, path: Path, what: str) -> bool:
    """Static input sizes against the sidecar's layout and size; True when the batch axis is fixed at one."""
    if len(dims) != 4:
        raise ModelImportError(f"{path}: {what} has shape {dims}: not an image batch (N, C, H, W or N, H, W, C)")
    channel, spatial = (dims[1], dims[2:]) if spec.input.layout == "nchw" else (dims[3], dims[1:3])
    if channel not in (3, None):
        raise ModelImportError(f"{path}: {what} has shape {dims}: with input.layout {spec.input.layout!r} that is "
                               f"{channel} channels, not 3 (check input.layout)")
    if all(spatial) and not spec.input.fixed_size:
        raise ModelImportError(f"{path}: {what} takes only {spatial[0]}x{spatial[1]} images: set "
                               f"input.fixed_size: true")
    if all(spatial) and tuple(spatial) != tuple(spec.input.size):
        raise ModelImportError(f"{path}: {what} takes {spatial[0]}x{spatial[1]} images, input.size says "
                               f"{spec.input.size[0]}x{spec.input.size[1]}")
    return dims[0] == 1


def onnx_output_name(proto, spec: ImportSpec, path: Path) -> str:
    names = [o.name for o in proto.graph.output]
    if spec.output.name is not None:
        if spec.output.name not in names:
            raise ModelImportError(f"{path}: output.name {spec.output.name!r} is not among the graph's outputs {names}")
        return spec.output.name
    if spec.output.index >= len(names):
        raise ModelImportError(f"{path}: output.index {spec.output.index} but the graph has {len(names)} outputs "
                               f"{names}")
    return names[spec.output.index]


def extract_graph(proto, input_name: str, output_name: str, path: Path):
    """The part of the graph from the image to the chosen output (ONNX's own extractor), shapes inferred."""
    import onnx
    from onnx.utils import Extractor

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        return Extractor(inferred).extract_model([input_name], [output_name])
    except Exception as exc:
        raise ModelImportError(f"{path}: cannot cut the graph to output {output_name!r}: {str(exc)[:300]}") from exc


def convert_onnx(payload: bytes, label: str) -> nn.Module:
    import onnx
    import onnx2torch

    import segmenters.importing.onnx_ops  # noqa: F401  (registers the opset-18 converters)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return onnx2torch.convert(onnx.load_from_string(payload)).eval()
    except KeyError as exc:  # a tensor onnx2torch wanted as a stored weight is computed in the graph
        raise ModelImportError(f"{label}: onnx2torch cannot convert the graph: tensor {exc} must be a stored "
                               f"weight (an initializer) but is computed by a node") from exc
    except Exception as exc:  # onnx2torch names the operator and version it lacks
        raise ModelImportError(f"{label}: onnx2torch cannot convert the graph: {str(exc)[:400]}") from exc


def rebuild_network(record: dict) -> tuple[nn.Module, ImportSpec]:
    """A checkpoint's import record -> the wrapped network (weights to be loaded by the caller) and its sidecar."""
    from segmenters.importing.adapter import ImportedNetwork

    spec = ImportSpec.model_validate_json(record["import_spec"])
    payload = record["payload"].numpy().tobytes() if record.get("payload") is not None else None
    fmt = record["format"]
    if fmt == "onnx":
        network = convert_onnx(payload, label="checkpoint")
    elif fmt == "python":
        network = build_factory(record["factory"], json.loads(record["factory_kwargs"]))
    else:
        network = _torch_network(fmt, payload, label="checkpoint")
    wrapped = ImportedNetwork(network, spec, record["output_index"], record["output_kind"],
                              bool(record.get("batch_of_one", False)))
    return wrapped.eval(), spec


def sample_output_channels(network: nn.Module, spec: ImportSpec) -> int:
    """Run a grey image through the wrapped network's inner model and count the segmentation output's channels."""
    height, width = spec.input.size
    image = torch.full((1, 3, height, width), 0.5)
    with torch.no_grad():
        output = network._select(network.network(network._network_input(image)))
    return int(output.shape[1] if spec.output.layout == "nchw" else output.shape[-1])

