"""Whole-volume translation: shape/affine/orientation round trip, HU output, refusal to overwrite, the CLI."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_train_cfg, run_cli, run_tool_here, tiny
from mr2ct.checkpoints import load_generator
from mr2ct.config import CONFIG_DIR
from mr2ct.data.phantom import make_phantom
from mr2ct.inference import NumericsChooser, Preprocessing, inference_numerics, translate_array, translate_volume
from mr2ct.translate import run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint laid out as training writes it (untrained weights: this tests plumbing, not quality)."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = compose_train_cfg(tiny(), root / "run")
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="partial")
    run_config = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k != "hydra"}
    path = root / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "mr2ct_config": run_config}, path)
    GlobalHydra.instance().clear()
    return path


@pytest.fixture(scope="module")
def mri():
    return make_phantom((24, 20, 28), (6.0, 6.0, 6.0), seed=5).mri


def test_load_generator_rebuilds_weights(ckpt):
    g_ab, cfg = load_generator(ckpt, "a2b")
    g_ba, _ = load_generator(ckpt, "b2a")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(next(iter(g_ab.state_dict().values())), state[f"g_ab.{next(iter(g_ab.state_dict()))}"])
    assert not torch.equal(next(iter(g_ab.parameters())), next(iter(g_ba.parameters())))
    assert cfg["data"]["patch_size"] == [16, 16, 16] and not g_ab.training


class TimedNet(torch.nn.Module):
    """Doubles its input; a call takes 20 ms in its ``slow`` layout (that of its 5-D weight) or precision (under
    bf16 autocast or not). Records the (precision, layout) of each call."""

    def __init__(self, slow: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2, 3, 2, 2, 2))
        self.conv = torch.nn.Conv3d(1, 1, 1)
        self.slow, self.seen, self.conv_dtypes = slow, [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = "contiguous" if self.w.is_contiguous() else "channels_last"
        precision = "bf16-mixed" if torch.is_autocast_enabled("cpu") else "32-true"
        self.seen.append((precision, layout))
        self.conv_dtypes.append(self.conv.weight.dtype)
        if self.slow in (layout, precision):
            time.sleep(0.02)
        return x * 2


@pytest.mark.parametrize("slow,kept", [("contiguous", "channels_last"), ("channels_last", "contiguous")])
def test_layout_chooser_tries_both_layouts_then_keeps_the_faster(slow, kept):
    net = TimedNet(slow)
    chooser = NumericsChooser(net, ("32-true",), rounds=2)
    x = torch.randn(1, 1, 4, 5, 6)
    outs = [chooser(x) for _ in range(10)]
    assert all(torch.equal(o, 2 * x) for o in outs)  # every window's output is used
    assert [f for _, f in net.seen[:6]] == ["contiguous"] * 3 + ["channels_last"] * 3  # each: a warm-up, then two timed windows
    assert chooser.choice == ("32-true", kept) and [f for _, f in net.seen[6:]] == [kept] * 4
    assert net.w.is_contiguous() == (kept == "contiguous")  # the module is left in the layout kept
    assert all(len(t) == 2 for t in chooser.seconds.values())


@pytest.mark.parametrize("slow,kept", [("32-true", "bf16-mixed"), ("bf16-mixed", "32-true")])
def test_precision_chooser_times_fp32_and_bf16_windows_then_keeps_the_faster(slow, kept):
    net = TimedNet(slow)
    chooser = NumericsChooser(net, ("32-true", "bf16-mixed"), ("contiguous",), rounds=2)
    x = torch.randn(1, 1, 4, 5, 6)
    outs = [chooser(x) for _ in range(9)]
    assert all(torch.equal(o, 2 * x) for o in outs)
    assert [p for p, _ in net.seen[:6]] == ["32-true"] * 3 + ["bf16-mixed"] * 3  # the bf16 windows ran under autocast
    assert chooser.choice == (kept, "contiguous") and [p for p, _ in net.seen[6:]] == [kept] * 3
    # bf16 windows hold the conv weights in bf16 (other parameters stay fp32); restore() brings back the fp32 ones
    assert net.conv_dtypes == [torch.bfloat16 if p == "bf16-mixed" else torch.float32 for p, _ in net.seen]
    assert net.w.dtype == torch.float32
    weight = net.conv.weight.detach().clone()
    chooser.restore()
    assert net.conv.weight.dtype == torch.float32 and (kept == "32-true" or not torch.equal(weight.float(), net.conv.weight))
    assert not torch.is_autocast_enabled("cpu")  # autocast ends with each window


def test_numerics_for_translation(monkeypatch):
    cpu = torch.device("cpu")
    for fast in (True, False):
        monkeypatch.setattr("mr2ct.inference.bf16_fast", lambda device, fast=fast: fast)
        # precision auto is timed where bf16 is native, fp32 elsewhere, whatever the run trained with
        assert inference_numerics(cpu) == ("auto" if fast else "32-true", "auto")
    assert inference_numerics(cpu, "bf16-mixed", "channels_last") == ("bf16-mixed", "channels_last")  # explicit values win
    assert inference_numerics(cpu, model_path="g.onnx") == ("32-true", "contiguous")  # exports run as exported
    for bad in ({"memory_format": "nhwc"}, {"precision": "fp16"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            inference_numerics(cpu, **bad)


def test_auto_numerics_translate_as_fp32_contiguous_does_and_leave_the_weights_as_they_were(ckpt, monkeypatch):
    g_ab, run_config = load_generator(ckpt, "a2b")
    vol = torch.rand(1, 1, 32, 32, 40) * 2 - 1  # 27 windows of 16³: the choice is made after 6
    kwargs = {"roi_size": [16, 16, 16], "overlap": 0.25, "sw_batch_size": 1}
    plain = translate_volume(g_ab, vol, memory_format="contiguous", **kwargs)
    timed = translate_volume(g_ab, vol, memory_format="auto", **kwargs)
    torch.testing.assert_close(timed, plain, rtol=0, atol=1e-5)
    # 12 windows of the 27 timed; bf16 windows differ from fp32 ones by bf16's rounding only
    before = {k: v.clone() for k, v in g_ab.state_dict().items()}
    chosen = []
    monkeypatch.setattr(NumericsChooser, "restore", lambda self, orig=NumericsChooser.restore: (chosen.append(self.choice), orig(self)))
    both = translate_volume(g_ab, vol, precision="auto", memory_format="auto", **kwargs)
    torch.testing.assert_close(both, plain, rtol=0, atol=2e-2)
    assert chosen[0] is not None
    # the bf16 windows ran with bf16 conv weights; the fp32 ones are back, exactly, and usable outside inference mode
    after = g_ab.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) and not after[k].is_inference() for k, v in before.items())
    bf16 = translate_volume(g_ab, vol, precision="bf16-mixed", memory_format="contiguous", **kwargs)
    torch.testing.assert_close(bf16, plain, rtol=0, atol=2e-2)
    assert all(torch.equal(g_ab.state_dict()[k], v) for k, v in before.items())


def test_output_keeps_shape_affine_and_input_orientation(ckpt, mri):
    gen, run_config = load_generator(ckpt)
    prep = Preprocessing.from_run_config(run_config)
    ras = np.diag([6.0, 6.0, 6.0, 1.0])
    out_ras = translate_array(gen, mri, ras, prep, [16, 16, 16])
    assert out_ras.shape == mri.shape and out_ras.dtype == np.float32
    assert -1024.0 <= out_ras.min() and out_ras.max() <= 3000.0 and out_ras.std() > 0  # HU
    # the same anatomy stored as (Z, Y, X) with X and Y flipped: LPI-like voxel order
    odd = np.ascontiguousarray(np.transpose(mri[::-1, ::-1, :], (2, 1, 0)))
    odd_affine = np.array([[0, 0, -6.0, 138.0], [0, -6.0, 0, 114.0], [6.0, 0, 0, 0], [0, 0, 0, 1]])
    out_odd = translate_array(gen, odd, odd_affine, prep, [16, 16, 16])
    assert out_odd.shape == odd.shape
    # the network saw the same RAS volume both times; the result comes back in the input's voxel order
    np.testing.assert_allclose(np.transpose(out_odd, (2, 1, 0))[::-1, ::-1, :], out_ras, atol=1e-3)


class _ShiftOneVoxel(torch.nn.Module):
    """Moves the image by one voxel along X: a shift of one voxel *of the grid the network sees* (mm depend on it)."""

    def forward(self, x):
        return torch.roll(x, shifts=1, dims=2)


def test_resampling_runs_are_inverted_to_the_input_grid(ckpt, mri):
    gen, run_config = load_generator(ckpt)
    prep = Preprocessing.from_run_config(run_config, spacing=[9.0, 9.0, 9.0])
    out = translate_array(gen, mri, np.diag([6.0, 6.0, 6.0, 1.0]), prep, [16, 16, 16])
    assert out.shape == mri.shape and np.isfinite(out).all()

    # the network really runs on the resampled grid: a one-voxel shift there is 3 mm, half a native voxel
    ras = np.diag([6.0, 6.0, 6.0, 1.0])
    native = translate_array(_ShiftOneVoxel(), mri, ras, Preprocessing(), [24, 20, 28], overlap=0.0)
    fine = translate_array(_ShiftOneVoxel(), mri, ras, Preprocessing(spacing=[3.0, 6.0, 6.0]), [48, 20, 28], overlap=0.0)
    assert fine.shape == native.shape == mri.shape
    plain = translate_array(_Identity(), mri, ras, Preprocessing(), [24, 20, 28], overlap=0.0)
    np.testing.assert_allclose(native[1:], plain[:-1], atol=1e-3)  # one native voxel
    inner = slice(3, -3)
    half = (plain + np.roll(plain, 1, axis=0)) / 2  # half a native voxel
    err = {name: float(np.abs(fine[inner] - ref[inner]).mean()) for name, ref in
           {"half": half, "none": plain, "full": np.roll(plain, 1, axis=0)}.items()}
    assert err["half"] < 0.6 * min(err["none"], err["full"]), err


def _cfg(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("translate", overrides=overrides)


def test_cli_writes_sct_and_bone_and_never_overwrites(ckpt, mri, tmp_path, capsys):
    affine = np.array([[-6.0, 0, 0, 70], [0, 0, 6.0, -40], [0, -6.0, 0, 25], [0, 0, 0, 1]])  # not RAS
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "case1.nii.gz"
    nib.save(nib.Nifti1Image(mri, affine), src)
    out_dir = tmp_path / "out"
    res = run_cli(["mr2ct.translate", f"ckpt={ckpt}", f"input={tmp_path / 'in'}", f"output={out_dir}", "segment=true", "progress=false", f"hydra.run.dir={tmp_path / 'h'}"])
    assert res.returncode == 0, res.stderr[-2000:]
    sct, bone = nib.load(out_dir / "case1.nii.gz"), nib.load(out_dir / "case1_bone.nii.gz")
    assert np.array_equal(sct.affine, nib.load(src).affine) and np.array_equal(bone.affine, sct.affine)
    assert sct.shape == mri.shape and sct.get_data_dtype() == np.int16 and bone.get_data_dtype() == np.uint8
    data = np.asarray(sct.dataobj)
    assert -1024 <= data.min() and data.max() <= 3000

    stamp = (out_dir / "case1.nii.gz").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run(_cfg([f"ckpt={ckpt}", f"input={src}", f"output={out_dir / 'case1.nii.gz'}", "progress=false"]))
    assert (out_dir / "case1.nii.gz").stat().st_mtime_ns == stamp
    run(_cfg([f"ckpt={ckpt}", f"input={src}", f"output={out_dir / 'case1.nii.gz'}", "progress=false", "overwrite=true", "dtype=float32"]))
    assert nib.load(out_dir / "case1.nii.gz").get_data_dtype() == np.float32
    GlobalHydra.instance().clear()

    bad = run_tool_here(["mr2ct.translate", f"ckpt={tmp_path / 'missing.ckpt'}", f"input={src}", f"output={tmp_path / 'x.nii.gz'}", f"hydra.run.dir={tmp_path / 'h2'}"], capsys)
    assert bad.returncode == 2 and "mr2ct: error: checkpoint not found" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_tool_here(["mr2ct.translate", f"ckpt={ckpt}", f"input={src}", f"output={tmp_path / 'y.nii.gz'}", "precision=fp16",
                         f"hydra.run.dir={tmp_path / 'h3'}"], capsys)
    assert bad.returncode == 2 and "mr2ct: error: precision must be one of" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "y.nii.gz").exists()


def test_every_format_in_gives_the_same_synthetic_ct_and_a_folder_run_skips_bad_files(ckpt, mri, tmp_path, capsys):
    """NIfTI, MetaImage, NRRD and a DICOM series of one MRI: the same sCT, each written in the format asked."""
    from test_formats import write_dicom_series

    from mr2ct.formats import read_volume, write_volume

    affine = np.array([[0, -2.0, 0, 40], [1.5, 0, 0, -30], [0, 0, 2.5, 12], [0, 0, 0, 1]])
    vol = np.rint(mri)  # integer-valued: exact in DICOM's int16 pixels
    src = tmp_path / "in"
    write_volume(vol, affine, src / "a.nii.gz")
    write_volume(vol, affine, src / "b.mha")
    write_volume(vol, affine, src / "c.nrrd")
    write_dicom_series(src / "d", vol, affine)
    nib.save(nib.Nifti1Image(np.where(vol > vol.mean(), np.nan, vol).astype(np.float32), affine), src / "e_nan.nii.gz")
    # numerics fixed: `auto` times the candidates afresh in each run and may keep another layout (last bits differ)
    fixed = ["precision=32-true", "memory_format=contiguous"]
    res = run_cli(["mr2ct.translate", f"ckpt={ckpt}", f"input={src}", f"output={tmp_path / 'out'}", "progress=false", f"hydra.run.dir={tmp_path / 'h'}", *fixed])
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("mr2ct: error:")]
    assert "e_nan.nii.gz: " in errors[0] and "NaN" in errors[0] and "1 of 5 inputs failed" in errors[-1], errors
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["a.nii.gz", "b.mha", "c.nrrd", "d.nii.gz"]  # the good ones, each in its input's format (DICOM -> NIfTI)
    results = [read_volume(tmp_path / "out" / name) for name in written]
    for (array, out_affine), name in zip(results, written):
        np.testing.assert_allclose(out_affine, affine, atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(array, results[0][0], err_msg=name)

    one = run_tool_here(["mr2ct.translate", f"ckpt={ckpt}", f"input={src / 'd'}", f"output={tmp_path / 'sct.mha'}", "progress=false", f"hydra.run.dir={tmp_path / 'h2'}", *fixed], capsys)
    assert one.returncode == 0 and (tmp_path / "sct.mha").is_file(), one.stderr[-2000:]  # a file, not a folder named sct.mha
    np.testing.assert_array_equal(read_volume(tmp_path / "sct.mha")[0], results[0][0])


class _Identity(torch.nn.Module):
    """A 'generator' that returns its input: what comes out is exactly the preprocessing and its inverse."""

    def forward(self, x):
        return x


def test_intensity_pipeline_is_percentile_scaling_in_and_hu_out(mri):
    """MRI -> [-1, 1] by the run's percentiles (clipped), network, -> HU by the CT window; CT -> units for b2a."""
    prep = Preprocessing(ct_window=(-1024.0, 3000.0), mri_percentiles=(5.0, 95.0))
    ras = np.diag([6.0, 6.0, 6.0, 1.0])
    out = translate_array(_Identity(), mri, ras, prep, [16, 16, 16], overlap=0.5)
    lo, hi = np.percentile(mri, [5.0, 95.0])
    expected = (np.clip((mri - lo) / (hi - lo) * 2 - 1, -1, 1) + 1) / 2 * 4024 - 1024
    np.testing.assert_allclose(out, expected, atol=0.5)  # HU; the identity network makes any skipped step visible
    ct = np.clip(mri * 3 - 1000, -1024, 3000).astype(np.float32)
    back = translate_array(_Identity(), ct, ras, prep, [16, 16, 16], direction="b2a", overlap=0.5)
    np.testing.assert_allclose(back, (ct + 1024) / 4024 * 2 - 1, atol=1e-4)  # CT window in, normalised units out


def test_cpu_translation_bounds_the_heap_unless_told_not_to(ckpt, mri, tmp_path, monkeypatch):
    import mr2ct.inference

    calls = []
    monkeypatch.setattr(mr2ct.inference, "fixed_mmap_threshold", lambda: calls.append(1) or True)
    src = tmp_path / "mri.nii.gz"
    nib.save(nib.Nifti1Image(mri, np.eye(4)), src)
    for flag, expected in (("true", 1), ("false", 0)):
        calls.clear()
        run(_cfg([f"ckpt={ckpt}", f"input={src}", f"output={tmp_path / f'sct_{flag}.nii.gz'}", "progress=false", "device=cpu", f"bounded_heap={flag}"]))
        assert len(calls) == expected, flag
    GlobalHydra.instance().clear()
