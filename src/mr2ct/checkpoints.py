"""Checkpoints and shareable model files: the safe ways they are written and read, and generators rebuilt from them.

:func:`export` (the library behind ``python -m mr2ct.export``) writes both
generators (``g_ab.*`` MRI->CT, ``g_ba.*`` CT->MRI) as safetensors, with the generator config and
preprocessing settings in the file's metadata and beside it as ``model.json``. Such a file holds
no pickle at all; ``python -m mr2ct.translate ckpt=model.safetensors ...`` reads it.

Every torch checkpoint the project reads goes through :func:`safe_torch_load` (``weights_only=True``)
and every network named in a file is built by :func:`build_generator`, which only instantiates
classes of :mod:`mr2ct.nets`: a file can neither unpickle code nor name an arbitrary callable.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mr2ct.errors import InputError


FORMAT = "mr2ct-generators"
#: run-config entries an exported model keeps: what translate/evaluate need to preprocess like training
KEPT_DATA_KEYS = ("_target_", "orientation", "spacing", "ct_window", "mri_percentiles", "patch_size")


#: free space below which a failed checkpoint write is reported as a full disk
DISK_FULL_BYTES = 64 * 2**20


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return DISK_FULL_BYTES  # unknown: not reported as full


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``.

    Lightning's own ``_atomic_save`` stages the bytes in a ``tempfile`` (usually /tmp) and then
    ``shutil.move``s it: across file systems that move is a copy into the final path, which a kill
    can truncate. Here the temp file sits beside the target, is fsynced, and ``os.replace`` swaps it
    in (atomic on POSIX); a killed writer leaves at most a stray ``.tmp`` file. A full disk raises
    :class:`InputError` (one line from the tools) and removes the partial temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # torch's zip writer reports a full disk as "unexpected pos": read the disk before the temp file frees it
        free = _free_bytes(path.parent)
        if getattr(err, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and free >= DISK_FULL_BYTES:
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise InputError(
            f"{path}: the disk is full ({free / 2**20:.0f} MiB free after writing {written / 2**20:.0f} MiB of this "
            f"checkpoint); {kept}; free space and resume with ckpt=<the run folder>"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load a torch file with ``weights_only=True``: tensors, numbers, strings and containers only.

    Raises:
        FileNotFoundError: no such file.
        InputError: the file would execute code when unpickled (refused), or is corrupt / truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # garbage bytes read as a legacy pickle, not a code-carrying one
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"checkpoint {path} is corrupt or truncated ({first})") from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        for line in str(err).splitlines():
            if "GLOBAL" in line or "Unsupported" in line:
                reason = line.strip()
                break
        raise InputError(
            f"refusing to load checkpoint {path}: it contains pickled objects that could run code "
            f"({reason}); only checkpoints of plain tensors and numbers are loaded"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"checkpoint {path} is corrupt or truncated ({first})") from None


def check_state_dict_compatible(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], source: str, what: str = "model") -> None:
    """Raise :class:`InputError` naming the first mismatch when ``found`` cannot load into ``expected``."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [(k, tuple(found[k].shape), tuple(v.shape)) for k, v in expected.items() if k in found and tuple(found[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    if shapes:
        k, got, want = shapes[0]
        detail = f"{k} has shape {list(got)}, the configured {what} expects {list(want)}"
    elif missing:
        detail = f"{len(missing)} weights missing, e.g. {missing[0]}"
    else:
        detail = f"{len(unexpected)} unknown weights, e.g. {unexpected[0]}"
    raise InputError(f"checkpoint {source} belongs to another {what} architecture: {detail}")


