"""flexray.data: loading (sklearn / npz / cache / errors) and partitioning. Fast, no Ray."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from flexray.config import DataConfig, PartitionConfig
from flexray.data import Dataset, load_dataset, partition, to_tensor
from flexray.errors import FlexrayError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never write into the user's real cache from tests."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEXRAY_CACHE", str(cache))
    return cache


def _shared(name: str) -> Path:
    p = SHARED / name
    if not p.is_file():
        pytest.skip(f"{p} not present (shared/data sits beside the checkout)")
    return p


def _write_npz(path: Path, n_train: int = 40, n_test: int = 12, seed: int = 0, **override: np.ndarray) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 6, 5, 3), dtype=np.uint8),  # NHWC, non-square
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 6, 5, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    arrays.update(override)
    np.savez_compressed(path, **arrays)
    return path


# ---------------------------------------------------------------- loading


def test_digits_shapes_dtype_and_stable() -> None:
    a = load_dataset(DataConfig())
    b = load_dataset(DataConfig(name="digits", source="sklearn"))
    assert isinstance(a, Dataset) and a.name == "digits"
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.x_train.dtype == np.uint8 and a.y_train.dtype == np.int64 and a.y_test.dtype == np.int64
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert a.x_train.max() == 255 and a.x_train.min() == 0  # 16 -> 255 mapping
    assert set(np.unique(a.y_train)) == set(range(10))
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    # the hard-coded stats match the data they describe
    x = a.x_train / 255.0
    assert abs(x.mean() - a.mean[0]) < 1e-3 and abs(x.std() - a.std[0]) < 1e-3


def test_digits_split_is_disjoint_and_frozen() -> None:
    d = load_dataset(DataConfig())
    with pytest.raises(ValueError):
        d.x_train[0, 0, 0, 0] = 1  # shared arrays are read-only
    train = {row.tobytes() for row in d.x_train}
    overlap = sum(row.tobytes() in train for row in d.x_test)
    assert overlap <= 2  # digits has a couple of duplicate images; a broken split would share ~all


def test_test_samples_keeps_first_n() -> None:
    full = load_dataset(DataConfig())
    cut = load_dataset(DataConfig(test_samples=50))
    assert cut.x_test.shape[0] == 50 and cut.y_test.shape == (50,)
    assert np.array_equal(cut.x_test, full.x_test[:50]) and np.array_equal(cut.y_test, full.y_test[:50])
    assert np.array_equal(cut.x_train, full.x_train)


def test_npz_mnist() -> None:
    path = _shared("mnist.npz")
    d = load_dataset(DataConfig(name="mnist", path=str(path)))
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int64
    assert d.num_classes == 10 and d.mean == (0.1307,)
    assert d.y_train[0] == 5 and d.y_test[0] == 7  # official first labels


def test_npz_cifar100_subset_layout_and_classes() -> None:
    path = _shared("cifar100_subset.npz")
    d = load_dataset(DataConfig(name="cifar100", source="npz", path=str(path)))
    assert d.x_train.shape == (486, 3, 32, 32) and d.x_test.shape == (916, 3, 32, 32)
    assert d.input_shape == (3, 32, 32)
    assert d.num_classes == 100
    with np.load(path) as raw:
        assert np.array_equal(d.x_train[7], raw["x_train"][7].transpose(2, 0, 1))  # HWC -> CHW, not a reshape
        assert np.array_equal(d.y_test, raw["y_test"])


def test_npz_cache_roundtrip(tmp_path: Path, _private_cache: Path) -> None:
    src = _write_npz(tmp_path / "tiny.npz")
    first = load_dataset(DataConfig(name="cifar10", path=str(src)))
    entries = list((_private_cache / "npz").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temp dir left behind
    assert sorted(p.name for p in entries[0].iterdir()) == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]

    second = load_dataset(DataConfig(name="cifar10", path=str(src)))
    assert isinstance(second.x_train.base, np.memmap)  # served from the cache, memory-mapped
    assert not isinstance(first.x_train.base, np.memmap)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(first, k), getattr(second, k)), k
    assert second.x_train.shape == (40, 3, 6, 5)
    with np.load(src) as raw:
        assert np.array_equal(second.x_train, raw["x_train"].transpose(0, 3, 1, 2))


def test_npz_cache_really_used_and_invalidated(tmp_path: Path, _private_cache: Path) -> None:
    src = _write_npz(tmp_path / "tiny.npz")
    load_dataset(DataConfig(name="cifar10", path=str(src)))
    (entry,) = (_private_cache / "npz").iterdir()
    np.save(entry / "y_train.npy", np.full(40, 9, dtype=np.int64))  # tamper with the cached copy
    assert (load_dataset(DataConfig(name="cifar10", path=str(src))).y_train == 9).all()

    _write_npz(src, n_train=41, seed=1)  # new size + mtime: new key, cache ignored
    os.utime(src, ns=(1, 1))
    fresh = load_dataset(DataConfig(name="cifar10", path=str(src)))
    assert fresh.x_train.shape[0] == 41 and not (fresh.y_train == 9).all()
    assert len(list((_private_cache / "npz").iterdir())) == 2


def test_npz_damaged_cache_is_rebuilt(tmp_path: Path, _private_cache: Path) -> None:
    src = _write_npz(tmp_path / "tiny.npz")
    first = load_dataset(DataConfig(name="cifar10", path=str(src)))
    (entry,) = (_private_cache / "npz").iterdir()
    (entry / "x_test.npy").unlink()
    again = load_dataset(DataConfig(name="cifar10", path=str(src)))
    assert np.array_equal(again.x_test, first.x_test)
    assert (entry / "x_test.npy").is_file()  # repaired for the next process
    assert isinstance(load_dataset(DataConfig(name="cifar10", path=str(src))).x_test.base, np.memmap)


def test_to_tensor_normalises() -> None:
    torch = pytest.importorskip("torch")
    d = load_dataset(DataConfig())
    t = to_tensor(d.x_train[:4], d.mean, d.std)  # read-only input must work too
    assert t.dtype == torch.float32 and tuple(t.shape) == (4, 1, 8, 8)
    expect = (d.x_train[:4].astype(np.float32) / 255 - d.mean[0]) / d.std[0]
    assert np.allclose(t.numpy(), expect, atol=1e-5)
    rgb = np.stack([np.full((2, 2), v, np.uint8) for v in (0, 128, 255)])[None]
    out = to_tensor(rgb, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5)).numpy()
    assert np.allclose(out[0, :, 0, 0], [-1.0, (128 / 255 - 0.5) / 0.25, 1.0], atol=1e-5)


def _bad_cases(tmp: Path) -> list[tuple[DataConfig, str]]:
    no_y = tmp / "no_y.npz"
    np.savez(no_y, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4), x_test=np.zeros((2, 8, 8), np.uint8))
    text = tmp / "text.npz"
    text.write_text("not a zip\n")
    floats = _write_npz(tmp / "float.npz", x_train=np.zeros((40, 6, 5, 3), np.float32))
    short = _write_npz(tmp / "short.npz", y_train=np.zeros(39, np.uint8))
    return [
        (DataConfig(name="mnist", path=str(tmp / "missing.npz")), "data.path"),
        (DataConfig(name="mnist", path=str(tmp)), "data.path"),
        (DataConfig(name="mnist", path=str(no_y)), "data.path"),
        (DataConfig(name="mnist", path=str(text)), "data.path"),
        (DataConfig(name="cifar10", path=str(floats)), "data.path"),
        (DataConfig(name="cifar10", path=str(short)), "data.path"),
        (DataConfig(name="mnist", root=str(tmp / "empty"), download=False), "data.root"),  # nothing there, no download
        (DataConfig(name="mnist", source="npz"), "data.path"),
        (DataConfig(name="mnist", source="sklearn"), "data.source"),
        (DataConfig(name="digits", source="npz", path=str(no_y)), "data.source"),
        (DataConfig.model_construct(name="svhn", source="auto", path=None, root=None), "data.name"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_inputs_name_the_field(case: int, tmp_path: Path) -> None:
    cfg, field = _bad_cases(tmp_path)[case]
    with pytest.raises(FlexrayError) as info:
        load_dataset(cfg)
    msg = str(info.value)
    assert field in msg and "\n" not in msg, msg


def test_missing_array_is_named(tmp_path: Path) -> None:
    cfg = _bad_cases(tmp_path)[2][0]
    with pytest.raises(FlexrayError, match="y_test"):
        load_dataset(cfg)


def test_torchvision_root_without_data(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(FlexrayError) as info:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=False))
    msg = str(info.value)
    assert "data.root" in msg and "download" in msg and "\n" not in msg


# ---------------------------------------------------------------- partitions

LABELS = np.repeat(np.arange(10), 100)  # sorted, 100 per class
KINDS = [PartitionConfig(kind="iid"), PartitionConfig(kind="dirichlet", alpha=0.5), PartitionConfig(kind="shards")]


def _label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    ent = []
    for p in parts:
        q = np.bincount(labels[p], minlength=10) / len(p)
        q = q[q > 0]
        ent.append(-(q * np.log(q)).sum())
    return float(np.mean(ent))


@pytest.mark.parametrize("cfg", KINDS, ids=lambda c: c.kind)
def test_partition_disjoint_covering_deterministic(cfg: PartitionConfig) -> None:
    parts = partition(LABELS, 7, cfg, seed=3)
    assert len(parts) == 7
    assert all(p.dtype == np.int64 and len(p) >= 1 and np.all(np.diff(p) > 0) for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(LABELS) and np.array_equal(np.sort(allidx), np.arange(len(LABELS)))
    again = partition(LABELS, 7, cfg, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 7, cfg, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_is_balanced_and_mixed() -> None:
    parts = partition(LABELS, 8, PartitionConfig(kind="iid"), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _label_entropy(LABELS, parts) > 0.9 * np.log(10)


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    skewed = partition(LABELS, 10, PartitionConfig(kind="dirichlet", alpha=0.05), seed=0)
    even = partition(LABELS, 10, PartitionConfig(kind="dirichlet", alpha=100.0), seed=0)
    assert _label_entropy(LABELS, skewed) < 0.5 * _label_entropy(LABELS, even)
    assert _label_entropy(LABELS, even) > 0.9 * np.log(10)


def test_dirichlet_gives_every_device_data_or_fails_clearly() -> None:
    digits = load_dataset(DataConfig()).y_train
    parts = partition(digits, 50, PartitionConfig(kind="dirichlet", alpha=0.1), seed=1)
    assert min(len(p) for p in parts) >= 1
    with pytest.raises(FlexrayError, match="data.partition.alpha"):
        partition(np.zeros(3, np.int64), 3, PartitionConfig(kind="dirichlet", alpha=0.001), seed=0)


@pytest.mark.parametrize(("devices", "k"), [(10, 1), (5, 2), (10, 2), (25, 4)])
def test_shards_limit_classes_per_device(devices: int, k: int) -> None:
    # shard sizes divide the 100-sample classes, so no shard straddles two classes
    parts = partition(LABELS, devices, PartitionConfig(kind="shards", shards_per_device=k), seed=0)
    classes = [len(np.unique(LABELS[p])) for p in parts]
    assert 1 <= max(classes) <= k
    assert all(len(p) == len(LABELS) // devices for p in parts)
    if k == 1:
        assert classes == [1] * devices  # one whole class each


def test_cap_limits_and_subsets() -> None:
    for cfg in KINDS:
        full = partition(LABELS, 4, cfg, seed=2)
        capped = partition(LABELS, 4, cfg, seed=2, cap=30)
        again = partition(LABELS, 4, cfg, seed=2, cap=30)
        for f, c, a in zip(full, capped, again):
            assert len(c) == min(30, len(f))
            assert np.isin(c, f).all() and np.all(np.diff(c) > 0)
            assert np.array_equal(c, a)
        assert not all(np.array_equal(c, f[:30]) for c, f in zip(capped, full))  # a shuffle, not a prefix


def test_hold_out_is_seeded_disjoint_and_left_to_no_device() -> None:
    for cfg in KINDS:
        parts = partition(LABELS, 4, cfg, seed=2, hold_out=100)
        again = partition(LABELS, 4, cfg, seed=2, hold_out=100)
        held = np.concatenate(parts)
        assert len(held) == len(np.unique(held)) == len(LABELS) - 100  # everyone else's, once
        assert all(np.array_equal(p, a) and np.all(np.diff(p) > 0) for p, a in zip(parts, again))
    assert not np.array_equal(np.concatenate(partition(LABELS, 4, PartitionConfig(), seed=2, hold_out=100)),
                              np.concatenate(partition(LABELS, 4, PartitionConfig(), seed=3, hold_out=100)))
    with pytest.raises(FlexrayError, match="proxy_samples"):
        partition(LABELS, 4, PartitionConfig(), seed=0, hold_out=len(LABELS))


def test_partition_too_few_samples() -> None:
    with pytest.raises(FlexrayError, match="data.partition") as info:
        partition(np.arange(5), 6, PartitionConfig(), seed=0)
    assert "\n" not in str(info.value)
    with pytest.raises(FlexrayError, match="shards_per_device"):
        partition(np.arange(10), 5, PartitionConfig(kind="shards", shards_per_device=3), seed=0)


# ---------------------------------------------------------------- where jobs find their data


def test_data_root_npz_is_used_without_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job names only the dataset: NAME.npz in $FLEXRAY_DATA_ROOT (or data.root) supplies it."""
    root = tmp_path / "root"
    root.mkdir()
    _write_npz(root / "cifar10.npz", seed=3)
    monkeypatch.setenv("FLEXRAY_DATA_ROOT", str(root))
    from_env = load_dataset(DataConfig(name="cifar10"))
    monkeypatch.delenv("FLEXRAY_DATA_ROOT")
    from_root = load_dataset(DataConfig(name="cifar10", root=str(root)))
    from_path = load_dataset(DataConfig(name="cifar10", path=str(root / "cifar10.npz")))
    for ds in (from_env, from_root):
        assert np.array_equal(ds.x_train, from_path.x_train) and np.array_equal(ds.y_test, from_path.y_test)


def test_default_data_root_is_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flexray.data.datasets import data_root

    monkeypatch.delenv("FLEXRAY_DATA_ROOT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_root(DataConfig(name="mnist")) == tmp_path / ".flexray" / "data"
    assert DataConfig(name="mnist").download is True  # jobs get their data the way users do


def test_offline_download_is_one_line_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No internet (here: every request goes to a proxy on a closed local port): one line that
    says the download failed and how to point at local files, no traceback."""
    pytest.importorskip("torchvision")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    root = tmp_path / "data"
    monkeypatch.setenv("FLEXRAY_DATA_ROOT", str(root))
    with pytest.raises(FlexrayError) as info:
        load_dataset(DataConfig(name="mnist"))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("data error: data.root: could not download mnist"), msg
    assert "without internet" in msg and str(root) in msg and "data.path" in msg
