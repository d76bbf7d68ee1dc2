"""The pass contract (see ``shared/DESIGN.md``).

A pass is an ``onnx_ir`` pass: it takes the model in the IR and returns
:class:`PassRecordResult` — the model, whether it changed, and a small JSON-serialisable
``record`` of what it did (nodes touched, scales chosen, layers skipped and why). Passes
that need calibration statistics declare ``needs_stats``; the pipeline collects them on
the model *as it is when the pass runs* (an earlier rewrite changes activations) and
hands them over through :attr:`OutlierPass.stats`.

``claims_equivalence`` marks a float rewrite that must leave the fp32 function unchanged;
every such pass has an equivalence test on real and random inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import onnx_ir as ir

from outlierquant.calibration.stats import ActivationStats

logger = logging.getLogger(__name__)


#: metadata key on nodes a pass wrote to stay in float (e.g. the outlier side path of a
#: split): graph analysis does not report them as linears, so no quantizer touches them
KEEP_FLOAT_KEY = "outlierquant.keep_float"


@dataclasses.dataclass
class PassRecordResult(ir.passes.PassResult):
    """``PassResult`` plus what the pass did, for the quantization report."""

    record: dict[str, Any] = dataclasses.field(default_factory=dict)


class OutlierPass(ir.passes.InPlacePass):
    """Base class of outlierquant's rewrites.

    Subclasses implement :meth:`run` and return ``(modified, record)``.
    """

    #: name used in recipes and reports
    name: ClassVar[str] = ""
    #: the pipeline must collect activation statistics before this pass
    needs_stats: ClassVar[bool] = False
    #: the pass reads the calibration samples themselves (e.g. to learn a transform on
    #: captured activations), handed over through :attr:`OutlierPass.feeds`
    needs_feeds: ClassVar[bool] = False
    #: the pass leaves the fp32 function unchanged (tested)
    claims_equivalence: ClassVar[bool] = False
    #: the frozen dataclass of the pass's options (recipes validate against its fields)
    options_type: ClassVar[type | None] = None

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        """``options`` is an ``options_type`` instance, or its fields are given as keywords."""
        super().__init__()
        self.stats: ActivationStats | None = None
        self.feeds: list[dict] | None = None
        if self.options_type is not None:
            self.options = options if options is not None else self.options_type(**kwargs)
        elif options is not None or kwargs:
            raise TypeError(f"{type(self).__name__} takes no options")

    def with_stats(self, stats: ActivationStats | None) -> "OutlierPass":
        self.stats = stats
        return self

    def with_feeds(self, feeds) -> "OutlierPass":
        self.feeds = list(feeds) if feeds is not None else None
        return self

    def require_stats(self) -> ActivationStats:
        if self.stats is None:
            raise RuntimeError(f"pass {self.name or type(self).__name__} needs activation statistics")
        return self.stats

    def covariance_targets(self, model: ir.Model) -> list[str]:
        """The tensors whose full covariance this pass reads (collected with its statistics)."""
        return []

    def calibration_targets(self, model: ir.Model) -> list:
        """The tensors whose statistics this pass reads (default: every linear input)."""
        from outlierquant.calibration.collect import quantizable_targets

        return quantizable_targets(model, outputs=False)

    def call(self, model: ir.Model) -> PassRecordResult:
        modified, record = self.run(model)
        record = {"pass": self.name or type(self).__name__, **record}
        return PassRecordResult(model=model, modified=modified, record=record)

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError


# -- small IR helpers shared by the passes ------------------------------------------------


def constant_array(value: ir.Value | None):
    """The numpy array of a constant value (initializer or Constant node), else None."""
    import numpy as np

    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
        for key in ("value_float", "value_int"):
            if key in producer.attributes:
                return np.array(producer.attributes[key].value)
        for key in ("value_floats", "value_ints"):
            if key in producer.attributes:
                return np.array(producer.attributes[key].value)
    return None


def is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")


def add_initializer(graph: ir.Graph, name_hint: str, array) -> ir.Value:
    """Register ``array`` as a new initializer with a unique name and return its value."""
    name = _unique_name(graph, name_hint)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    return value


def _unique_name(graph: ir.Graph, hint: str) -> str:
    taken = graph.initializers
    if hint not in taken:
        return hint
    i = 1
    while f"{hint}_{i}" in taken:
        i += 1
    return f"{hint}_{i}"


def first_in_graph(graph: ir.Graph, nodes) -> ir.Node:
    """The node of ``nodes`` that comes first in ``graph``'s order (where a group's inserted
    ops go, before every linear that reads them)."""
    wanted = {id(node): node for node in nodes}
    first = None
    for candidate in graph:
        if id(candidate) in wanted:
            first = first or candidate
            del wanted[id(candidate)]
    if first is None or wanted:
        missing = ", ".join(node.name or "?" for node in wanted.values()) or "all of them"
        raise ValueError(f"nodes not in the graph: {missing}")
    return first


def remove_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Drop an initializer no node and no graph output uses any more."""
    if value.name in graph.initializers and not value.uses() and not value.is_graph_output():
        del graph.initializers[value.name]


def set_input_constant(graph: ir.Graph, node: ir.Node, index: int, array, hint: str) -> ir.Value:
    """Give ``node.inputs[index]`` the value ``array`` (cast to the old dtype).

    The initializer is rewritten in place when nothing else reads it; otherwise a new
    initializer named after ``hint`` is added, so a shared constant is never changed
    under another reader.
    """
    import numpy as np

    value = node.inputs[index]
    old = constant_array(value)
    array = np.ascontiguousarray(np.asarray(array).astype(old.dtype if old is not None else np.float32))
    if (value is not None and value.name in graph.initializers and len(list(value.uses())) == 1
            and not value.is_graph_output()):
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return value
    new = add_initializer(graph, hint, array)
    node.replace_input_with(index, new)
    return new


def write_linear_weight(graph: ir.Graph, linear, weight_kn, hint: str) -> None:
    """Store a ``[K, N]`` weight back in ``linear``'s own layout (MatMul or Gemm transB)."""
    if linear.weight_layout == "in_out":
        array = weight_kn
    elif linear.weight_layout == "out_in":
        array = weight_kn.T
    else:
        raise ValueError(f"{linear.name}: Conv weights are not rewritten")
    set_input_constant(graph, linear.node, 1, array, hint)
