"""Checkpoints load with ``weights_only=True``; corrupt or foreign files give one clear line."""

from __future__ import annotations

import os

import pytest
import torch

from flexray.errors import FlexrayError
from flexray.tracking.mlflow_logger import CHECKPOINT_FORMAT, read_checkpoint


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/flexray-checkpoint-ran-code",))


def test_round_trip(tmp_path):
    path = tmp_path / "ok.pt"
    ckpt = {"format": CHECKPOINT_FORMAT, "round": 3, "state": {"w": torch.ones(2)}, "events": [{"a": 1.0}]}
    torch.save(ckpt, path)
    back = read_checkpoint(path)
    assert back["round"] == 3 and torch.equal(back["state"]["w"], torch.ones(2))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "foreign", "code", "not_a_dict"])
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint at all")
    elif kind == "truncated":
        torch.save({"format": CHECKPOINT_FORMAT, "state": {"w": torch.ones(1000)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "foreign":
        torch.save({"model": {"w": torch.ones(2)}}, path)  # someone else's torch file
    elif kind == "code":  # unpickling this would run a shell command: weights_only refuses it
        torch.save({"format": CHECKPOINT_FORMAT, "x": Evil()}, path)
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(FlexrayError) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not os.path.exists("/tmp/flexray-checkpoint-ran-code")
