"""Tiny **synthetic** models for tests: random weights, built from configs, no downloads.

Every builder here makes a randomly initialised Hugging Face model from a small config
(hidden 64, 2 layers, vocabulary 1000, 4 heads), saves it into a scratch folder and
exports it with :func:`outlierquant.export.export_model` (optimum-onnx). Nothing here
is a real model and no number measured on these models says anything about real
accuracy; they exist to exercise graph structure and equivalence.

- :func:`build_tiny_llama` — Llama: decomposed RMSNorm, SwiGLU, RoPE, GQA (4 heads,
  2 kv heads), no biases.
- :func:`build_tiny_opt` — OPT: pre-norm LayerNorm decoder with biases, ReLU FFN.
- :func:`build_tiny_bert` — BERT encoder: post-norm LayerNorm, GELU FFN.
- :func:`build_planted_llama` — the tiny Llama with **planted outlier channels**
  (:func:`plant_outliers`): the fp32 function is unchanged, but the inputs of q/k/v,
  gate/up and lm_head carry a few channels ``factor`` times larger than the rest, like
  the systematic outlier channels of real LLMs (LLM.int8(), SmoothQuant).
- :func:`random_feeds` — ragged batch-1 feeds whose names and dtypes are read from the
  exported model.

Planting is exact because RMSNorm's γ is a per-channel scale applied *after* the
normalisation: ``RMSNorm_γ(x) @ W = (x / rms(x) · γ) @ W``. Multiplying ``γ_c`` by ``f``
and dividing row ``c`` of every following ``W`` (column ``c`` of a torch ``Linear``
weight) by ``f`` leaves every product unchanged while the norm output — the linears'
input — gets channel ``c`` ``f`` times larger. Scaling the residual stream itself (the
embedding) would not be exact: RMSNorm divides by the rms over all channels, which a
per-channel scale of its input changes.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_VOCAB = 1000
TINY_HEADS = 4


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _randomise_norms(model, seed: int) -> None:
    """Give every norm weight/bias a random, non-trivial value (fresh models have γ=1, β=0)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            lowered = name.lower()
            if "norm" in lowered and parameter.ndim == 1:
                if name.endswith("weight"):
                    parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
                else:
                    parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def _save_and_export(model, out_dir: str | Path) -> Path:
    from outlierquant.export import export_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="synthetic-hf-") as scratch:
        model.save_pretrained(scratch)
        return export_model(scratch, out_dir, past=False)


def tiny_llama_model(seed: int = 0, **overrides: Any):
    """A randomly initialised ``LlamaForCausalLM`` (synthetic), not exported."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=4 * TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    _seeded(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    _randomise_norms(model, seed)
    return model


def build_tiny_llama(out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Export a synthetic tiny Llama (GQA 4/2 heads, SwiGLU, RMSNorm); returns ``model.onnx``."""
    return _save_and_export(tiny_llama_model(seed, **overrides), out_dir)


def tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE tokenizer of ``vocab_size`` entries trained on the bundled sentences
    (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, Llama's special ids), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from outlierquant.export.data import bundled_sentences, read_lines

    texts = read_lines(bundled_sentences("calibration")) + read_lines(bundled_sentences("heldout"))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def build_tiny_llama_past(out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """The synthetic tiny Llama of :func:`build_tiny_llama` exported **with its KV cache**
    (``text-generation-with-past``: ``past_key_values.{0,1}.key/.value`` [batch, 2, past, 16]
    in, ``present.*`` out), with :func:`tiny_tokenizer` saved beside it so that text
    calibration and optimum's ``ORTModelForCausalLM`` work on the folder. Synthetic weights."""
    from outlierquant.export import export_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_llama_model(seed, **overrides)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="synthetic-hf-") as scratch:
        model.save_pretrained(scratch)
        path = export_model(scratch, out_dir, task="text-generation-with-past")
    tiny_tokenizer(model.config.vocab_size).save_pretrained(out_dir)
    return path


def build_tiny_opt(out_dir: str | Path, seed: int = 0) -> Path:
    """Export a synthetic tiny OPT decoder (pre-norm LayerNorm, ReLU FFN, biases)."""
    from transformers import OPTConfig, OPTForCausalLM

    _seeded(seed)
    config = OPTConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        word_embed_proj_dim=TINY_HIDDEN,
        ffn_dim=4 * TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        max_position_embeddings=128,
        do_layer_norm_before=True,
        activation_function="relu",
        enable_bias=True,
    )
    model = OPTForCausalLM(config)
    _randomise_biases(model, seed)
    _randomise_norms(model, seed)
    return _save_and_export(model, out_dir)


