"""Emit layer: the op forms passes write (the one Q/DQ writer, fake quantization, weight formats, rotation forms, mixed-int8 forms). Imports graph and numerics; see docs/architecture.md."""
