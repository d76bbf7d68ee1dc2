"""Channel bookkeeping for the analysis' forward trace: which producer channel each tensor
channel carries through Reshape / Transpose / Expand / Gather head splits and merges
(the ``channel_map`` a V → O or up → down fold needs), and which ops block the trace.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from outlierquant.graph.records import Linear
from outlierquant.graph.shapes import _Sym, is_int


class Trace:
    def __init__(self, root: ir.Value) -> None:
        self.root = root
        self.states: dict[ir.Value, ChannelState] = {}
        self.path: list[ir.Node] = []
        self.parent: dict[ir.Value, tuple[ir.Node, ir.Value]] = {}
        self.tags: dict[ir.Node, str] = {}
        self.consumers: list[Linear] = []
        self.channel_maps: dict[ir.Value, np.ndarray] = {}
        self.blockers: list[str] = []

    def path_to(self, value: ir.Value) -> list[ir.Node]:
        nodes = []
        while value in self.parent:
            node, value = self.parent[value]
            nodes.append(node)
        return list(reversed(nodes))

    def relation_to(self, value: ir.Value) -> str:
        tags = {self.tags[node] for node in self.path_to(value)}
        if "attention" in tags:
            return "v_to_o"
        if "gate" in tags:
            return "up_to_down"
        return "linear"


class ChannelState:
    """Which axes of a tensor carry producer channels, and which channel sits where.

    ``entries[i]`` is ``None`` for a non-channel axis (batch, sequence, ...) or the size
    of a channel axis. ``labels`` has one dimension per channel axis (in order) and holds
    the producer channel index at each position.
    """

    def __init__(self, entries: list[int | None], labels: np.ndarray) -> None:
        self.entries = entries
        self.labels = labels

    def _channel_positions(self) -> list[int]:
        return [i for i, entry in enumerate(self.entries) if entry is not None]

    def transpose(self, perm: list[int]) -> "ChannelState | None":
        if sorted(perm) != list(range(len(self.entries))):
            return None
        positions = self._channel_positions()
        order = [positions.index(p) for p in perm if self.entries[p] is not None]
        return ChannelState([self.entries[p] for p in perm], self.labels.transpose(order))

    def unsqueeze(self, axes: list[int] | None) -> "ChannelState | None":
        if axes is None:
            return None
        rank = len(self.entries) + len(axes)
        entries: list[int | None] = list(self.entries)
        for axis in sorted(a % rank for a in axes):
            entries.insert(axis, 1)
        return ChannelState(entries, self.labels.reshape([e for e in entries if e is not None]))

    def squeeze(self, axes: list[int] | None) -> "ChannelState | None":
        if axes is None:
            return None
        rank = len(self.entries)
        drop = {a % rank for a in axes}
        if any(self.entries[a] not in (None, 1) for a in drop):
            return None
        entries = [e for i, e in enumerate(self.entries) if i not in drop]
        return ChannelState(entries, self.labels.reshape([e for e in entries if e is not None]))

    def reshape(self, target: list, allow_zero: bool = False) -> "ChannelState | None":
        source = self.entries
        resolved = []
        for i, dim in enumerate(target):
            if is_int(dim) and dim == 0 and not allow_zero:
                if i >= len(source):
                    return None
                resolved.append(_Sym() if source[i] is None else source[i])
            else:
                resolved.append(dim)
        out: list[int | None] = []
        i = j = 0
        while i < len(source) or j < len(resolved):
            if i < len(source) and source[i] == 1 and (j >= len(resolved) or not is_int(resolved[j])):
                i += 1  # a size-1 channel axis disappears
                continue
            if j < len(resolved) and is_int(resolved[j]) and resolved[j] == 1 and (
                    i >= len(source) or source[i] is None):
                out.append(1)
                j += 1
                continue
            if i >= len(source) or j >= len(resolved):
                return None
            dim = resolved[j]
            if not is_int(dim):
                if source[i] is not None:
                    return None  # an unknown target dim over a channel axis
                out.append(None)
                i += 1
                j += 1
                continue
            if dim == -1 and source[i] is None:
                # -1 takes the non-channel axes here, less one for each unknown target dim that
                # follows it before the next channel run ([B, S, d] -> [-1, S', d] keeps d)
                run = 0
                while i + run < len(source) and source[i + run] is None:
                    run += 1
                following = 0
                while j + 1 + following < len(resolved) and not is_int(resolved[j + 1 + following]):
                    following += 1
                i += max(1, run - following)
                out.append(None)
                j += 1
                continue
            run_source = []
            while i < len(source) and source[i] is not None:
                run_source.append(source[i])
                i += 1
            run_target = []
            while j < len(resolved) and is_int(resolved[j]):
                run_target.append(int(resolved[j]))
                j += 1
            if not run_source:
                return None
            total = int(np.prod(run_source))
            if run_target.count(-1) > 1:
                return None
            if -1 in run_target:
                known = int(np.prod([d for d in run_target if d != -1]))
                if known <= 0 or total % known:
                    return None
                run_target[run_target.index(-1)] = total // known
            if int(np.prod(run_target)) != total:
                return None
            out.extend(run_target)
        return ChannelState(out, self.labels.reshape([e for e in out if e is not None]))

    def expand(self, target: list) -> "ChannelState | None":
        rank = max(len(target), len(self.entries))
        entries = [None] * (rank - len(self.entries)) + list(self.entries)
        target = [1] * (rank - len(target)) + list(target)
        labels = self.labels.reshape([e for e in entries if e is not None])
        label_axis = 0
        new_entries: list[int | None] = []
        for entry, dim in zip(entries, target):
            if entry is None:
                new_entries.append(None)
                continue
            if entry == 1 and is_int(dim) and dim > 1:
                labels = np.repeat(labels, int(dim), axis=label_axis)
                new_entries.append(int(dim))
            elif entry == 1 and not is_int(dim):
                return None
            else:
                if is_int(dim) and dim not in (1, entry, -1):
                    return None
                new_entries.append(entry)
            label_axis += 1
        return ChannelState(new_entries, labels)

    def matmul(self, right: bool, other_rank: int | None) -> "ChannelState | None":
        entries = self.entries
        if len(entries) < 2:
            return None
        if right:
            if entries[-2] is not None:
                return None  # the contracted axis carries channels
            new = list(entries[:-2]) + [None, entries[-1]]
        else:
            if entries[-1] is not None:
                return None
            new = list(entries[:-1]) + [None]
        pad = max(0, (other_rank or 0) - len(new))
        new = [None] * pad + new
        return ChannelState(new, self.labels.reshape([e for e in new if e is not None]))

    def broadcast(self, other_rank: int | None) -> "ChannelState | None":
        if other_rank is None:
            return None
        pad = max(0, other_rank - len(self.entries))
        return ChannelState([None] * pad + list(self.entries), self.labels)

    def channel_map(self, linear: Linear) -> np.ndarray | None:
        """The producer channel of each input channel of ``linear``, or None if misaligned."""
        entries = self.entries
        axis = 1 if linear.op_type == "Conv" else len(entries) - 1
        if axis >= len(entries) or entries[axis] != linear.in_features:
            return None
        if any(e not in (None, 1) for i, e in enumerate(entries) if i != axis):
            return None
        return self.labels.reshape(-1).astype(np.int64)
