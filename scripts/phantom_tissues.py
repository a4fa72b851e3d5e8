"""Mean synthetic-CT value per phantom tissue: what a run renders cortical shell, marrow, disc, air as.

    python scripts/phantom_tissues.py outputs/train/runs/<run>/checkpoints/last.ckpt [more checkpoints]
    python scripts/phantom_tissues.py <ckpt> split=test

Translates the phantom's validation (default) or test volumes with the checkpoint's MRI->CT generator, in the
run's own contrast, window and sliding-window settings, and prints per tissue the mean HU of the synthetic CT
beside the real CT's, from the phantom's label map. Bone Dice says *that* the segmentation missed bone; this
says what the network made of each tissue (e.g. marrow brighter than the cortical shell). Phantom runs only.

It also prints what the evaluation's bone segmentation (``conf/evaluate.yaml``, ``bone``) finds in each: the share
of the volume its body mask keeps and its bone threshold, synthetic beside real. Air rendered above the mask's
air threshold joins the body and the multi-Otsu histogram, which moves the threshold that bone Dice depends on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf

from mr2ct.checkpoints import load_generator
from mr2ct.config import CONFIG_DIR
from mr2ct.data.datamodules import PhantomDataModule
from mr2ct.data.phantom.anatomy import make_anatomy
from mr2ct.data.phantom.tissues import TISSUES
from mr2ct.data.transforms import unit_to_hu
from mr2ct.evaluation.segmentation import body_mask, bone_threshold, segment_params
from mr2ct.inference import translate_volume


Pair = tuple[float, float]  # (synthetic CT, real CT)


def readout(ckpt: str | Path, split: str = "val") -> tuple[dict[str, Pair], dict[str, Pair]]:
    """Per tissue name, the mean HU over the split's volumes; and the evaluation's segmentation, averaged over
    the volumes: ``body_share`` (fraction of the volume in its body mask) and ``threshold`` (its bone threshold, HU)."""
    net, cfg = load_generator(ckpt, "a2b")
    data = cfg["data"]
    window, inference = data["ct_window"], cfg["model"]["inference"]
    dm = hydra.utils.instantiate(data)  # the run's own data module, as mr2ct.evaluate builds it
    if not isinstance(dm, PhantomDataModule):
        raise ValueError(f"{ckpt}: not a phantom run")
    dataset, records = dm.paired_dataset(split), dm.records(split)
    segment = segment_params(OmegaConf.load(Path(CONFIG_DIR) / "evaluate.yaml").bone)
    seg: dict[str, list[Pair]] = {"body_share": [], "threshold": []}
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
            bodies = [body_mask(hu, segment["air_threshold"]) for hu in (hu_fake, hu_real)]
            seg["body_share"].append(tuple(float(b.mean()) for b in bodies))
            seg["threshold"].append(tuple(bone_threshold(hu[b], segment["method"], segment["classes"], segment["bins"])
                                          for hu, b in zip((hu_fake, hu_real), bodies)))
            for name, label in TISSUES.items():
                inside = labels == label
                if inside.any():
                    fake[name].append(hu_fake[inside])
                    real[name].append(hu_real[inside])
    means = {k: (float(np.concatenate(fake[k]).mean()), float(np.concatenate(real[k]).mean())) for k in TISSUES if fake[k]}
    return means, {k: tuple(float(np.mean(v)) for v in zip(*pairs)) for k, pairs in seg.items()}


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
            means, seg = readout(ckpt, split)
        except (KeyError, ValueError) as err:
            sys.exit(f"mr2ct: error: {err}")
        print(f"{ckpt} ({split}): synthetic / real CT, mean HU")
        print("  " + "  ".join(f"{name} {f:.0f}/{r:.0f}" for name, (f, r) in means.items()))
        print(f"  cortical - trabecular: {means['cortical'][0] - means['trabecular'][0]:+.0f} HU (real: {means['cortical'][1] - means['trabecular'][1]:+.0f})")
        (body_f, body_r), (thr_f, thr_r) = seg["body_share"], seg["threshold"]
        print(f"  segmentation: body {body_f:.0%}/{body_r:.0%} of the volume, bone threshold {thr_f:.0f}/{thr_r:.0f} HU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
