"""FedRolex (Alam, Liu, Yan & Zhang, NeurIPS 2022, arXiv 2212.01548): like HeteroFL, but a
device's ``ceil(p * C)`` channels are a window that rolls by one channel per round and wraps
around (starting at ``round mod C``), so every global channel is trained by small devices too,
not only the leading ones.

The paper builds on HeteroFL's code base, so its scaler (``auto``: on for BatchNorm models) and
static BN are HeteroFL's; the masked classifier is a HeteroFL addition and defaults off. Sub-model accuracies (``acc_p*``) are of the
leading channels, as for the other width methods.
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
