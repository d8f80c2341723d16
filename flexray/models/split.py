"""Split points: what each cut of a staged model costs the client, the server and the link.

A cut ``l`` (1..L) gives the client stages ``[0, l)`` and the server stages ``[l, L)``; ``l = L``
is no split at all (the device trains the whole model, plain FL). Numbers come from the per-stage
profile so the scheduler, the throttle and ``flexray plan`` agree on them. Each part's latency
model input is its stages' traced kernels (``ModelProfile.parts``): the client's step carries its
share of the optimizer, the server's the loss and the rest. Counted FLOPs per stage are its
forward FLOPs times the model's train/forward ratio (the whole-model total stays exact).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flexray.models.profile import ModelProfile
from flexray.protocol import StepProfile, Workload

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
    client_step: StepProfile  # the client part's SGD step (the whole model's at cut = L)
    server_step: StepProfile  # the server part's step per client batch (nothing at cut = L)

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
        c_step, s_step = _part_steps(profile, cut, c_bytes, c_flops, max(0.0, s_flops))
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
            client_step=c_step,
            server_step=s_step,
        ))
    return points


def _part_steps(profile: ModelProfile, cut: int, client_bytes: int, c_flops: float, s_flops: float
                ) -> tuple[StepProfile, StepProfile]:
    """The client's and the server's step at ``cut``; the optimizer is shared by parameter bytes."""
    n = len(profile.layers)
    if profile.parts is None:  # a FLOPs-only profile: the coarse form
        one = Workload(steps=1.0)
        return StepProfile(one, Workload.coarse(c_flops)), StepProfile(one if cut < n else Workload(), Workload.coarse(s_flops))
    if cut == n:
        return profile.parts.whole, StepProfile(Workload(), Workload())
    share = client_bytes / max(profile.param_bytes, 1)
    return (profile.parts.part(0, cut, loss=False, optimizer_share=share),
            profile.parts.part(cut, n, loss=True, optimizer_share=1.0 - share))


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
