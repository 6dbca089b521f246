"""torch -> ONNX export with named taps, metadata and a parity check."""

from .onnx import (
    FORMAT,
    INPUT_NAME,
    LOGITS_NAME,
    METADATA_KEY,
    ExportReport,
    NormalizedModel,
    ParityError,
    TapWrapper,
    build_foreign_model,
    default_penultimate,
    export_onnx,
    read_metadata,
)

__all__ = [
    "FORMAT", "INPUT_NAME", "LOGITS_NAME", "METADATA_KEY", "ExportReport", "NormalizedModel", "ParityError",
    "TapWrapper", "build_foreign_model", "default_penultimate", "export_onnx", "read_metadata",
]
