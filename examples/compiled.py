"""gradreg with ``torch.compile``: compile the model, not the step.

    python examples/compiled.py                  # inductor (needs a C++ compiler on a CPU; the first step compiles)

Compile the model with ``torch.compile(model)`` and call the compiled module in the closure; give GR the
parameters of the model. Every finite-difference method runs the compiled graph in each pass, with the dropout
masks replayed and BatchNorm's running statistics updated once per step. ``method="double"`` differentiates the
gradient's graph again, which compiled graphs do not support (AOTAutograd has no double backward): gradreg runs
the model eagerly for it.

Why ``torch.compile(model)`` rather than ``model.compile()``: during a step gradreg registers a global forward
pre-hook to find the normalization layers, whose running statistics it must update once per step. A compiled
graph hides the layers inside it; the module that ``torch.compile(model)`` returns is called eagerly, so the hook
sees it and gradreg finds every normalization layer inside it. That extra call is what torch's warning "Using
`torch.compile(module)` when there are global hooks on modules ... fire an extra time for the OptimizedModule"
is about: here it is expected and harmless, and the recipe silences it. (With ``model.compile()`` nothing is
called eagerly, and a graph compiled before the first GR step would update the statistics in every pass.)
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import gradreg as gr


class Net(nn.Module):
    """A small classifier with BatchNorm and dropout."""

    def __init__(self, features: int = 20, width: int = 64, classes: int = 3, dropout: float = 0.1):
        super().__init__()
        self.fc1, self.bn, self.drop = nn.Linear(features, width), nn.BatchNorm1d(width), nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


# [start-compile]
def train_compiled(model: nn.Module, batches, method: str = "forward", backend: str = "inductor") -> list[float]:
    """GR steps through ``torch.compile(model)``; the optimizer holds the model's own parameters."""
    # gradreg's hook fires once more, for the compiled module itself: that call is how it finds the layers
    warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
    compiled = torch.compile(model, backend=backend)
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=0.05,
                      eps=None if method == "double" else 0.05, method=method)
    losses = []
    for x, y in batches:
        loss = optimizer.step(lambda x=x, y=y: nn.functional.cross_entropy(compiled(x), y))
        losses.append(float(loss))
    return losses
# [end-compile]


if __name__ == "__main__":
    import time

    from train_loop import toy_data

    x, y = toy_data().tensors
    batches = list(zip(x.split(64), y.split(64))) * 3
    torch.manual_seed(0)
    start = time.perf_counter()
    losses = train_compiled(Net(), batches)
    print(f"{len(batches)} steps in {time.perf_counter() - start:.1f} s (the first compiles), "
          f"loss {losses[0]:.3f} → {losses[-1]:.3f}")
