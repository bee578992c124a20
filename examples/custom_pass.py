"""Write a pass in a few lines, run it in a pipeline, and read the report."""
from dataclasses import dataclass

import torch
import torch.nn as nn

import fxcompile


@dataclass
class ClampOptions:
    floor: float = 0.0


@fxcompile.register_pass("relu_to_clamp", options=ClampOptions, after=("remove_noops",))
def relu_to_clamp(gm, opts):
    """Rewrite relu(x) as clamp_min(x, floor)."""
    nodes = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.relu.default)
    for node in nodes:
        node.target, node.args = torch.ops.aten.clamp_min.default, (node.args[0], opts.floor)
    return len(nodes)


if __name__ == "__main__":
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    compiled = fxcompile.compile(model, (x,), passes=["remove_noops", "relu_to_clamp"], check=True)
    print(compiled.report)
    print("max abs difference vs eager:", (compiled(x) - model(x)).abs().max().item())
