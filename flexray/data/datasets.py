"""Datasets as plain uint8 NCHW arrays, so actors can hold them once and slice cheaply.

Three sources: scikit-learn digits (always offline), an ``.npz`` with ``x_train, y_train,
x_test, y_test`` (cached decompressed, memory-mapped), and torchvision, which downloads into the
data root (``~/.flexray/data`` unless ``data.root`` or ``$FLEXRAY_DATA_ROOT`` says otherwise).
An ``NAME.npz`` in the data root wins over torchvision: that is how a machine without internet
(and the test suite) supplies the data without editing a job.
Every user mistake becomes a one-line :class:`~flexray.errors.FlexrayError` naming the field.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from flexray.config import DATASETS, DataConfig
from flexray.errors import FlexrayError

if TYPE_CHECKING:
    import torch

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_CACHE_VERSION = "v1"  # bump when the cached layout changes

# Minimum class counts: a subset (e.g. cifar100_subset.npz) may lack some labels, but the
# model's head must still match the full dataset.
NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}

# Per-channel mean/std of the training images in [0, 1] pixel units (the commonly published values).
# digits: computed once over the 1437-image train split below after the v*255//16 mapping
# (np.mean / np.std of x_train / 255); they depend only on that fixed split.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3048,), (0.3762,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True, eq=False)  # field-wise == on arrays would raise; compare by identity
class Dataset:
    """Images stay uint8 (4x smaller than float) until a batch is converted by :func:`to_tensor`."""

    name: str
    x_train: np.ndarray  # uint8, N x C x H x W
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def to_tensor(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> "torch.Tensor":
    """uint8 NCHW (or CHW) -> normalised float32; done per batch so datasets stay uint8 in memory."""
    import torch

    if x.dtype != np.uint8:
        raise ValueError(f"to_tensor expects uint8 images, got {x.dtype}")
    if not (x.flags.c_contiguous and x.flags.writeable):
        x = np.array(x, order="C")  # memory-mapped or strided input: torch wants its own buffer
    t = torch.from_numpy(x).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return t.sub_(m).div_(s)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.name`` from the source ``cfg.source`` resolves to."""
    if cfg.name not in DATASETS:
        raise FlexrayError(f"data error: data.name: unknown dataset {cfg.name!r}; use one of {', '.join(DATASETS)}")
    source, where = _resolve_source(cfg)
    if source == "sklearn":
        arrays = _load_digits()
    elif source == "npz":
        assert where is not None
        arrays = _load_npz(cfg.name, where)
    else:
        assert where is not None
        arrays = _load_torchvision(cfg, where)
    return _build(cfg, arrays)


def data_root(cfg: DataConfig) -> Path:
    """Where datasets live: ``data.root``, else ``$FLEXRAY_DATA_ROOT``, else ``~/.flexray/data``."""
    return Path(cfg.root or os.environ.get("FLEXRAY_DATA_ROOT") or "~/.flexray/data").expanduser()


def _resolve_source(cfg: DataConfig) -> tuple[str, Path | None]:
    """(source, file or folder): ``auto`` prefers an explicit ``data.path``, then ``NAME.npz`` in
    the data root (how offline machines and the tests supply data), then torchvision there."""
    src = cfg.source
    if src == "auto":
        if cfg.name == "digits":
            return "sklearn", None
        if cfg.path:
            return "npz", Path(cfg.path)
        root = data_root(cfg)
        npz = root / f"{cfg.name}.npz"
        return ("npz", npz) if npz.is_file() else ("torchvision", root)
    if (src == "sklearn") != (cfg.name == "digits"):
        raise FlexrayError(
            f"data error: data.source: {src} cannot provide {cfg.name}; "
            "digits comes from sklearn, other datasets from npz or torchvision (or use source=auto)"
        )
    if src == "npz" and not cfg.path:
        raise FlexrayError("data error: data.path: required for source=npz (an .npz with x_train, y_train, x_test, y_test)")
    if src == "npz":
        return "npz", Path(cfg.path or "")
    return src, (data_root(cfg) if src == "torchvision" else None)


