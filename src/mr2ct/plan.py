"""Memory planner: ``python -m mr2ct.plan generator=... data.patch_size=[96,96,96] data.batch_size=2 [gpu_memory_gb=32]``.

Composes the real train config from the same overrides and predicts the peak training memory per
device (the batch size is per device under DDP) with and without each memory saver, by running one
full training step on the meta device (shapes only, no arithmetic: instant at any size) and tracking
the bytes of live tensors (:func:`mr2ct.profiling.trace_step`). Predictions:

* GPU: tensor peak (= ``torch.cuda.max_memory_allocated``) x (1 + ``gpu_overhead_fraction``) + context;
* CPU: peak RSS = the runtime footprint (libraries, measured in this process) + a calibrated fit
  overhead growing with the batch's voxels (:func:`mr2ct.profiling.fit_overhead`) + tensor peak + the two
  history pools when full; the weights' moving average (``callbacks.ema``) adds one copy of the weights.
  Validated against measured peak RSS by ``tests/test_plan.py`` and ``scripts/benchmark.py``.

bf16-mixed rows trace activations in bf16 with fp32 weights, gradients and Adam states (GPU only:
bf16 on this CPU is hundreds of times slower).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mr2ct.cli import exit_on_user_error
from mr2ct.config import CONFIG_DIR, validate
from mr2ct.errors import ConfigError
from mr2ct.profiling import GB, fit_overhead, runtime_rss, trace_step

log = logging.getLogger("mr2ct.plan")

#: memory saver (and speed switch) -> its config changes; names join with ``+`` (see :func:`saver_changes`).
#: ``bf16`` is mixed precision, ``bf16_state`` the Adam moments in bf16, ``trim`` glibc heap trimming; ``none`` keeps
#: the defaults (numerics ``auto``: a probe picks them), ``fp32`` fixes fp32 / contiguous.
SAVERS: dict[str, dict[str, Any]] = {
    "none": {},
    "split": {"model.split_backward": True},
    "ckpt": {"generator.checkpointing": True},
    "bf16_state": {"model.optimizer_state": "bfloat16"},
    "trim": {"callbacks.heap_trim.enabled": True},
    "channels_last": {"model.memory_format": "channels_last"},
    "compile": {"model.compile": True},
    "bf16": {"trainer.precision": "bf16-mixed"},
    "fp32": {"trainer.precision": "32-true", "model.memory_format": "contiguous"},  # the numerics auto would replace
}


def saver_changes(name: str) -> dict[str, Any]:
    """Config changes of a saver name, several joined by ``+`` (``split+ckpt+bf16_state``)."""
    unknown = [part for part in name.split("+") if part not in SAVERS]
    if unknown:
        raise ConfigError(f"unknown saver {unknown[0]!r}; choose from {sorted(SAVERS)}, joined by +")
    return {key: val for part in name.split("+") for key, val in SAVERS[part].items()}


def saver_overrides(name: str) -> list[str]:
    """:func:`saver_changes` as Hydra command-line overrides (``model.split_backward=true``)."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in saver_changes(name).items()]


def _with(cfg: DictConfig, changes: dict[str, Any]) -> DictConfig:
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key, val in changes.items():
        OmegaConf.update(out, key, val, merge=False)
    return out


def plan(cfg: DictConfig, runtime_bytes: int | None = None) -> list[dict[str, Any]]:
    """One row per saver in ``cfg.savers``: predicted bytes and whether they fit GPU / CPU memory."""
    validate(cfg)
    runtime = runtime_rss() if runtime_bytes is None else runtime_bytes
    rows = []
    for name in cfg.savers:
        changes = saver_changes(name)
        c = _with(cfg, changes)
        bf16 = "bf16" in str(c.trainer.precision)
        trace = trace_step(c)
        averaged = trace["weights"] if ((c.get("callbacks") or {}).get("ema") or {}).get("enabled") else 0  # the EMA's copy of the weights
        state = trace["state"] + averaged
        total = trace["total"] + averaged
        if bf16:
            half = trace_step(c, half_precision=True)
            total = state + half["act"]
        gpu = total * (1 + float(cfg.gpu_overhead_fraction)) + float(cfg.gpu_context_gb) * GB
        cpu = None if bf16 else runtime + fit_overhead(trace["batch_voxels"]) + total + trace["pool"]
        rows.append({
            "saver": name, "changes": changes, "state_gb": state / GB, "tensor_peak_gb": total / GB,
            "gpu_gb": gpu / GB, "fits_gpu": gpu <= float(cfg.gpu_memory_gb) * GB,
            "cpu_rss_gb": None if cpu is None else cpu / GB,
            "fits_cpu": None if cpu is None else cpu <= float(cfg.cpu_memory_gb) * GB,
            "tflop_per_step": trace["flops"] / 1e12,
        })
    return rows


def format_table(cfg: DictConfig, rows: list[dict[str, Any]]) -> str:
    gen = cfg.generator._target_.rsplit(".", 1)[-1]
    w = max([len(r["saver"]) for r in rows] + [5]) + 2
    lines = [
        f"mr2ct plan: {gen} {dict((k, v) for k, v in cfg.generator.items() if k in ('channels', 'ngf', 'n_blocks'))}, "
        f"patch {list(cfg.data.patch_size)}, batch {cfg.data.batch_size} per device, "
        f"losses {sorted(cfg.loss.keys())}",
        f"{'saver':<{w}}{'TFLOP/step':>11}{'state GB':>9}{'tensors GB':>11}{'GPU GB':>8}"
        f"{'fits ' + str(cfg.gpu_memory_gb) + ' GB':>14}{'CPU RSS GB':>11}{'fits ' + str(cfg.cpu_memory_gb) + ' GB':>12}",
    ]
    yes = {True: "yes", False: "no", None: "-"}
    for r in rows:
        cpu = "-" if r["cpu_rss_gb"] is None else f"{r['cpu_rss_gb']:.2f}"
        lines.append(
            f"{r['saver']:<{w}}{r['tflop_per_step']:>11.2f}{r['state_gb']:>9.2f}{r['tensor_peak_gb']:>11.2f}"
            f"{r['gpu_gb']:>8.2f}{yes[r['fits_gpu']]:>14}{cpu:>11}{yes[r['fits_cpu']]:>12}"
        )
    lines.append("split = model.split_backward=true, ckpt = generator.checkpointing=true, bf16 = trainer.precision=bf16-mixed (GPU), "
                 "bf16_state = model.optimizer_state=bfloat16 (Adam moments); precision auto is planned as fp32, the larger")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="plan")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(ConfigError):
        rows = plan(cfg)
    print(format_table(cfg, rows))
    if cfg.get("json"):
        with open(cfg.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    from mr2ct.cli import run_tool

    run_tool("plan")