def build_generator(gen_cfg: Mapping[str, Any], source: str | Path) -> nn.Module:
    """Instantiate a generator config read from a file, allowing only classes of :mod:`mr2ct.nets`.

    A config's ``_target_`` is an import path that Hydra would call: a shared file naming
    ``os.system`` would run it. Only the top-level target may be set, and only to a network class.
    """
    import mr2ct.nets

    def nested_targets(value: Any) -> bool:
        if isinstance(value, Mapping):
            return any(k == "_target_" or nested_targets(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return any(nested_targets(v) for v in value)
        return False

    if not isinstance(gen_cfg, Mapping):
        raise InputError(f"{source}: the generator config is not a mapping")
    target = str(gen_cfg.get("_target_", ""))
    module, _, name = target.rpartition(".")
    cls = getattr(mr2ct.nets, name, None) if module.startswith("mr2ct.nets") else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or any(nested_targets(v) for k, v in gen_cfg.items() if k != "_target_"):
        raise InputError(f"{source}: refusing generator _target_ {target!r}: only network classes of mr2ct.nets are built from a file")
    kwargs = {k: v for k, v in gen_cfg.items() if not k.startswith("_")}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise InputError(f"{source}: generator config does not fit {name}: {err}") from None


def export_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a training run's config an exported model carries (no data paths, no losses)."""
    data = run_config.get("data", {})
    return {
        "format": FORMAT,
        "version": 1,
        "generator": dict(run_config["generator"]),
        "data": {k: data[k] for k in KEPT_DATA_KEYS if k in data},
        "model": {"inference": dict(run_config.get("model", {}).get("inference", {}))},
    }


def model_card(run_config: Mapping[str, Any], ckpt: Mapping[str, Any], ckpt_path: Path, evaluation: Mapping[str, Any] | None) -> str:
    """A Markdown model card: what the model was trained on and how, its evaluation when known, its limits."""
    data, model = run_config.get("data", {}), run_config.get("model", {})
    source = str(data.get("_target_", "?")).rsplit(".", 1)[-1]
    if "Phantom" in source:
        trained_on = (f"procedural spine phantoms (mr2ct.data.phantom), {data.get('n_train')} volumes per domain, "
                      f"MRI contrast {data.get('mri_contrast', 't2')}, paired share {data.get('paired_fraction', 0)}")
    else:
        folders = {k: data.get(k) for k in ("train_a", "train_b", "train_pairs_a", "train_pairs_b", "split_file") if data.get(k)}
        trained_on = "volume folders " + ", ".join(f"{k}={Path(str(v)).name}" for k, v in folders.items())
    losses = ", ".join(f"{name} (weight {cfg.get('weight', '-')})" for name, cfg in (run_config.get("loss") or {}).items() if isinstance(cfg, Mapping))
    gen = run_config.get("generator", {})
    lines = [
        "# mr2ct model card",
        "",
        "**For research only; not a medical device and not for diagnosis or treatment planning.** A synthetic CT",
        "made from an MRI can show bone where there is none and miss bone that is there; check it against images.",
        "",
        "## Model",
        f"- Generators: `{str(gen.get('_target_', '?')).rsplit('.', 1)[-1]}` MRI->CT (`g_ab`) and CT->MRI (`g_ba`), "
        f"channels {gen.get('channels')}, norm {gen.get('norm')}",
        f"- Losses: {losses or '?'}",
        f"- Training: {ckpt.get('epoch', '?')} epochs, {int(ckpt.get('global_step', 0)) // 2} generator steps, "
        f"patch {data.get('patch_size')}, batch {data.get('batch_size')}, lr_g {model.get('lr_g')}",
        f"- Source checkpoint: `{ckpt_path.name}`",
        "",
        "## Data",
        f"- Trained on: {trained_on}",
        f"- Preprocessing: orientation {data.get('orientation', 'RAS')}, spacing {data.get('spacing')}, CT window {data.get('ct_window')} HU, "
        f"MRI percentiles {data.get('mri_percentiles')}",
        "",
        "## Evaluation",
    ]
    metrics = (evaluation or {}).get("metrics") or {}
    if metrics:
        lines.append(f"`mr2ct-evaluate` on {evaluation.get('n_cases')} {evaluation.get('split')} cases (mean ± sd):")
        lines += [f"- {name}: {m['mean']:.4g} ± {m['std']:.2g}" for name, m in metrics.items()]
    else:
        lines.append("Not evaluated when exported: run `mr2ct-evaluate ckpt=...` on held-out paired data.")
    return "\n".join(lines) + "\n"


def export(
    ckpt_path: str | Path,
    output: str | Path,
    overwrite: bool = False,
    evaluation: str | Path | None = None,
    fmt: str = "safetensors",
    direction: str = "a2b",
) -> tuple[Path, Path]:
    """Write a training checkpoint's generators as ``output`` in ``fmt``, plus ``output.json`` (config) and a model
    card ``output.md`` quoting ``evaluation`` (a ``summary.json`` of evaluate; default: ``<run>/evaluate/summary.json``
    when that exists). Every check runs before anything is written."""
    from mr2ct.deploy import DEPLOY_FORMATS

    output = Path(output)
    suffix = {"safetensors": ".safetensors", **DEPLOY_FORMATS}.get(fmt)
    if suffix is None:
        raise InputError(f"format must be safetensors, onnx or torchscript, got {fmt!r}")
    if not output.name.endswith(suffix):
        raise InputError(f"format={fmt} writes a {suffix} file: output must end with {suffix}, got {output}")
    meta_path, card_path = output.with_suffix(".json"), output.with_suffix(".md")
    for path in (output, meta_path, card_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"output exists: {path} (pass overwrite=true to replace it)")
    summary = Path(evaluation) if evaluation else Path(ckpt_path).resolve().parent.parent / "evaluate" / "summary.json"
    if evaluation and not summary.is_file():
        raise FileNotFoundError(f"evaluation summary not found: {summary}")
    ckpt = safe_torch_load(ckpt_path)
    run_config = ckpt.get("mr2ct_config") if isinstance(ckpt, Mapping) else None
    if not run_config or "generator" not in run_config:
        raise InputError(f"{ckpt_path} holds no mr2ct_config: not a checkpoint written by `python -m mr2ct.train`")
    config = export_config(run_config)
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        _write_safetensors(ckpt, config, ckpt_path, output)
    else:
        config = {**config, "direction": direction}
        _write_deployable(ckpt_path, config, output, fmt, direction)
    meta_path.write_text(json.dumps(config, indent=2))
    card_path.write_text(model_card(run_config, ckpt, Path(ckpt_path), json.loads(summary.read_text()) if summary.is_file() else None))
    return output, meta_path


def _write_safetensors(ckpt: Mapping[str, Any], config: dict[str, Any], ckpt_path: str | Path, output: Path) -> None:
    """Both generators, checked against the networks they claim to be, written atomically."""
    from safetensors.torch import save_file

    weights = {
        k.replace("_orig_mod.", ""): v.detach().cpu().contiguous()
        for k, v in ckpt["state_dict"].items()
        if k.startswith(("g_ab.", "g_ba."))
    }
    for prefix in ("g_ab.", "g_ba."):
        build = build_generator(config["generator"], ckpt_path)
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        check_state_dict_compatible(build.state_dict(), own, str(ckpt_path), "generator")
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        save_file(weights, str(tmp), metadata={"mr2ct": json.dumps(config)})
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def _write_deployable(ckpt_path: str | Path, config: dict[str, Any], output: Path, fmt: str, direction: str) -> None:
    """One generator as ONNX or TorchScript, traced on a patch of the training size, its config inside the file."""
    from mr2ct.deploy import export_onnx, export_torchscript

    generator, _ = load_generator(ckpt_path, direction)
    patch = config["data"].get("patch_size") or [32, 32, 32]
    (export_onnx if fmt == "onnx" else export_torchscript)(generator, config, output, patch)


def load_exported(path: str | Path, direction: str = "a2b", map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(generator in eval mode, config) from an exported .safetensors file; see :func:`load_generator`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    prefix = "g_ab." if direction == "a2b" else "g_ba."
    device = str(map_location)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"model file {path} is corrupt or not safetensors ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    text = meta.get("mr2ct")
    sidecar = path.with_suffix(".json")
    if text is None and sidecar.is_file():
        text = sidecar.read_text()
    try:
        config = json.loads(text) if text else None
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "generator" not in config:
        raise InputError(f"{path} carries no mr2ct generator config (export it with `python -m mr2ct.export`)")
    if not state:
        raise InputError(f"{path} holds no {prefix[:-1]} weights")
    generator = build_generator(config["generator"], path)
    check_state_dict_compatible(generator.state_dict(), state, str(path), "generator")
    generator.load_state_dict(state)
    return generator.eval(), config


def load_generator(ckpt_path: str | Path, direction: str = "a2b", map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild one generator of a training checkpoint: (generator in eval mode, the run's config dict).

    The checkpoint holds the resolved training config under ``mr2ct_config`` (written by
    ``CycleGAN.on_save_checkpoint``); its ``generator`` entry is instantiated and the ``g_ab``
    (``direction="a2b"``, MRI->CT) or ``g_ba`` weights loaded. Read with ``weights_only=True``: a
    checkpoint cannot run code when it is loaded.
    """
    if direction not in ("a2b", "b2a"):
        raise ValueError(f"direction must be 'a2b' or 'b2a', got {direction!r}")
    path = Path(ckpt_path)
    if path.name.endswith(".safetensors"):  # exported by `python -m mr2ct.export`: no pickle at all
        return load_exported(path, direction, map_location)
    if path.suffix in (".onnx", ".pt"):  # deployable exports: ONNX Runtime or TorchScript, no mr2ct network code
        from mr2ct.deploy import load_deployed

        return load_deployed(path, direction)
    ckpt = safe_torch_load(path, map_location)  # missing, corrupt or code-carrying files: one clear error
    run_config = ckpt.get("mr2ct_config") if isinstance(ckpt, dict) else None
    if not run_config or "generator" not in run_config:
        raise ValueError(f"{path} holds no mr2ct_config: not a checkpoint written by `python -m mr2ct.train`")
    generator = build_generator(run_config["generator"], path)  # only mr2ct.nets classes, never any _target_
    prefix = "g_ab." if direction == "a2b" else "g_ba."
    state = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path} holds no {prefix[:-1]} weights")
    check_state_dict_compatible(generator.state_dict(), state, str(path), "generator")
    generator.load_state_dict(state)
    return generator.eval(), run_config
