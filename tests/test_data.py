"""Training data: unpaired sampling across epochs, caching modes, several patches per loaded volume."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from monai.data import CacheDataset, Dataset, PersistentDataset
from torch.utils.data import DataLoader

from mr2ct.data import TrainPatches


def _ids(n: int, offset: int = 0) -> list[dict[str, torch.Tensor]]:
    return [{"image": torch.tensor(offset + i)} for i in range(n)]


def _epochs(ds: TrainPatches, n_epochs: int, num_workers: int = 0) -> list[list[tuple[int, int]]]:
    loader = DataLoader(ds, batch_size=1, shuffle=True, num_workers=num_workers)
    return [[(int(b["a"]), int(b["b"])) for b in loader] for _ in range(n_epochs)]


@pytest.mark.parametrize("n_a, n_b", [(8, 3), (3, 8)])
def test_unpaired_longer_domain_once_per_epoch_partners_change(n_a, n_b):
    torch.manual_seed(0)
    epochs = _epochs(TrainPatches(_ids(n_a), _ids(n_b, 100)), n_epochs=6)
    longer, n_long = (0, n_a) if n_a >= n_b else (1, n_b)
    offset = 0 if longer == 0 else 100
    for pairs in epochs:
        assert sorted(p[longer] for p in pairs) == list(range(offset, offset + n_long))  # each exactly once
    assert len({tuple(sorted(pairs)) for pairs in epochs}) == len(epochs)  # a new A-B pairing every epoch
    assert len({tuple(p[longer] for p in pairs) for pairs in epochs}) == len(epochs)  # order reshuffled
    partners: dict[int, set[int]] = {}
    for pairs in epochs:
        for p in pairs:
            partners.setdefault(p[longer], set()).add(p[1 - longer])
    assert all(len(s) >= 2 for s in partners.values())  # no fixed partner


def test_unpaired_shorter_domain_drawn_independently_of_the_shuffle():
    """The resampled domain must not follow the longer domain's shuffled order (or repeat it per epoch)."""
    torch.manual_seed(1)
    epochs = _epochs(TrainPatches(_ids(40), _ids(4, 100)), n_epochs=25)
    counts = torch.zeros(4, 4)  # (a % 4, b) over all epochs: independent draws fill it evenly
    for pairs in epochs:
        for a, b in pairs:
            counts[a % 4, b - 100] += 1
    expected = counts.sum() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0  # 9 dof: p < 1e-3 for a dependent sampler
    assert len({tuple(b for _, b in pairs) for pairs in epochs}) == len(epochs)


def test_unpaired_workers_draw_different_partners():
    """Forked workers must not share one RNG stream (the classic numpy-in-workers bug)."""
    torch.manual_seed(0)
    ds = TrainPatches(_ids(16), _ids(5, 100))
    loader = DataLoader(ds, batch_size=8, shuffle=False, num_workers=2)
    first, second = (b["b"].tolist() for b in loader)  # worker 0 gets batch 0, worker 1 batch 1
    assert first != second


@pytest.mark.parametrize("cache, kind", [("memory", CacheDataset), ("disk", PersistentDataset), ("none", Dataset)])
def test_cache_modes_and_patches_per_volume(train_cfg, tmp_path, cache, kind):
    cfg = train_cfg(
        ["data.shape=[24,24,32]", "data.spacing=[6.0,6.0,6.0]", "data.patch_size=[16,16,16]", "data.n_train=2",
         "data.batch_size=2", "data.samples_per_volume=3", f"data.cache={cache}", f"data.cache_dir={tmp_path / 'cache'}",
         "data.patches_per_epoch=null"]
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    train = dm.datasets["train"]
    assert isinstance(train.a, kind) and isinstance(train.b, kind)
    batch = next(iter(dm.train_dataloader()))
    assert batch["a"].shape == batch["b"].shape == (2 * 3, 1, 16, 16, 16)  # 3 patches from each loaded volume
    if cache == "disk":
        assert len(list((tmp_path / "cache" / "train_a").glob("*.pt"))) == 2  # each volume loaded and stored once
    if cache == "memory":
        assert all(not isinstance(x, list) for x in train.a._cache)  # deterministic part cached, patches drawn later


def test_disk_cache_needs_a_folder(train_cfg):
    cfg = train_cfg(["data.cache=disk", "data.cache_dir=null"])
    with pytest.raises(Exception, match="cache_dir"):
        instantiate(cfg.data)


def test_workers_draw_different_patches(train_cfg):
    """Each DataLoader worker re-seeds the MONAI random transforms (else every worker crops alike)."""
    cfg = train_cfg(
        ["data.shape=[24,24,32]", "data.spacing=[6.0,6.0,6.0]", "data.patch_size=[8,8,8]", "data.batch_size=1",
         "data.num_workers=2", "data.augment.rotation_prob=0", "data.augment.noise_prob=0", "data.patches_per_epoch=null"]
    )
    dm = instantiate(cfg.data)
    same = {"seed": 0, "modality": "mri"}
    dm.records = lambda split: [dict(same), dict(same)] if split in ("train_a", "train_b") else []  # one volume twice
    dm.setup("fit")
    a0, a1 = (batch["a"] for batch in dm.train_dataloader())  # worker 0 serves item 0, worker 1 item 1
    assert not torch.equal(a0, a1)
