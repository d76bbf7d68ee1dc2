"""Numerics layer: numpy only — quantization grids, rounding, error estimates, Hadamard constructions, outlier selection. Nothing here knows about ONNX; see docs/architecture.md."""
