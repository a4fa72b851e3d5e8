"""Where training patches come from: body-aware centres, registered pairs, epochs of a fixed size, MRI contrast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from mr2ct.data.phantom import make_anatomy, render_mri, TISSUES
from mr2ct.data.transforms import hu_to_unit, patch_transforms

SMALL = ["data.shape=[24,24,32]", "data.spacing=[6.0,6.0,6.0]", "data.patch_size=[16,16,16]", "data.batch_size=1",
         "data.augment.rotation_prob=0", "data.augment.noise_prob=0"]


@pytest.mark.parametrize("prob", [0.5, 0.9])
def test_body_sampler_puts_at_least_the_configured_share_of_centres_in_the_body(prob):
    vol = torch.full((1, 32, 32, 32), -1.0)
    body = torch.zeros((1, 32, 32, 32))
    body[:, 13:19, 13:19, 13:19] = 1  # 216 of 32768 voxels: random centres would hit it < 1 % of the time
    vol[body > 0] = 1.0
    xform = patch_transforms(["image"], (8, 8, 8), {}, samples_per_volume=400, masks=["image_body"], body_prob=prob)
    xform.set_random_state(seed=0)
    patches = xform({"image": vol, "image_body": body})
    centre = [float(p["image_body"][0, 4, 4, 4]) for p in patches]
    assert np.mean(centre) >= prob - 0.06  # binomial sd at n=400 is at most 0.025
    for p in patches:  # one crop for image and mask
        assert torch.equal(p["image"][0] > 0, p["image_body"][0] > 0.5)


def test_without_body_prob_centres_are_uniform():
    vol, body = torch.zeros((1, 32, 32, 32)), torch.zeros((1, 32, 32, 32))
    body[:, 13:19, 13:19, 13:19] = 1
    xform = patch_transforms(["image"], (8, 8, 8), {}, samples_per_volume=400, masks=["image_body"], body_prob=0.0)
    xform.set_random_state(seed=0)
    assert np.mean([float(p["image_body"][0, 4, 4, 4]) for p in xform({"image": vol, "image_body": body})]) < 0.1


def test_patches_per_epoch_fixes_the_epoch_length_whatever_the_volume_count(train_cfg):
    lengths = []
    for n in (2, 6):
        dm = instantiate(train_cfg([*SMALL, f"data.n_train={n}", "data.patches_per_epoch=10"]).data)
        dm.setup("fit")
        lengths.append((len(dm.datasets["train"]), len(dm.train_dataloader())))
    assert lengths == [(10, 10), (10, 10)]
    dm = instantiate(train_cfg([*SMALL, "data.n_train=3", "data.patches_per_epoch=null"]).data)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3  # null: one patch per training volume


def test_phantom_pairs_are_the_same_crop_of_one_anatomy_and_the_rest_stays_unpaired(train_cfg):
    dm = instantiate(train_cfg([*SMALL, "data.n_train=4", "data.paired_fraction=0.5", "data.body_patch_prob=0.9", "data.patches_per_epoch=null"]).data)
    assert [len(dm.records(s)) for s in ("train_a", "train_b", "train_pairs")] == [2, 2, 2]
    seeds = {s: {r["seed"] for r in dm.records(s)} for s in ("train_a", "train_b", "train_pairs", "val", "test")}
    assert not seeds["train_pairs"] & (seeds["train_a"] | seeds["train_b"] | seeds["val"] | seeds["test"])
    dm.setup("fit")
    ds = dm.datasets["train"]
    kinds = [ds[i] for i in range(len(ds))]
    assert [bool(k[0]["paired"]) for k in kinds] == [False, False, True, True]
    for item in (k[0] for k in kinds if k[0]["paired"]):
        assert torch.equal(item["mask_a"], item["mask_b"])  # same anatomy, same crop
        air_ct = item["b"] < hu_to_unit(torch.tensor(-500.0), (-1024.0, 3000.0))
        agree = (air_ct == (item["mask_b"] < 0.5)).float().mean()
        assert agree > 0.97, agree  # the CT's air is outside the body (up to partial-volume voxels)
    for item in (k[0] for k in kinds if not k[0]["paired"]):
        assert not torch.equal(item["mask_a"], item["mask_b"])  # different anatomies


def test_pairs_only_and_mixed_draws_with_a_fixed_epoch(train_cfg):
    dm = instantiate(train_cfg([*SMALL, "data.n_train=2", "data.paired_fraction=1.0", "data.patches_per_epoch=5"]).data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert bool(batch["paired"].all()) and batch["mask_a"].shape == batch["a"].shape
    assert len(dm.datasets["train"]) == 5


def test_t1_rendering_inverts_fluid_and_keeps_bone_dark():
    labels = make_anatomy((48, 48, 64), (3.0, 3.0, 3.0), 5)
    t1, t2 = render_mri(labels, 5, "t1"), render_mri(labels, 5, "t2")
    mean = lambda img, tissue: float(img[labels == TISSUES[tissue]].mean())  # noqa: E731
    assert mean(t2, "csf") > mean(t2, "fat") and mean(t1, "csf") < mean(t1, "muscle") < mean(t1, "fat")
    assert mean(t1, "trabecular") > mean(t1, "muscle") and mean(t1, "cortical") < mean(t1, "csf")
    with pytest.raises(ValueError, match="contrast"):
        render_mri(labels, 5, "pd")


@pytest.mark.parametrize("domains", [["mri"], ["ct"], ["mri", "ct"]])
def test_noise_goes_only_to_the_configured_domains(train_cfg, domains):
    # the crop is the whole volume and nothing rotates, so a patch differs from the clean one only by noise
    whole = [*SMALL, "data.shape=[16,16,16]", "data.n_train=4", "data.paired_fraction=0.5", "data.patches_per_epoch=null"]
    items = {}
    for name, noise in (("clean", ["data.augment.noise_prob=0"]), ("noisy", ["data.augment.noise_prob=1", f"data.augment.noise_domains=[{','.join(domains)}]"])):
        dm = instantiate(train_cfg([*whole, *noise]).data)
        dm.setup("fit")
        torch.manual_seed(0)  # the same unpaired CT drawn for each MRI in both runs
        items[name] = [dm.datasets["train"][i][0] for i in range(4)]
    for clean, noisy in zip(items["clean"], items["noisy"]):  # two unpaired draws, then two pairs
        for key, domain in (("a", "mri"), ("b", "ct")):
            assert torch.equal(clean[key], noisy[key]) is (domain not in domains), (key, bool(clean["paired"]))

