"""The pass contract (``docs/architecture.md``).

A pass is an ``onnx_ir`` pass: it takes the model in the IR and returns
:class:`PassRecordResult` — the model, whether it changed, and a small JSON-serialisable
``record`` of what it did (nodes touched, scales chosen, layers skipped and why).

What a pass reads is declared one way: the class attributes ``needs_stats`` and
``needs_feeds`` say what the pass *may* read; :meth:`OutlierPass.reads` says what this
instance, with its options, *does* read (by default, the class attributes). The pipeline
collects statistics on the model *as it is when the pass runs* (an earlier rewrite
changes activations) and hands them over through :attr:`OutlierPass.stats`; a pass that
reads something it was not given fails its precondition (:meth:`OutlierPass.requires`)
before it touches the model. ``preserves_statistics`` marks a pass whose rewrite leaves
every activation the next pass reads unchanged (statistics stay valid).

``claims_equivalence`` marks a float rewrite that must leave the fp32 function unchanged;
every such pass has an equivalence test on real and random inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.stats import ActivationStats, StatisticsCarry
from outlierquant.calibration.targets import quantizable_targets
from outlierquant.errors import CalibrationError
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import check_group, group_label

logger = logging.getLogger(__name__)


class MissingCalibrationError(CalibrationError, ir.passes.PreconditionError):
    """A pass was run without the statistics or samples it reads (its precondition)."""


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
    #: the pass may read activation statistics (collected by the pipeline before it runs)
    needs_stats: ClassVar[bool] = False
    #: the pass may read the calibration samples themselves (e.g. to learn a transform on
    #: captured activations), handed over through :attr:`OutlierPass.feeds`
    needs_feeds: ClassVar[bool] = False
    #: the rewrite leaves the activations later passes read unchanged: statistics stay valid
    preserves_statistics: ClassVar[bool] = False
    #: the pass leaves the fp32 function unchanged (tested for every pass of the catalog)
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

    def reads(self) -> frozenset[str]:
        """What this instance reads: ``"stats"``, ``"feeds"``. The class attributes, unless the
        pass's options decide (then the pass overrides this, within its class attributes)."""
        return frozenset(name for name, wanted in (("stats", self.needs_stats), ("feeds", self.needs_feeds))
                         if wanted)

    def requires(self, model: ir.Model) -> None:
        reads = self.reads()
        label = self.name or type(self).__name__
        if "stats" in reads and self.stats is None:
            raise MissingCalibrationError(f"pass {label} reads activation statistics (with these options) and "
                                          "none were given")
        if "feeds" in reads and not self.feeds:
            raise MissingCalibrationError(f"pass {label} reads the calibration samples (with these options) and "
                                          "none were given")

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

    def carried_statistics(self) -> StatisticsCarry | None:
        """After a run that modified the model: how the statistics of the model before it carry
        over (:class:`~outlierquant.calibration.stats.StatisticsCarry`), or ``None`` when they
        are stale. Only a pass whose rewrite leaves the fp32 function unchanged may say
        anything but ``None``: the tensors it does not list compute what they computed."""
        return None

    def calibration_targets(self, model: ir.Model) -> list:
        """The tensors whose statistics this pass reads (default: every linear input)."""

        return quantizable_targets(model, outputs=False)

    def call(self, model: ir.Model) -> PassRecordResult:
        modified, record = self.run(model)
        record = {"pass": self.name or type(self).__name__, **record}
        return PassRecordResult(model=model, modified=modified, record=record)

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError


# -- small IR helpers shared by the passes ------------------------------------------------


class GroupRewritePass(OutlierPass):
    """The loop every per-channel group rewrite shares: find the norm→linear groups, check
    each (a reason when it cannot be rewritten), rewrite it, record what happened.

    A subclass says whether it may insert ops (:meth:`allow_insert`), may add reasons of its
    own (:meth:`group_reason`), and rewrites one checked group (:meth:`rewrite_group`), which
    fills the group's record entry and returns the ops it inserted — or ``None`` when it
    decided to leave the group (with ``entry["skipped"]`` saying why).
    """

    needs_stats = True
    #: the rewrite needs producer channel ``j`` to be consumer channel ``j`` (a shift or a
    #: reparameterization cannot follow a head split's channel map)
    one_to_one_channels: ClassVar[bool] = False

    def allow_insert(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def group_reason(self, group, stats) -> str | None:
        reason = check_group(group, stats, allow_insert=self.allow_insert(), relations=self.options.relations)
        cmap = group.producer.channel_map
        if not reason and self.one_to_one_channels and cmap is not None \
                and not np.array_equal(cmap, np.arange(group.in_features)):
            reason = "channels are remapped between producer and linears (the rewrite needs a one-to-one path)"
        return reason

    def rewrite_group(self, graph: ir.Graph, group, st, entry: dict[str, Any]) -> int | None:  # pragma: no cover
        raise NotImplementedError

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        stats = self.require_stats()
        graph = model.graph
        records: list[dict[str, Any]] = []
        inserted = 0
        for group in analyze_graph(model).groups:
            entry: dict[str, Any] = {"linears": [linear.name for linear in group.linears],
                                     "relation": group.producer.relation}
            reason = self.group_reason(group, stats)
            if reason:
                entry["skipped"] = reason
                logger.info("%s: skip [%s]: %s", self.name, group_label(group), reason)
                records.append(entry)
                continue
            ops = self.rewrite_group(graph, group, stats[group.input.name], entry)
            records.append(entry)
            if ops is not None:
                inserted += ops
        rewritten = sum(1 for entry in records if "skipped" not in entry)
        logger.info("%s: %d of %d groups rewritten, %d ops inserted", self.name, rewritten, len(records), inserted)
        return rewritten > 0, {"options": dataclasses.asdict(self.options), "groups": records,
                               "rewritten_groups": rewritten, "inserted_ops": inserted}
