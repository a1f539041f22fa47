"""Whether a graph is being captured (torch.fx, TorchScript tracing, dynamo / torch.export).

Inference shortcuts that depend on Python state (caches, in-place border fixes) run only in eager mode;
under graph capture the layers take their plain formulation, which every exporter understands.
"""

from __future__ import annotations

import torch
import torch.fx


def is_graph_capture() -> bool:
    """True while torch.fx symbolically traces, TorchScript traces, or dynamo / torch.export (ONNX export,
    ``torch.compile``) captures a graph."""
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.jit.is_tracing():
        return True
    comp = torch.compiler
    return comp.is_compiling() or (hasattr(comp, "is_exporting") and comp.is_exporting())
