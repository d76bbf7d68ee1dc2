"""What a model argument is, and output folders that optimum's ``ORTModelFor*`` classes load.

``quantize -m MODEL OUTPUT_DIR`` takes any of: an ``.onnx`` file, an exported folder
(``model.onnx`` inside), a Hugging Face folder (``config.json``), a ``.gguf`` file, or
(online) a hub id. :func:`resolve_source` says which, before any work, with one line
naming what to do when it is none of them.

An output *folder* holds ``model.onnx`` (+ ``model.onnx.data``), ``model.report.json``,
the model's side files (config, generation config, tokenizer, and a sentence-transformers
folder's module files) and an ``ort_config.json`` in the shape of optimum's ``ORTConfig``
whose ``outlierquant`` entry records the quantization: recipe, bits, real or simulated,
whether our kernels are needed, the graph's inputs and outputs and the ``ORTModelFor*``
class that loads it. So ``ORTModelForCausalLM.from_pretrained(OUTPUT_DIR)`` (or
``ORTModelForFeatureExtraction``, or ``SentenceTransformer(OUTPUT_DIR, backend="onnx")``)
works on the folder as it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from outlierquant.errors import InputError, require_extra

#: files copied beside a quantized model so tokenizers and the ORTModel classes find them
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "chat_template.jinja",
    # sentence-transformers: the module list and the pooling/normalize modules' folders
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)

ORT_CONFIG = "ort_config.json"

#: what ``quantize`` and ``export`` accept as MODEL, for the error lines
ACCEPTED = "an .onnx file, an exported folder (model.onnx), a Hugging Face folder (config.json), a .gguf file or a hub id"


@dataclasses.dataclass(frozen=True)
class Source:
    """A model argument, classified.

    ``kind``: ``onnx`` (a file, or a folder's ``model.onnx``: :attr:`onnx` is set) or one
    that needs an export first: ``hf-folder``, ``gguf``, ``hub``.
    """

    text: str
    kind: str
    path: Path | None = None
    onnx: Path | None = None

    @property
    def needs_export(self) -> bool:
        return self.onnx is None

    def check_export_extras(self) -> None:
        """Before any work: the ``[export]`` extra (and gguf for a .gguf file) is installed."""
        if not self.needs_export:
            return
        what = {"hf-folder": "a Hugging Face folder", "gguf": "a .gguf file", "hub": "a hub id"}[self.kind]
        require_extra(f"{self.text}: exporting {what}", "export",
                      modules=("gguf",) if self.kind == "gguf" else ())


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and "\\" not in text


def resolve_source(model: str | os.PathLike) -> Source:
    """Classify ``model``; one clear :class:`InputError` when it is none of :data:`ACCEPTED`."""
    text = os.fspath(model)
    path = Path(text)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return Source(text, "onnx", path, path / "model.onnx")
        if (path / "config.json").is_file():
            return Source(text, "hf-folder", path)
        others = sorted(p.name for p in path.glob("*.onnx"))
        if others:
            raise InputError(f"{path}: a folder without model.onnx (it has {', '.join(others[:3])}); "
                             f"pass the file: -m {path / others[0]}")
        raise InputError(f"{path}: a folder without model.onnx or config.json; expected {ACCEPTED}")
    if path.is_file():
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic == b"GGUF":
            return Source(text, "gguf", path)
        if path.suffix.lower() == ".gguf":
            raise InputError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        if path.suffix.lower() != ".onnx":
            raise InputError(f"{path}: not an .onnx or .gguf file; expected {ACCEPTED}")
        return Source(text, "onnx", path, path)
    if path.suffix.lower() in (".onnx", ".gguf") or not _looks_like_hub_id(text):
        raise InputError(f"{path}: no such file or folder")
    return Source(text, "hub")


def check_export_options(source: Source, *, task: str | None, library_name: str | None, no_past: bool,
                         opset: int | None, library_given: bool = True) -> None:
    """Export options make sense only when the model is exported first."""
    if not source.needs_export:
        given = [flag for flag, value in (("--task", task), ("--library-name", library_name if library_given else None),
                                          ("--no-past", no_past), ("--opset", opset)) if value]
        if given:
            raise InputError(f"{source.text}: is already ONNX; {given[0]} applies only to a model that is exported "
                             "first (a Hugging Face folder, a .gguf file or a hub id)")
    if no_past and (task or "").endswith("-with-past"):
        raise InputError(f"--no-past contradicts --task {task}")


# -- output folders ------------------------------------------------------------------


def side_files(folder: Path) -> list[Path]:
    """The side files (:data:`SIDE_FILES`) present in ``folder``."""
    return [folder / name for name in SIDE_FILES if (folder / name).is_file()]


def module_folders(folder: Path) -> list[Path]:
    """A sentence-transformers folder's module folders (``1_Pooling``, ``2_Normalize``)."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    found = []
    for module in modules if isinstance(modules, list) else []:
        sub = module.get("path") if isinstance(module, dict) else None
        if isinstance(sub, str) and sub and not os.path.isabs(sub) and ".." not in Path(sub).parts \
                and (folder / sub).is_dir():
            found.append(folder / sub)
    return found


def folder_targets(output_dir: Path, source_folder: Path | None) -> list[Path]:
    """Every file a folder output may write besides the model, for the check before any work."""
    names = [ORT_CONFIG]
    if source_folder is not None:
        names += [p.name for p in side_files(source_folder)]
        for module in module_folders(source_folder):
            names += [str(f.relative_to(source_folder)) for f in module.rglob("*") if f.is_file()]
    return [output_dir / name for name in names]


def folder_inputs(source_folder: Path | None) -> list[Path]:
    """The side files an output folder copies: inputs that no output may overwrite."""
    if source_folder is None:
        return []
    files = side_files(source_folder)
    for module in module_folders(source_folder):
        files += [f for f in module.rglob("*") if f.is_file()]
    return files


def _header(path: Path) -> tuple[list[str], list[str], int | None, bool]:
    import onnx

    from outlierquant.custom_ops import DOMAIN

    proto = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [value.name for value in proto.graph.input if value.name not in initializers]
    outputs = [value.name for value in proto.graph.output]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return inputs, outputs, opset, any(o.domain == DOMAIN for o in proto.opset_import)


#: config architecture suffix -> the ORTModel class for a ``logits`` output
_LOGITS_CLASSES = (
    ("ForMaskedLM", "ORTModelForMaskedLM"),
    ("ForSequenceClassification", "ORTModelForSequenceClassification"),
    ("ForTokenClassification", "ORTModelForTokenClassification"),
    ("ForImageClassification", "ORTModelForImageClassification"),
    ("ForCausalLM", "ORTModelForCausalLM"),
)


def ort_model_class(inputs: list[str], outputs: list[str], config: dict[str, Any] | None) -> str | None:
    """The optimum ``ORTModelFor*`` class that runs a graph with these inputs and outputs."""
    if "logits" in outputs and ("position_ids" in inputs or any(n.startswith("past_key_values") for n in inputs)):
        return "ORTModelForCausalLM"
    if "last_hidden_state" in outputs:
        return "ORTModelForFeatureExtraction"
    if "start_logits" in outputs and "end_logits" in outputs:
        return "ORTModelForQuestionAnswering"
    if "logits" in outputs:
        for architecture in (config or {}).get("architectures") or []:
            for suffix, cls in _LOGITS_CLASSES:
                if str(architecture).endswith(suffix):
                    return cls
    return None


def deployment_record(model_path: Path, config_folder: Path | None) -> dict[str, Any]:
    """How the quantized model loads: its inputs/outputs, the ORTModel class, our kernels."""
    inputs, outputs, opset, kernels = _header(model_path)
    config = None
    if config_folder is not None and (config_folder / "config.json").is_file():
        try:
            config = json.loads((config_folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None
    cls = ort_model_class(inputs, outputs, config)
    record: dict[str, Any] = {"inputs": inputs, "outputs": outputs, "opset": opset, "ort_model_class": cls,
                              "needs_outlierquant_kernels": kernels}
    if cls is None and {"token_embeddings", "sentence_embedding"} & set(outputs):
        record["note"] = ("a sentence-transformers export (outputs token_embeddings/sentence_embedding): "
                          "run it with onnxruntime; ORTModelForFeatureExtraction and sentence-transformers' "
                          "ONNX backend read last_hidden_state (export with --library-name transformers)")
    return record


def folder_files_hook(source_folder: Path | None, recipe) -> Callable[[dict[str, Any], Callable[[str], Path]], None]:
    """For :func:`~outlierquant.pipeline.quantize_model`: writes the side files and
    ``ort_config.json`` into the output unit, and records the deployment in the report."""
    from outlierquant.recipes.summary import summarize

    def write(report: dict[str, Any], staged: Callable[[str], Path]) -> None:
        model_path = staged(Path(report["output"]).name)
        deployment = deployment_record(model_path, source_folder)
        report["deployment"] = deployment
        for path in side_files(source_folder) if source_folder is not None else []:
            shutil.copyfile(path, staged(path.name))
        summary = summarize(recipe)
        data_file = Path(report["output"]).name + ".data"
        ort_config = {
            "opset": deployment["opset"],
            "use_external_data_format": staged(data_file).exists(),
            "one_external_file": True,
            "optimization": {},
            "quantization": {},
            "outlierquant": {
                "version": report.get("outlierquant_version"),
                "recipe": recipe.name,
                "method": summary.method,
                "bits": summary.bits,
                "simulated": report.get("simulated", False),
                "execution": "simulated" if report.get("simulated") else "real",
                "report": Path(report["output"]).stem + ".report.json",
                "calibration_samples": report.get("calibration_samples"),
                **deployment,
            },
        }
        staged(ORT_CONFIG).write_text(json.dumps(ort_config, indent=2) + "\n", encoding="utf-8")

    return write


def copy_module_folders(source_folder: Path | None, output_dir: Path) -> None:
    """After the model is in place: a sentence-transformers folder's module folders."""
    if source_folder is None or source_folder.resolve() == output_dir.resolve():
        return
    for module in module_folders(source_folder):
        for file in module.rglob("*"):
            if file.is_file():
                target = output_dir / file.relative_to(source_folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                staged = target.with_name(f".{target.name}.tmp-{os.getpid()}")
                shutil.copyfile(file, staged)
                os.replace(staged, target)


def loading_hint(report: dict[str, Any], output_dir: Path) -> str | None:
    """One line: how to load the folder."""
    deployment = report.get("deployment") or {}
    cls = deployment.get("ort_model_class")
    if cls is None:
        return deployment.get("note")
    options = ", session_options=outlierquant.custom_ops.session_options()" \
        if deployment.get("needs_outlierquant_kernels") else ""
    return f"load it with optimum.onnxruntime.{cls}.from_pretrained({str(output_dir)!r}{options})"
