"""Models as ``nn.Sequential`` stages, and their per-stage cost profiles.

Stages are what split learning cuts between and what the scheduler costs, so every model the
zoo builds is a flat sequence of them ending in the classifier.
"""

from flexray.models.blocks import run_stages, stages
from flexray.models.profile import LayerProfile, ModelProfile, profile_model, state_bytes, train_flops_per_sample
from flexray.models.zoo import build_model

__all__ = [
    "LayerProfile",
    "ModelProfile",
    "build_model",
    "profile_model",
    "run_stages",
    "stages",
    "state_bytes",
    "train_flops_per_sample",
]
