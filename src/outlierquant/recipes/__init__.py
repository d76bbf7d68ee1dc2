"""Recipes: an ordered list of passes with their typed options.

A recipe is YAML::

    name: w8a8
    description: ...
    passes:
      - quantize: {activations: static, activation_type: uint8}

Passes are found through :data:`PASS_CATALOG` (name -> "module:Class"), so loading a
recipe imports only the passes it uses. Each pass with options declares a frozen
dataclass ``options_type``; unknown fields and bad values are rejected with an error that
names the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from outlierquant.errors import RecipeError
from outlierquant.options import check_value

#: pass name -> "module:Class". Static, so the CLI does not import every pass.
PASS_CATALOG: dict[str, str] = {
    "canonicalize": "outlierquant.passes.canonicalize:CanonicalizePass",
    "tie-weights": "outlierquant.passes.canonicalize:TieWeightsPass",
    "quantize": "outlierquant.passes.quantize:QuantizeQDQPass",
    "smoothquant": "outlierquant.passes.smooth:SmoothQuantPass",
    "os+": "outlierquant.passes.shift:ShiftScaleOutliersPass",
    "outliertune": "outlierquant.passes.outliertune:QuantizeOutlierTunePass",
    "reparameterize": "outlierquant.passes.reparameterize:ReparameterizeScalesPass",
    "rotate-residual": "outlierquant.passes.rotate_residual:RotateResidualPass",
    "rotate-heads": "outlierquant.passes.rotate_heads:RotateHeadsPass",
    "online-hadamard": "outlierquant.passes.online_hadamard:OnlineHadamardPass",
    "rotate-qk": "outlierquant.passes.rotate_qk:RotateQueryKeyPass",
    "simulate-quant": "outlierquant.passes.simulate:SimulateQuantizationPass",
    "flatquant": "outlierquant.passes.flatquant:FlatQuantPass",
    "llm-int8": "outlierquant.passes.llm_int8:LlmInt8SplitPass",
    "splitquant": "outlierquant.passes.splitquant:SplitQuantPass",
    "qllm-disassemble": "outlierquant.passes.disassemble:DisassembleChannelsPass",
    "adadim": "outlierquant.passes.weight_rounding:AdaDimQuantizePass",
    "quantease": "outlierquant.passes.weight_rounding:QuantEaseRoundPass",
    "weight-only": "outlierquant.passes.weight_only:QuantizeWeightOnlyPass",
    "olive": "outlierquant.passes.olive:OlivePass",
    "quantize-embeddings": "outlierquant.passes.embeddings:QuantizeEmbeddingsPass",
    "format-quantize": "outlierquant.passes.formats:QuantizeFormatPass",
    "simplify-shapes": "outlierquant.passes.simplify_shapes:SimplifyShapesPass",
    "llm-fp4": "outlierquant.passes.llm_fp4:LlmFp4Pass",
    "kv-quantize": "outlierquant.passes.kv_cache:KVCacheQuantizePass",
    "onnxruntime-fuse": "outlierquant.passes.fuse_ort:FuseOnnxRuntimePass",
    "merge-linears": "outlierquant.passes.merge_linears:MergeLinearsPass",
}


#: earlier spellings, still read (with a FutureWarning) so existing YAML keeps working.
#: Pass keys are kebab-case; ``kernels`` is auto | standard | custom everywhere; a weight
#: group is a ``group_size``; ``exclude`` takes node-name substrings or fnmatch patterns.
PASS_ALIASES: dict[str, str] = {"llm_int8": "llm-int8", "qllm_disassemble": "qllm-disassemble",
                                "weight_only": "weight-only"}
OPTION_ALIASES: dict[str, str] = {"block_size": "group_size", "exclude_nodes": "exclude"}
VALUE_ALIASES: dict[str, dict[Any, Any]] = {"kernels": {"always": "custom", "never": "standard"}}


def _deprecated(source: str, old: str, new: str) -> None:
    warnings.warn(f"{source}: {old} is deprecated, write {new}", FutureWarning, stacklevel=4)


def canonical_pass_name(name: str, *, source: str = "recipe") -> str:
    if name in PASS_ALIASES:
        _deprecated(source, f"pass {name!r}", repr(PASS_ALIASES[name]))
        return PASS_ALIASES[name]
    return name


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)

    def to_dict(self) -> dict[str, Any]:
        return {self.name: self.options_dict()} if self.options else {self.name: {}}


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[PassSpec, ...]
    description: str = ""
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "passes": [spec.to_dict() for spec in self.passes],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with 'name' and 'passes'")
        allowed = {"name", "version", "description", "passes"}
        unknown = set(data) - allowed
        if unknown:
            first = sorted(unknown, key=repr)[0]  # keys may be None or numbers beside strings
            raise RecipeError(f"{source}: unknown field {first!r} (allowed: {', '.join(sorted(allowed))})")
        passes_data = data.get("passes")
        if not isinstance(passes_data, list) or not passes_data:
            raise RecipeError(f"{source}: 'passes' must be a non-empty list")
        specs = []
        for i, entry in enumerate(passes_data):
            if isinstance(entry, str):
                name, options = entry, {}
            elif isinstance(entry, dict) and len(entry) == 1:
                name, options = next(iter(entry.items()))
                options = options or {}
            else:
                raise RecipeError(f"{source}: passes[{i}] must be a pass name or a one-key mapping")
            if not isinstance(options, dict):
                raise RecipeError(f"{source}: options of pass {name!r} must be a mapping")
            specs.append(validate_pass_options(canonical_pass_name(name, source=source), options, source=source))
        return cls(
            name=str(data.get("name") or source),
            passes=tuple(specs),
            description=str(data.get("description", "")),
            version=int(data.get("version", 1)),
        )


def pass_class(name: str):
    name = PASS_ALIASES.get(name, name)
    if name not in PASS_CATALOG:
        raise RecipeError(f"unknown pass {name!r} (allowed: {', '.join(sorted(PASS_CATALOG))})")
    module_name, class_name = PASS_CATALOG[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _coerce(field: dataclasses.Field, value: Any, hints: dict[str, Any]) -> Any:
    return check_value(hints.get(field.name, field.type), value)


def _wants_sequence(annotation: Any) -> bool:
    """A tuple or list type, or an optional one, where a string would be split into characters."""
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return True
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return bool(args) and all(typing.get_origin(arg) in (tuple, list) for arg in args)
    return False


def validate_pass_options(name: str, options: dict[str, Any], *, source: str = "recipe") -> PassSpec:
    """Check ``options`` against the pass's typed options; return a normalised spec."""
    name = PASS_ALIASES.get(name, name)
    cls = pass_class(name)
    options_type = getattr(cls, "options_type", None)
    if options_type is None:
        if options:
            raise RecipeError(f"{source}: pass {name!r} takes no options (got {', '.join(sorted(options))})")
        return PassSpec(name)
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    hints = typing.get_type_hints(options_type)
    normalised = {}
    for key, value in options.items():
        if key not in fields and OPTION_ALIASES.get(key) in fields:
            _deprecated(source, f"option {key!r} of pass {name!r}", repr(OPTION_ALIASES[key]))
            key = OPTION_ALIASES[key]
        if key in VALUE_ALIASES and value in VALUE_ALIASES[key]:
            _deprecated(source, f"{key}: {value}", f"{key}: {VALUE_ALIASES[key][value]}")
            value = VALUE_ALIASES[key][value]
        if key not in fields:
            raise RecipeError(
                f"{source}: pass {name!r} has no option {key!r} (allowed: {', '.join(sorted(fields))})"
            )
        try:
            normalised[key] = _coerce(fields[key], value, hints)
        except ValueError as exc:
            raise RecipeError(f"{source}: pass {name!r} option {key!r}: {exc}") from None
    try:
        options_type(**normalised)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{source}: pass {name!r}: {exc}") from None
    return PassSpec(name, tuple(sorted(normalised.items())))


def builtin_recipes() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML file."""
    text = None
    source = str(name_or_path)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
        text = path.read_text(encoding="utf-8")
    else:
        resource = resources.files(__package__) / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise RecipeError(f"unknown recipe {source!r} (built-in: {', '.join(builtin_recipes())}; or a .yaml file)")
        text = resource.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: invalid YAML ({str(exc).splitlines()[0]})") from None
    return Recipe.from_dict(data, source=source)


def spec_options(spec: PassSpec) -> Any:
    """The pass's options dataclass for a validated spec (defaults filled in), or ``None``."""
    options_type = getattr(pass_class(spec.name), "options_type", None)
    if options_type is None:
        return None
    hints = typing.get_type_hints(options_type)
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    return options_type(**{k: _coerce(fields[k], v, hints) for k, v in spec.options})


def instantiate(spec: PassSpec):
    """Build the pass object for a validated spec."""
    cls = pass_class(spec.name)
    options = spec_options(spec)
    return cls() if options is None else cls(options)