def _build(cfg: DataConfig, arrays: dict[str, np.ndarray]) -> Dataset:
    """Common checks and layout for every source; ``arrays`` hold raw x (NHW/NHWC/NCHW) and y."""
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        x = _to_nchw(arrays[f"x_{split}"], f"x_{split}")
        y = np.asarray(arrays[f"y_{split}"]).reshape(-1).astype(np.int64, copy=False)
        if len(x) != len(y):
            raise FlexrayError(
                f"data error: data.path: x_{split} has {len(x)} samples but y_{split} has {len(y)}; "
                "the arrays must pair up"
            )
        if len(y) and y.min() < 0:
            raise FlexrayError(f"data error: data.path: y_{split} has negative labels; labels must be 0..K-1")
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    if len(out["x_train"]) == 0:
        raise FlexrayError("data error: data.path: x_train is empty; the dataset needs training samples")
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise FlexrayError(
            f"data error: data.path: x_train images are {out['x_train'].shape[1:]} but x_test images are "
            f"{out['x_test'].shape[1:]}; both splits must have the same image shape"
        )
    if cfg.test_samples is not None:
        out["x_test"], out["y_test"] = out["x_test"][: cfg.test_samples], out["y_test"][: cfg.test_samples]
    top = max(int(y.max()) + 1 for y in (out["y_train"], out["y_test"]) if len(y))
    num_classes = max(top, NUM_CLASSES[cfg.name])
    channels = out["x_train"].shape[1]
    mean, std = STATS[cfg.name]
    if len(mean) != channels:  # e.g. a grayscale conversion of CIFAR: measure instead of guessing
        mean, std = _measure_stats(out["x_train"])
    for a in out.values():
        if a.flags.writeable:
            a.flags.writeable = False  # shared by every device of an actor: nobody may mutate it
    return Dataset(cfg.name, out["x_train"], out["y_train"], out["x_test"], out["y_test"], num_classes, mean, std)


