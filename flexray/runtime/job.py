"""The job, assembled once from its config: the one set-up behind ``flexray run``, ``flexray plan``
and every device actor.

``Job.assemble`` does everything that can refuse a config -- data, fleet, the method's check on
the model -- before Ray starts. The rest is built on demand, the same way wherever it is asked
for: the model, its profile, the server's device class, and a method instance given the runtime
facts it asks for (``flexray.methods.capabilities``). The driver, ``flexray plan`` and each actor
therefore plan with the same objects, which is what makes a plan match the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flexray.config import JobConfig
from flexray.data.datasets import Dataset, load_dataset, to_tensor
from flexray.fleet.fleet import Device, build_fleet
from flexray.fleet.profiles import resolve_profile
from flexray.methods import method_class
from flexray.methods.base import Method, ServerData
from flexray.methods.capabilities import Attaches, Prepares
from flexray.models import build_model, profile_model
from flexray.models.profile import ModelProfile
from flexray.protocol import DeviceProfile, LocalData
from flexray.compute import driver_device


def local_gpus() -> int:
    """The GPUs a local Ray started on this machine gets: the CUDA devices torch sees."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class Job:
    """A resolved config with its data and devices (on an actor: only the devices it hosts)."""

    cfg: JobConfig
    dataset: Dataset
    devices: list[Device]
    checked: Method | None = field(default=None, repr=False)
    """The method instance ``assemble`` checked: the driver's one Method (``Session``)."""

    @classmethod
    def assemble(cls, cfg: JobConfig) -> Job:
        """Load the data, build the fleet and let the method refuse the model, all before Ray."""
        dataset = load_dataset(cfg.data)
        job = cls(cfg, dataset, build_fleet(cfg, dataset.y_train))
        job.checked = job._method(check=True)
        return job

    def model(self) -> nn.Module:
        """A fresh model of the configured architecture (drawing its init from torch's RNG)."""
        return build_model(self.cfg.model, self.dataset.input_shape, self.dataset.num_classes)

    @cached_property
    def model_profile(self) -> ModelProfile:
        with torch.random.fork_rng(devices=[]):  # profiling never shifts the training RNG
            return profile_model(self.model(), self.dataset.input_shape)

    @cached_property
    def server_profile(self) -> DeviceProfile:
        return resolve_profile(self.cfg.fleet.server_profile, self.cfg.fleet.profiles)

    def method(self) -> Method:
        """A method instance, given the runtime facts it plans with (``Attaches``)."""
        return self._method(check=False)

    def _method(self, check: bool) -> Method:
        method = method_class(self.cfg.method.name)(self.cfg.method, self.model)
        if check:  # a model the method cannot train is refused by name, before attach trips on it
            method.check()
        if isinstance(method, Attaches):
            method.attach(self.model_profile, self.server_profile)
        return method

    def prepare(self, method: Method, workdir: Path) -> list[Path]:
        """Server-side preparation (``Prepares``) on the samples no device holds, computed where the
        driver evaluates (``driver_device``); the files it returns are for the run's artifacts.
        Never shifts the training RNG."""
        if not isinstance(method, Prepares):
            return []
        held = np.concatenate([d.indices for d in self.devices]) if self.devices else np.array([], dtype=np.int64)
        held_out = np.setdiff1d(np.arange(len(self.dataset.y_train)), held)
        compute = driver_device(self.cfg.fleet)
        with torch.random.fork_rng(devices=[compute.index or 0] if compute.type == "cuda" else []):
            return method.setup(ServerData(self.dataset, held_out, compute, self.cfg.tracking.progress), workdir)

    def local_data(self, device: Device) -> LocalData:
        ds = self.dataset
        return LocalData(to_tensor(ds.x_train[device.indices], ds.mean, ds.std),
                         torch.as_tensor(ds.y_train[device.indices], dtype=torch.long))

    def test_data(self) -> LocalData:
        ds = self.dataset
        return LocalData(to_tensor(ds.x_test, ds.mean, ds.std), torch.tensor(ds.y_test, dtype=torch.long))
