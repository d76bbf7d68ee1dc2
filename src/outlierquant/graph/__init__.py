"""Graph layer: reading and editing the onnx_ir graph (values, shapes, analysis, patterns, edits). Imports only onnx_ir, numpy and errors; see docs/architecture.md."""
