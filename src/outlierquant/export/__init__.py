"""Export (model -> fp32 ONNX) and the data readers that feed calibration and evaluation."""

__all__ = ["export_model", "default_model_dir", "smollm2_gguf"]


def __getattr__(name):  # lazy: keeps `import outlierquant` free of torch/transformers
    if name in __all__:
        from outlierquant.export import hf

        return getattr(hf, name)
    raise AttributeError(name)
