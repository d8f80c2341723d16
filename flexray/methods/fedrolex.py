"""FedRolex (Alam, Liu, Yan & Zhang, NeurIPS 2022, arXiv 2212.01548): like HeteroFL, but a
device's ``ceil(p * C)`` channels are a window that rolls by one channel per round and wraps
around (starting at ``round mod C``), so every global channel is trained by small devices too,
not only the leading ones.

The paper builds on HeteroFL's code base, so its scaler (``auto``: on for BatchNorm models) and
static BN are HeteroFL's; the masked classifier is a HeteroFL addition and defaults off.
Sub-model accuracies (``acc_p*``, and so ``mean_device_acc``) are of the leading channels, as for
the other width methods; FedRolex never trains those as one sub-model (a device's window rolls
every round), so they score far below the global model (quickstart: 38% vs 87%).
"""

from __future__ import annotations

from pydantic import Field

from flexray.methods.width import WidthConfig, WidthMethod


class FedRolexConfig(WidthConfig):
    masked_classifier: bool = Field(False, description="train and average only the classifier rows of local labels")


class FedRolex(WidthMethod):
    name = "fedrolex"
    Config = FedRolexConfig

    def offset(self, rnd: int) -> int | None:
        return rnd
