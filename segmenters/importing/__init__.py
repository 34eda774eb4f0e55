"""Networks trained elsewhere, as twins: a YAML sidecar (`spec`), loaders and converters per file format
(`sources`, `onnx_ops`, `tflite`), and the adapter that puts them behind the zoo's contract (`adapter`). The gate
that decides whether an import is kept is `export.imports`."""
