"""The graph index the ONNX rewrites share (Q/DQ placement, equalization, depthwise padding, the TensorRT checker):
producers, consumers, initializers and Constant nodes, kept up to date as nodes change."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Graph:
    """Producer/consumer maps and initializers of a graph, kept up to date by the rewrites (also equalize.py's)."""

    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.outputs = {o.name for o in self.g.output}
        self._names = {n.name for n in self.g.node} | set(self.inits) | {o for n in self.g.node for o in n.output}
        self.index()

    def index(self) -> None:
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def only_consumer(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type == op_type and tensor not in self.outputs:
            return users[0]
        return None

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or of a Constant node's output; None for a computed tensor."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        return numpy_helper.to_array(node.attribute[0].t) if constant(node) else None

    def is_const(self, name: str) -> bool:
        return name in self.inits or constant(self.producer.get(name))

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def add_const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.g.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def uint8_dq(self, node: onnx.NodeProto) -> bool:
        """A DequantizeLinear of a computed uint8 activation with a per-tensor scale."""
        zp = self.const(node.input[2]) if len(node.input) > 2 else None
        scale = self.const(node.input[1])
        return node.input[0] not in self.inits and zp is not None and zp.dtype == np.uint8 and scale is not None \
            and scale.size == 1  # fmt: skip


def constant(node: onnx.NodeProto | None) -> bool:
    """A Constant node holding a tensor (`value`), the form exporters write."""
    return node is not None and node.op_type == "Constant" and bool(node.attribute) \
        and node.attribute[0].name == "value"  # fmt: skip


def attr(node: onnx.NodeProto, name: str, default):
    """An attribute's value, or `default` when the node does not set it."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def drop_unused(gr: Graph) -> None:
    """Remove nodes whose outputs nobody reads (the replaced bias DQs) and initializers nobody reads."""
    while True:
        gr.index()
        dead = [n for n in gr.g.node if not any(o in gr.consumers or o in gr.outputs for o in n.output)]
        if not dead:
            break
        for n in dead:
            gr.g.node.remove(n)
    used = {i for n in gr.g.node for i in n.input}
    for init in [i for i in gr.g.initializer if i.name not in used]:
        gr.g.initializer.remove(init)