def _to_nchw(x: Any, field: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise FlexrayError(f"data error: data.path: {field} is {x.dtype}; images must be uint8 in [0, 255]")
    if x.ndim == 3:  # MNIST-style N x H x W
        return x[:, None, :, :]
    if x.ndim == 4:
        if x.shape[1] in (1, 3, 4):  # already channels first
            return x
        if x.shape[3] in (1, 3, 4):  # N x H x W x C
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise FlexrayError(
        f"data error: data.path: {field} has shape {x.shape}; expected N x H x W, N x H x W x C or N x C x H x W"
    )


def _measure_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    sample = np.asarray(x[:10000], dtype=np.float64) / 255.0
    return (
        tuple(round(float(v), 4) for v in sample.mean(axis=(0, 2, 3))),
        tuple(round(max(float(v), 1e-3), 4) for v in sample.std(axis=(0, 2, 3))),
    )


# ---------------------------------------------------------------- sklearn digits


def _load_digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits  # lazy: sklearn import costs ~0.5 s

    d = load_digits()
    x = (d.images.astype(np.int64) * 255 // 16).astype(np.uint8)
    y = d.target.astype(np.int64)
    # RandomState (not Generator): its stream is frozen by NumPy's policy, so the split never changes.
    perm = np.random.RandomState(0).permutation(len(y))
    n_test = int(np.ceil(0.2 * len(y)))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


# ---------------------------------------------------------------- npz + decompressed cache


def cache_root() -> Path:
    return Path(os.environ.get("FLEXRAY_CACHE") or "~/.cache/flexray").expanduser()


def _cache_dir(src: Path) -> Path:
    st = src.stat()
    key = f"{_CACHE_VERSION}|{src}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "npz" / f"{src.stem}-{digest}"


def _read_cache(d: Path) -> dict[str, np.ndarray] | None:
    if not all((d / f"{k}.npy").is_file() for k in ARRAYS):
        return None
    try:
        return {k: np.asarray(np.load(d / f"{k}.npy", mmap_mode="r")) for k in ARRAYS}
    except (OSError, ValueError):
        return None  # unreadable cache: fall back to the source file


def _write_cache(d: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write into a temp dir, then rename it: readers see either nothing or all arrays."""
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
    except OSError:
        return  # read-only home etc.: caching is an optimisation, not a requirement
    try:
        for k in ARRAYS:
            np.save(tmp / f"{k}.npy", arrays[k], allow_pickle=False)
        if d.is_dir() and _read_cache(d) is None:
            shutil.rmtree(d, ignore_errors=True)  # damaged by hand (entries only ever appear whole)
        os.rename(tmp, d)
    except OSError:
        pass  # another process renamed first (directory not empty), or disk full
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_npz(name: str, path: Path) -> dict[str, np.ndarray]:
    src = path.expanduser().resolve()
    if not src.is_file():
        what = "is a directory" if src.is_dir() else "does not exist"
        raise FlexrayError(
            f"data error: data.path: {path} {what}; point it at an .npz of {name} with {', '.join(ARRAYS)}"
        )
    cdir = _cache_dir(src)
    cached = _read_cache(cdir)
    if cached is not None:
        return cached
    unreadable = FlexrayError(
        f"data error: data.path: cannot read {path} as .npz; give a file written by np.savez or np.savez_compressed"
    )
    try:
        z = np.load(src, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        raise unreadable from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy
        raise unreadable
    with z:
        missing = [k for k in ARRAYS if k not in z.files]
        if missing:
            raise FlexrayError(
                f"data error: data.path: {path} has no array {missing[0]!r}; "
                f"the .npz needs {', '.join(ARRAYS)} (it has {', '.join(z.files) or 'none'})"
            )
        try:
            raw = {k: z[k] for k in ARRAYS}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            raise unreadable from None
    # Cache the finished layout (NCHW, int64) so the next load is a zero-copy memory map.
    arrays = {
        "x_train": _to_nchw(raw["x_train"], "x_train"),
        "x_test": _to_nchw(raw["x_test"], "x_test"),
        "y_train": np.asarray(raw["y_train"]).reshape(-1).astype(np.int64),
        "y_test": np.asarray(raw["y_test"]).reshape(-1).astype(np.int64),
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    _write_cache(cdir, arrays)
    return arrays


# ---------------------------------------------------------------- torchvision


def _load_torchvision(cfg: DataConfig, root: Path) -> dict[str, np.ndarray]:
    try:
        import torchvision.datasets as tvd  # lazy: only this branch needs torchvision
    except ImportError:
        raise FlexrayError(
            "data error: data.source: torchvision is not installed; pip install torchvision "
            "or use source=npz with data.path"
        ) from None
    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[
        cfg.name
    ]
    offline_fix = (f"on a machine without internet, put {cfg.name}.npz (x_train, y_train, x_test, y_test) or "
                   f"torchvision's {cfg.name} files in {root}, or set data.path to an .npz")
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        try:
            ds = cls(root=str(root), train=split == "train", download=cfg.download)
        except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ...
            if cfg.download:
                why = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}" if str(err) else type(err).__name__
                raise FlexrayError(
                    f"data error: data.root: could not download {cfg.name} into {root} ({why}); {offline_fix}"
                ) from None
            raise FlexrayError(
                f"data error: data.root: no {cfg.name} data under {root} and data.download is false; "
                f"set data.download=true, or {offline_fix}"
            ) from None
        out[f"x_{split}"] = np.asarray(ds.data)  # MNIST: uint8 tensor NHW; CIFAR: uint8 ndarray NHWC
        out[f"y_{split}"] = np.asarray(ds.targets, dtype=np.int64)
    return out
