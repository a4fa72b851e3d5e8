"""``python -m mr2ct.export ckpt=RUN/checkpoints/last.ckpt output=model.safetensors``: a shareable model file.

Both generators as safetensors (no pickle; or ``format=onnx|torchscript`` for one direction), the config
beside it as ``model.json`` and a model card ``model.md``; the work is :func:`mr2ct.checkpoints.export`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mr2ct.checkpoints import export
from mr2ct.cli import exit_on_user_error
from mr2ct.config import CONFIG_DIR
from mr2ct.errors import InputError


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(InputError, FileNotFoundError, FileExistsError):
        out, meta = export(cfg.ckpt, cfg.output, overwrite=bool(cfg.overwrite), evaluation=cfg.get("evaluation"),
                           fmt=str(cfg.get("format", "safetensors")), direction=str(cfg.get("direction", "a2b")))
    print(f"mr2ct: exported to {out} (config: {meta}, model card: {meta.with_suffix('.md')})")


if __name__ == "__main__":
    from mr2ct.cli import run_tool

    run_tool("export")
