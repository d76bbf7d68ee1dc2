"""Which form of an op to write: our onnxruntime kernel, or its standard-op equivalent."""

from __future__ import annotations


def use_kernel(kernels: str) -> bool:
    """The ``kernels`` option every pass shares: ``standard`` writes standard ops; ``custom``
    writes our kernel and fails when the library does not load; ``auto`` writes the kernel
    when it loads and standard ops otherwise (warning once)."""
    from outlierquant import custom_ops  # loads onnxruntime: only when a pass asks

    if kernels == "standard":
        return False
    if custom_ops.available():
        return True
    if kernels == "custom":
        raise custom_ops.KernelsUnavailableError(custom_ops.unavailable_reason())
    custom_ops.warn_once_unavailable()
    return False
