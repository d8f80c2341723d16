"""Where a device actor computes (``fleet.compute_device``, ``fleet.num_gpus_per_actor``) and
how many of its devices train stacked (``fleet.batch_clients``).

Weights travel through the object store on the CPU and move to the compute device once per
task; simulated time still comes from the device profiles, so a GPU makes the simulation
faster, not the simulated devices.
"""

from __future__ import annotations

import ray
import torch

from flexray.config import FleetConfig
from flexray.protocol import LocalData


def compute_device(setting: str, num_gpus: float) -> torch.device:
    """Where an actor computes: CUDA when asked, or on ``auto`` when Ray gave it a GPU share
    (Ray sets CUDA_VISIBLE_DEVICES, so its share is ``cuda:0`` here); else the CPU."""
    gpus = ray.get_gpu_ids() if ray.is_initialized() and num_gpus else []
    if setting == "cuda" or (setting == "auto" and gpus and torch.cuda.is_available()):
        device = torch.device("cuda", 0)
        if 0 < num_gpus < 1:  # one actor's allocations cannot starve the others sharing its GPU
            torch.cuda.set_per_process_memory_fraction(num_gpus, device)
        return device
    return torch.device("cpu")


def clients_per_stack(setting: str | int, compute: torch.device) -> int:
    """``fleet.batch_clients``: ``auto`` stacks up to 64 devices on CUDA, none on a CPU (where
    vmapped convolutions measured slower than one device after another)."""
    if setting == "auto":
        return 64 if compute.type == "cuda" else 1
    return int(setting)


def on_device(data: LocalData, compute: torch.device) -> LocalData:
    return data if compute.type == "cpu" else LocalData(data.x.to(compute), data.y.to(compute))


def driver_device(fleet: FleetConfig) -> torch.device:
    """Where the driver evaluates: on CUDA when the fleet computes on GPUs and this process sees one."""
    wants = fleet.compute_device == "cuda" or (fleet.compute_device == "auto" and fleet.num_gpus_per_actor > 0)
    return torch.device("cuda", 0) if wants and torch.cuda.is_available() else torch.device("cpu")
