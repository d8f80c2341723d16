"""HeteroFL (Diao, Ding & Tarokh, ICLR 2021, arXiv 2010.01264): each device trains the leading
``ceil(p * C)`` channels of every layer, ``p`` from its capability tier (1, 1/2, ..., 1/16); the
server averages every global entry over the devices whose sub-model holds it.

As in the paper: a scaler keeps sub-models' activations at the full model's scale (the paper's
1/p on conv outputs; here each layer's exact fan-in ratio, on models with BatchNorm only:
``flexray.models.elastic.FanInScaler`` says why); static BN ships no running statistics (the
global model normalises with batch statistics at evaluation; see
``flexray.models.elastic.batch_stat_bn``); the classifier is trained and averaged only on the
label rows a device holds.
"""

from __future__ import annotations

from pydantic import Field

from flexray.methods.width import WidthConfig, WidthMethod


class HeteroFLConfig(WidthConfig):
    static_bn: bool = Field(True, description="sBN: no running stats shipped; batch statistics at evaluation")
    masked_classifier: bool = Field(True, description="train and average only the classifier rows of local labels")


class HeteroFL(WidthMethod):
    name = "heterofl"
    Config = HeteroFLConfig
