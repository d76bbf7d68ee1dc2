"""Metadata keys: every ``outlierquant.*`` key a pass writes on the nodes it inserts, and the
finders that read them back (online rotations, query/key rotations, FlatQuant transforms).
A tagged node is one of ours: the analysis does not report it as a linear.
"""

from __future__ import annotations

import onnx_ir as ir

#: metadata key on nodes a pass wrote to stay in float (e.g. the outlier side path of a
#: split): graph analysis does not report them as linears, so no quantizer touches them
KEEP_FLOAT_KEY = "outlierquant.keep_float"


#: metadata key set on every node an online rotation inserts (value: the group input name)
ONLINE_ROTATION_KEY = "outlierquant.online_rotation"


#: metadata key set on the norms whose output R1 rotated
ROTATED_NORM_KEY = "outlierquant.rotated_norm"


#: metadata key set on the nodes :class:`RotateQueryKeyPass` inserts (value: ``query`` or ``key``)
QK_ROTATION_KEY = "outlierquant.qk_rotation"


#: metadata key set on every node the online transform inserts (value: the group input name)
FLATQUANT_KEY = "outlierquant.flatquant"


def online_rotation_nodes(model: ir.Model) -> list[ir.Node]:
    """The nodes online rotations inserted (tagged with :data:`ONLINE_ROTATION_KEY`)."""
    return [node for node in model.graph if ONLINE_ROTATION_KEY in node.metadata_props]


def qk_rotation_nodes(model: ir.Model, side: str | None = None) -> list[ir.Node]:
    """The nodes :class:`RotateQueryKeyPass` inserted (``side``: ``query``, ``key`` or both)."""
    return [node for node in model.graph if QK_ROTATION_KEY in node.metadata_props
            and (side is None or node.metadata_props[QK_ROTATION_KEY] == side)]


def flatquant_nodes(model: ir.Model) -> list[ir.Node]:
    """The nodes online FlatQuant transforms inserted (tagged with :data:`FLATQUANT_KEY`)."""
    return [node for node in model.graph if FLATQUANT_KEY in node.metadata_props]
