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
- :func:`build_tiny_family` — the architecture matrix (``tests/test_architectures.py``):
  one tiny model per family optimum-onnx exports (:data:`ARCH_FAMILIES`: Llama, Mistral,
  Qwen2, Gemma 2/3, Phi-3, OPT, GPT-2, BERT, RoBERTa, DistilBERT, ViT; decoders also with
  their KV cache), hidden 64, 2 layers, vocabulary 256, 64 positions, random norms and
  biases, and planted outlier channels (:func:`plant_family_outliers`).
- :func:`random_feeds` — ragged batch-1 feeds whose names and dtypes are read from the
  exported model (KV-cache inputs and ViT pixels included).

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


def _save_and_export(model, out_dir: str | Path, task: str | None = None) -> Path:
    from outlierquant.export import export_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="synthetic-hf-") as scratch:
        model.save_pretrained(scratch)
        return export_model(scratch, out_dir, task=task, past=False)


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
    past_len: int = 3,
) -> list[dict[str, np.ndarray]]:
    """``n`` batch-1 feeds with ragged lengths cycling through ``seq_lens``.

    Input names and dtypes are read from the model: ``input_ids`` random below
    ``vocab_size``, ``attention_mask`` ones, ``position_ids`` ``arange``,
    ``token_type_ids`` zeros. A with-past decoder's ``past_key_values.*`` get
    ``past_len`` random cached positions (their static head count and head size come from
    the model), and the mask and positions cover them; ``pixel_values`` (ViT) are
    standard-normal images of the size and channel count in the ``config.json`` beside
    the model. Any other input raises ``ValueError``.
    """
    import json

    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    initializer_names = {init.name for init in proto.graph.initializer}
    inputs = [item for item in proto.graph.input if item.name not in initializer_names]
    has_past = any(item.name.startswith("past_key_values.") for item in inputs)
    past = past_len if has_past else 0
    config_path = Path(model_path).parent / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
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
                array = np.ones((1, past + length))
            elif item.name == "position_ids":
                array = np.arange(past, past + length)[None, :]
            elif item.name == "token_type_ids":
                array = np.zeros((1, length))
            elif item.name.startswith("past_key_values."):
                dims = item.type.tensor_type.shape.dim
                if len(dims) != 4 or not (dims[1].HasField("dim_value") and dims[3].HasField("dim_value")):
                    raise ValueError(f"{model_path}: past input {item.name!r} has no static heads/head size")
                array = rng.standard_normal((1, dims[1].dim_value, past, dims[3].dim_value))
            elif item.name == "pixel_values":
                size = int(config.get("image_size", 32))
                array = rng.standard_normal((1, int(config.get("num_channels", 3)), size, size))
            else:
                raise ValueError(f"{model_path}: no rule to feed input {item.name!r}")
            feed[item.name] = array.astype(dtype)
        feeds.append(feed)
    return feeds


# --------------------------------------------------------------------------------------
# The architecture matrix (tests/test_architectures.py): one tiny synthetic model per
# family that optimum-onnx exports, with planted outlier channels.
# --------------------------------------------------------------------------------------

ARCH_HIDDEN = 64
ARCH_LAYERS = 2
ARCH_HEADS = 4
ARCH_KV_HEADS = 2
ARCH_VOCAB = 256
ARCH_POSITIONS = 64
ARCH_IMAGE = 32  # ViT: 32x32 pixels in 8x8 patches -> 16 patches + [CLS]
ARCH_PATCH = 8
PLANT_CHANNELS = (3, 17)
PLANT_FACTOR = 20.0