def build_tiny_bert(out_dir: str | Path, seed: int = 0) -> Path:
    """Export a synthetic tiny BERT encoder (post-norm LayerNorm, GELU FFN)."""
    from transformers import BertConfig, BertModel

    _seeded(seed)
    config = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        intermediate_size=4 * TINY_HIDDEN,
        max_position_embeddings=128,
        architectures=["BertModel"],
    )
    model = BertModel(config, add_pooling_layer=False)
    _randomise_biases(model, seed)
    _randomise_norms(model, seed)
    return _save_and_export(model, out_dir)


def _randomise_biases(model, seed: int) -> None:
    """Fresh HF models start with zero biases, which would hide bias-handling bugs."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and "norm" not in name.lower():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def plant_outliers(model_dir_or_hf_model, channels: Sequence[int] = (3, 17), factor: float = 50.0):
    """Plant outlier channels into a Llama-family model without changing its function.

    For every decoder layer, ``input_layernorm.weight[c] *= factor`` and column ``c`` of
    the q/k/v projection weights is divided by ``factor``; the same for
    ``post_attention_layernorm`` → gate/up and for the final norm → ``lm_head``. A path
    is loaded with ``AutoModelForCausalLM``, modified and saved back; a model object is
    modified in place. Returns the model. Synthetic: the outliers are planted, not learnt.
    """
    import torch

    if isinstance(model_dir_or_hf_model, (str, Path)):
        from transformers import AutoModelForCausalLM

        folder = Path(model_dir_or_hf_model)
        model = AutoModelForCausalLM.from_pretrained(folder)
    else:
        folder = None
        model = model_dir_or_hf_model
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    index = torch.as_tensor(list(channels), dtype=torch.long)

    def plant(norm, linears) -> None:
        norm.weight[index] *= factor
        for linear in linears:
            linear.weight[:, index] /= factor

    with torch.no_grad():
        decoder = model.model
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            plant(layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj])
            plant(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        if model.lm_head.weight is not decoder.embed_tokens.weight:
            plant(decoder.norm, [model.lm_head])
        else:
            logger.info("lm_head is tied to the embedding: final norm left as is")
    if folder is not None:
        model.save_pretrained(folder)
    logger.info("planted outlier channels %s (x%s) into %d layers", list(channels), factor, len(decoder.layers))
    return model


def build_planted_llama(out_dir: str | Path, factor: float = 50.0, channels: Sequence[int] = (3, 17)) -> Path:
    """Export the synthetic tiny Llama with planted outlier channels (see :func:`plant_outliers`)."""
    model = tiny_llama_model()
    plant_outliers(model, channels=channels, factor=factor)
    return _save_and_export(model, out_dir)


def random_feeds(
    model_path: str | Path,
    n: int,
    seq_lens: Sequence[int] = (5, 9, 16),
    seed: int = 0,
    vocab_size: int = TINY_VOCAB,
) -> list[dict[str, np.ndarray]]:
    """``n`` batch-1 feeds with ragged lengths cycling through ``seq_lens``.

    Input names and integer dtypes are read from the model: ``input_ids`` random below
    ``vocab_size``, ``attention_mask`` ones, ``position_ids`` ``arange``,
    ``token_type_ids`` zeros. Any other input raises ``ValueError``.
    """
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    initializer_names = {init.name for init in proto.graph.initializer}
    inputs = [item for item in proto.graph.input if item.name not in initializer_names]
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        length = int(seq_lens[i % len(seq_lens)])
        feed: dict[str, np.ndarray] = {}
        for item in inputs:
            elem = item.type.tensor_type.elem_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
            if item.name == "input_ids":
                array = rng.integers(0, vocab_size, size=(1, length))
            elif item.name == "attention_mask":
                array = np.ones((1, length))
            elif item.name == "position_ids":
                array = np.arange(length)[None, :]
            elif item.name == "token_type_ids":
                array = np.zeros((1, length))
            else:
                raise ValueError(f"{model_path}: no rule to feed input {item.name!r}")
            feed[item.name] = array.astype(dtype)
        feeds.append(feed)
    return feeds
