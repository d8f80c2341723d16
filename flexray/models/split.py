"""Split points: what each cut of a staged model costs the client, the server and the link.

A cut ``l`` (1..L) gives the client stages ``[0, l)`` and the server stages ``[l, L)``; ``l = L``
is no split at all (the device trains the whole model, plain FL). Numbers come from the per-stage
profile so the scheduler, the throttle and ``flexray plan`` agree on them. The profile counts
training FLOPs only for the whole model, so each stage's training cost is its counted forward
FLOPs times the model's train/forward ratio (backward ~ 2x forward holds stage by stage for
conv/linear nets; the whole-model total stays exact).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flexray.models.profile import ModelProfile

LABEL_BYTES = 8  # int64 class label sent with every smashed sample
_FLOAT32_BYTES = 4


@dataclass(frozen=True)
class SplitPoint:
    cut: int  # client holds stages [0, cut); cut == num_stages means no split (plain FL)
    client_flops: float  # training FLOPs per sample on the device
    server_flops: float  # training FLOPs per sample on the server
    smashed_bytes: int  # activations per sample, client -> server (the gradient comes back the same size)
    client_model_bytes: int  # client part's state (downloaded and uploaded once per round)
    server_model_bytes: int
    client_memory_bytes: float  # device memory to train its part at the job's batch size

    @property
    def split(self) -> bool:
        return self.server_flops > 0 or self.smashed_bytes > 0

    @property
    def uplink_bytes_per_sample(self) -> int:
        return self.smashed_bytes + LABEL_BYTES if self.split else 0

    @property
    def downlink_bytes_per_sample(self) -> int:
        return self.smashed_bytes if self.split else 0


def split_points(profile: ModelProfile, batch_size: int) -> list[SplitPoint]:
    """Every cut after stage l (l = 1..L); the last one is the full model on the device."""
    fwd = [layer.fwd_flops for layer in profile.layers]
    total_fwd = sum(fwd) or 1.0
    ratio = profile.train_flops_per_sample / total_fwd
    n = len(profile.layers)
    points = []
    for cut in range(1, n + 1):
        client = profile.layers[:cut]
        c_flops = ratio * sum(fwd[:cut])
        s_flops = profile.train_flops_per_sample - c_flops if cut < n else 0.0
        c_bytes = sum(layer.param_bytes for layer in client)
        # Weights + grads + momentum, and every client stage's activations kept for backward.
        acts = profile.input_bytes + sum(layer.activation_bytes for layer in client)
        points.append(SplitPoint(
            cut=cut,
            client_flops=c_flops,
            server_flops=max(0.0, s_flops),
            smashed_bytes=client[-1].activation_bytes if cut < n else 0,
            client_model_bytes=c_bytes,
            server_model_bytes=profile.param_bytes - c_bytes,
            client_memory_bytes=3.0 * c_bytes + batch_size * acts,
        ))
    return points


def split_model(model: nn.Module, cut: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(client, server) views sharing the model's modules; state-dict keys keep their names."""
    if not isinstance(model, nn.Sequential):
        raise TypeError("split_model needs an nn.Sequential of stages (every zoo model is one)")
    n = len(model)
    if not 1 <= cut <= n:
        raise ValueError(f"cut must be in 1..{n}, got {cut}")
    return model[:cut], model[cut:]


def stage_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


def keys_of_stages(state_keys: list[str], names: list[str]) -> list[str]:
    """The state-dict keys that belong to the given top-level stages."""
    prefixes = tuple(f"{n}." for n in names)
    return [k for k in state_keys if k.startswith(prefixes)]