def _decoder_settings(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = dict(
        vocab_size=ARCH_VOCAB,
        hidden_size=ARCH_HIDDEN,
        intermediate_size=2 * ARCH_HIDDEN,
        num_hidden_layers=ARCH_LAYERS,
        num_attention_heads=ARCH_HEADS,
        num_key_value_heads=ARCH_KV_HEADS,
        max_position_embeddings=ARCH_POSITIONS,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return settings


def _family_model(family: str):
    """The randomly initialised Hugging Face model of ``family`` (see :data:`ARCH_FAMILIES`)."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder_settings()))
    if family == "mistral":  # a window shorter than the test sequences, so it masks something
        return tf.MistralForCausalLM(tf.MistralConfig(**_decoder_settings(sliding_window=8)))
    if family == "qwen2":  # q/k/v with bias
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_decoder_settings()))
    if family == "gemma2":  # sandwich norms, GeGLU, attention and final logit soft-capping, tied lm_head,
        # heads x head_dim (4 x 32) wider than the stream (64), as in Gemma 2 2B (8 x 256 vs 2304)
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**_decoder_settings(
            head_dim=32, query_pre_attn_scalar=32, sliding_window=8, tie_word_embeddings=True,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, attn_implementation="eager")))
    if family == "gemma3":  # sandwich norms, GeGLU, q/k RMSNorm, local/global layers, tied lm_head,
        # one kv head (multi-query) of 32 channels, 4 x 32 query channels, as in Gemma 3 1B
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_decoder_settings(
            head_dim=32, query_pre_attn_scalar=32, num_key_value_heads=1, sliding_window=8, tie_word_embeddings=True,
            layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")))
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3ForCausalLM(tf.Phi3Config(**_decoder_settings(pad_token_id=0)))
    if family == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(
            vocab_size=ARCH_VOCAB, hidden_size=ARCH_HIDDEN, word_embed_proj_dim=ARCH_HIDDEN,
            ffn_dim=2 * ARCH_HIDDEN, num_hidden_layers=ARCH_LAYERS, num_attention_heads=ARCH_HEADS,
            max_position_embeddings=ARCH_POSITIONS, do_layer_norm_before=True, activation_function="relu",
            enable_bias=True, pad_token_id=1))
    if family == "gpt2":  # Conv1D layers, fused c_attn
        return tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=ARCH_VOCAB, n_embd=ARCH_HIDDEN, n_layer=ARCH_LAYERS, n_head=ARCH_HEADS,
            n_positions=ARCH_POSITIONS, n_inner=2 * ARCH_HIDDEN, attn_implementation="eager"))
    encoder = dict(vocab_size=ARCH_VOCAB, hidden_size=ARCH_HIDDEN, num_hidden_layers=ARCH_LAYERS,
                   num_attention_heads=ARCH_HEADS, intermediate_size=2 * ARCH_HIDDEN,
                   max_position_embeddings=ARCH_POSITIONS)
    if family == "bert":
        return tf.BertModel(tf.BertConfig(**encoder, architectures=["BertModel"]), add_pooling_layer=False)
    if family == "roberta":
        return tf.RobertaModel(tf.RobertaConfig(**encoder, architectures=["RobertaModel"], pad_token_id=1),
                               add_pooling_layer=False)
    if family == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(
            vocab_size=ARCH_VOCAB, dim=ARCH_HIDDEN, n_layers=ARCH_LAYERS, n_heads=ARCH_HEADS,
            hidden_dim=2 * ARCH_HIDDEN, max_position_embeddings=ARCH_POSITIONS, architectures=["DistilBertModel"]))
    if family == "vit":
        return tf.ViTModel(tf.ViTConfig(
            hidden_size=ARCH_HIDDEN, num_hidden_layers=ARCH_LAYERS, num_attention_heads=ARCH_HEADS,
            intermediate_size=2 * ARCH_HIDDEN, image_size=ARCH_IMAGE, patch_size=ARCH_PATCH,
            architectures=["ViTModel"]), add_pooling_layer=False)
    raise ValueError(f"unknown family {family!r} (known: {', '.join(ARCH_FAMILIES)})")


#: family -> (decoder, where the outliers are planted)
ARCH_FAMILIES: dict[str, tuple[bool, str]] = {
    "llama": (True, "pre-norm RMSNorm γ"),
    "mistral": (True, "pre-norm RMSNorm γ"),
    "qwen2": (True, "pre-norm RMSNorm γ"),
    "gemma2": (True, "pre-branch RMSNorm (1 + w)"),
    "gemma3": (True, "pre-branch RMSNorm (1 + w)"),
    "phi3": (True, "pre-norm RMSNorm γ"),
    "opt": (True, "pre-norm LayerNorm γ, β"),
    "gpt2": (True, "pre-norm LayerNorm γ, β"),
    "bert": (False, "V → O"),
    "roberta": (False, "V → O"),
    "distilbert": (False, "V → O"),
    "vit": (False, "pre-norm LayerNorm γ, β"),
}


def _norm_pairs(family: str, model) -> list[tuple[Any, list[tuple[Any, bool]], bool]]:
    """(norm, [(linear, weight is [in, out])], γ stored as 1 + w) for every pre-branch norm."""
    pairs = []
    if family in ("llama", "mistral", "qwen2", "phi3", "gemma2", "gemma3"):
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            qkv = [attention.qkv_proj] if family == "phi3" else [attention.q_proj, attention.k_proj, attention.v_proj]
            gate_up = [mlp.gate_up_proj] if family == "phi3" else [mlp.gate_proj, mlp.up_proj]
            ffn_norm = layer.pre_feedforward_layernorm if family.startswith("gemma") else layer.post_attention_layernorm
            gemma = family.startswith("gemma")
            pairs.append((layer.input_layernorm, [(linear, False) for linear in qkv], gemma))
            pairs.append((ffn_norm, [(linear, False) for linear in gate_up], gemma))
    elif family == "opt":
        for layer in model.model.decoder.layers:
            attention = layer.self_attn
            pairs.append((layer.self_attn_layer_norm,
                          [(attention.q_proj, False), (attention.k_proj, False), (attention.v_proj, False)], False))
            pairs.append((layer.final_layer_norm, [(layer.fc1, False)], False))
    elif family == "gpt2":
        for block in model.transformer.h:
            pairs.append((block.ln_1, [(block.attn.c_attn, True)], False))
            pairs.append((block.ln_2, [(block.mlp.c_fc, True)], False))
    elif family == "vit":
        for layer in model.encoder.layer:
            attention = layer.attention.attention
            pairs.append((layer.layernorm_before,
                          [(attention.query, False), (attention.key, False), (attention.value, False)], False))
            pairs.append((layer.layernorm_after, [(layer.intermediate.dense, False)], False))
    return pairs


def _value_output_pairs(family: str, model) -> list[tuple[Any, Any]]:
    if family in ("bert", "roberta"):
        layers = model.encoder.layer
        return [(layer.attention.self.value, layer.attention.output.dense) for layer in layers]
    if family == "distilbert":
        return [(layer.attention.v_lin, layer.attention.out_lin) for layer in model.transformer.layer]
    return []


def plant_family_outliers(family: str, model, channels: Sequence[int] = PLANT_CHANNELS,
                          factor: float = PLANT_FACTOR) -> None:
    """Plant outlier channels into ``model`` (of ``family``) without changing its function.

    Pre-branch norms (every decoder, ViT): channel ``c`` of the norm's affine output is
    multiplied by ``factor`` (γ and β; Gemma's ``1 + w`` as a whole) and row ``c`` of the
    following linears' ``[in, out]`` weight divided by it — the :func:`plant_outliers`
    identity. A post-norm encoder's norm output also feeds the residual sum, so it is not
    scaled there; its V projection's output channel ``c`` (weight row and bias) is
    multiplied instead and O's input channel ``c`` divided: ``probs @ (V·f) = (probs @ V)·f``.
    """
    import torch

    index = torch.as_tensor(list(channels), dtype=torch.long)
    with torch.no_grad():
        for norm, linears, one_plus in _norm_pairs(family, model):
            if one_plus:
                norm.weight[index] = (1.0 + norm.weight[index]) * factor - 1.0
            else:
                norm.weight[index] *= factor
                if getattr(norm, "bias", None) is not None:
                    norm.bias[index] *= factor
            for linear, in_out in linears:
                if in_out:
                    linear.weight[index, :] /= factor
                else:
                    linear.weight[:, index] /= factor
        for value, output in _value_output_pairs(family, model):
            value.weight[index, :] *= factor
            if value.bias is not None:
                value.bias[index] *= factor
            output.weight[:, index] /= factor


def _randomise_norm_modules(model, seed: int, one_plus: bool = False) -> None:
    """Random γ in [0.5, 1.5] and β ~ 0.1·N(0, 1) for every norm module, found by class
    (GPT-2's ``ln_1`` has no "norm" in its name). ``one_plus``: γ is stored as ``1 + w``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "norm" not in type(module).__name__.lower():
                continue
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, torch.nn.Parameter) and weight.ndim == 1:
                gamma = 0.5 + torch.rand(weight.shape, generator=generator)
                weight.copy_(gamma - 1.0 if one_plus else gamma)
            if isinstance(bias, torch.nn.Parameter) and bias.ndim == 1:
                bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))


def build_tiny_family(family: str, out_dir: str | Path, *, with_past: bool = False, seed: int = 0,
                      plant: bool = True) -> Path:
    """Export the synthetic tiny model of ``family`` (``ARCH_FAMILIES``) with planted outliers.

    Hidden 64, 2 layers, 4 heads (2 KV heads where the family has GQA; Gemma: heads of 32,
    Gemma 3 one KV head), vocabulary 256, 64 positions. Decoders export for ``text-generation`` (``with_past``:
    ``text-generation-with-past``, the KV-cache inputs and ``present`` outputs), encoders
    for ``feature-extraction``. Returns ``model.onnx``.
    """
    decoder = ARCH_FAMILIES[family][0]
    if with_past and not decoder:
        raise ValueError(f"{family} is an encoder: no with-past variant")
    _seeded(seed)
    model = _family_model(family)
    _randomise_biases(model, seed)
    _randomise_norm_modules(model, seed, one_plus=family.startswith("gemma"))
    if plant:
        plant_family_outliers(family, model)
    task = None
    if decoder:
        task = "text-generation-with-past" if with_past else "text-generation"
    return _save_and_export(model, out_dir, task=task)
