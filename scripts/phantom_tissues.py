"""Mean synthetic-CT value per phantom tissue: what a run renders cortical shell, marrow, disc, air as.

    python scripts/phantom_tissues.py outputs/train/runs/<run>/checkpoints/last.ckpt [more checkpoints]
    python scripts/phantom_tissues.py <ckpt> split=test

Translates the phantom's validation (default) or test volumes with the checkpoint's MRI->CT generator, in the
run's own contrast, window and sliding-window settings, and prints per tissue the mean HU of the synthetic CT
beside the real CT's, from the phantom's label map. Bone Dice says *that* the segmentation missed bone; this
says what the network made of each tissue (e.g. marrow brighter than the cortical shell). Phantom runs only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import numpy as np
import torch

from mr2ct.checkpoints import load_generator
from mr2ct.data.datamodules import PhantomDataModule
from mr2ct.data.phantom.anatomy import make_anatomy
from mr2ct.data.phantom.tissues import TISSUES
from mr2ct.data.transforms import unit_to_hu
from mr2ct.inference import translate_volume


def tissue_means(ckpt: str | Path, split: str = "val") -> dict[str, tuple[float, float]]:
    """Tissue name -> (mean HU of the synthetic CT, mean HU of the real CT) over the split's volumes."""
    net, cfg = load_generator(ckpt, "a2b")
    data = cfg["data"]
    window, inference = data["ct_window"], cfg["model"]["inference"]
    dm = hydra.utils.instantiate(data)  # the run's own data module, as mr2ct.evaluate builds it
    if not isinstance(dm, PhantomDataModule):
        raise ValueError(f"{ckpt}: not a phantom run")
    dataset, records = dm.paired_dataset(split), dm.records(split)
    fake: dict[str, list[np.ndarray]] = {k: [] for k in TISSUES}
    real: dict[str, list[np.ndarray]] = {k: [] for k in TISSUES}
    with torch.inference_mode():
        for record, sample in zip(records, dataset):
            a = torch.as_tensor(sample["a"])[None]
            out = translate_volume(net, a, roi_size=data["patch_size"], overlap=inference["overlap"],
                                   sw_batch_size=inference["sw_batch_size"], mode=inference["mode"])
            hu_fake = unit_to_hu(out[0, 0], window).numpy()
            hu_real = unit_to_hu(torch.as_tensor(sample["b"])[0], window).numpy()
            labels = make_anatomy(data["shape"], data["spacing"], record["seed"])
            for name, label in TISSUES.items():
                inside = labels == label
                if inside.any():
                    fake[name].append(hu_fake[inside])
                    real[name].append(hu_real[inside])
    return {k: (float(np.concatenate(fake[k]).mean()), float(np.concatenate(real[k]).mean())) for k in TISSUES if fake[k]}


def main(argv: list[str]) -> int:
    split = "val"
    ckpts = []
    for arg in argv:
        if arg.startswith("split="):
            split = arg.split("=", 1)[1]
        else:
            ckpts.append(arg)
    if not ckpts or split not in ("val", "test"):
        sys.exit("mr2ct: error: usage: python scripts/phantom_tissues.py CKPT [CKPT ...] [split=val|test]")
    for ckpt in ckpts:
        if not Path(ckpt).is_file():
            sys.exit(f"mr2ct: error: no checkpoint at {ckpt}")
        try:
            means = tissue_means(ckpt, split)
        except (KeyError, ValueError) as err:
            sys.exit(f"mr2ct: error: {err}")
        print(f"{ckpt} ({split}): synthetic / real CT, mean HU")
        print("  " + "  ".join(f"{name} {f:.0f}/{r:.0f}" for name, (f, r) in means.items()))
        print(f"  cortical - trabecular: {means['cortical'][0] - means['trabecular'][0]:+.0f} HU (real: {means['cortical'][1] - means['trabecular'][1]:+.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
