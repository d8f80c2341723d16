"""Test accuracy and loss of a model on a data set: the server's, a method's and the DSE's measure."""

from __future__ import annotations

import torch
from torch import nn

from flexray.protocol import LocalData


@torch.no_grad()
def evaluate_model(model: nn.Module, data: LocalData, batch_size: int = 512) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device  # the data comes to the model (a GPU's, on the driver or an actor)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    correct, loss = 0, 0.0
    for start in range(0, len(data), batch_size):
        xb, yb = data.x[start : start + batch_size].to(device), data.y[start : start + batch_size].to(device)
        out = model(xb)
        loss += float(loss_fn(out, yb))
        correct += int((out.argmax(1) == yb).sum())
    n = max(len(data), 1)
    return {"accuracy": correct / n, "loss": loss / n}
