"""Command lines: ``mr2ct-<tool>`` console scripts (``[project.scripts]``) and ``python -m mr2ct.<tool>`` alike.

Before a tool's Hydra entry point runs, its arguments are checked once for the whole project's vocabulary:
the same key for the same thing in every tool (``ckpt``, ``input``, ``output``, ``overwrite``, ``device``);
a key an earlier version used is refused with one line naming the new one; and for ``train`` any Lightning
``Trainer`` argument may be given as ``trainer.X=...`` even when the trainer config does not list it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from mr2ct.config import set_project_root
from mr2ct.errors import find_user_error

TOOLS = ("train", "translate", "evaluate", "segment", "split", "leakcheck", "augment", "plan", "export")

#: old key -> new key, per tool (one vocabulary: ckpt / input / output)
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "train": {"ckpt_path": "ckpt", "model.channels_last": "model.memory_format"},
    "augment": {"in": "input", "out": "output"},
    "split": {"in": "input", "out": "output"},
    "evaluate": {"ckpt_path": "ckpt"},
    "translate": {"ckpt_path": "ckpt", "in": "input", "out": "output"},
    "segment": {"in": "input", "out": "output"},
    "export": {"ckpt_path": "ckpt", "out": "output"},
}
#: values that change with a renamed key
RENAMED_VALUES: dict[str, dict[str, str]] = {"model.channels_last": {"true": "channels_last", "false": "contiguous"}}


class UsageError(ValueError):
    """A command line that names a key the tool does not have."""


@contextmanager
def exit_on_user_error(*errors: type[BaseException]) -> Iterator[None]:
    """Entry points: a user error (bad path, bad option, bad file) becomes one line on stderr, exit 2.

    Anything else is a bug and keeps its traceback. An :class:`InputError` or :class:`ConfigError` that MONAI
    or Hydra wrapped on its way out (``RuntimeError("applying transform ...")``, ``InstantiationException``)
    counts as the user error it is.
    """
    try:
        yield
    except Exception as err:
        user_err: BaseException | None = err if isinstance(err, errors) else find_user_error(err)
        if user_err is None:
            raise
        logging.getLogger("mr2ct").error(str(user_err))
        print(f"mr2ct: error: {user_err}", file=sys.stderr)
        sys.exit(2)


def _trainer_arguments() -> set[str]:
    import pytorch_lightning as pl

    return set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


def prepare_argv(tool: str, argv: list[str]) -> list[str]:
    """``argv`` as Hydra should see it; raises :class:`UsageError` for renamed keys and unknown trainer keys."""
    out = list(argv[:1])
    trainer_args: set[str] | None = None
    for arg in argv[1:]:
        key, has_value, value = arg.partition("=")
        bare = key.lstrip("+~")
        if has_value and bare in RENAMED_KEYS.get(tool, {}):
            new = RENAMED_KEYS[tool][bare]
            value = RENAMED_VALUES.get(bare, {}).get(value.lower(), value)
            same = " (the same key in every tool)" if new in ("ckpt", "input", "output") else ""
            raise UsageError(f"{bare}= is now {new}={same}: {new}={value}")
        if tool == "train" and has_value and bare.startswith("trainer.") and bare.count(".") == 1 and not key.startswith("+"):
            trainer_args = trainer_args if trainer_args is not None else _trainer_arguments()
            name = bare.split(".", 1)[1]
            if name not in trainer_args:
                raise UsageError(f"trainer.{name} is not an argument of Lightning's Trainer (see `mr2ct-train --help`, group trainer)")
            arg = f"++{bare}={value}"  # set it whether or not the trainer config lists it
        out.append(arg)
    return out


def _composition_message(err: BaseException, overrides: list[str]) -> str:
    """Hydra's multi-line composition error as one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    text = str(err)
    if isinstance(err, OverrideParseException):
        parser = OverridesParser.create()
        for arg in overrides:
            try:
                parser.parse_override(arg)
            except HydraException:
                return f"cannot parse {arg!r}: {text.splitlines()[0]} (Hydra's override grammar: key=value, key=[a,b], +key=value)"
    cause = str(err.__cause__ or "")
    if text.startswith("Could not override") and "not in struct" in cause:
        key = text.split("'")[1]
        return f"unknown key {key!r} (`--help` lists the groups and keys; +{key}=... adds a new key)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Available options" in text:  # a group option that does not exist: name the ones that do
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = [line for line in lines[start + 1:] if not line.startswith(("Config search path", "provider="))]
        return f"{lines[0]} (options: {', '.join(options)})"
    return "; ".join(line for line in lines if not line.startswith("See https"))


def check_overrides(tool: str, argv: list[str]) -> None:
    """Compose ``tool``'s config with ``argv``'s overrides; raises :class:`UsageError` where Hydra would refuse them.

    Hydra's own report of a bad override spans several lines and exits 1; this turns it into the project's
    one line before anything runs. Command lines with flags (``-m`` sweeps, ``--help``, ``--cfg``) go to
    Hydra unchecked: a sweep's values do not compose as one config.
    """
    overrides = argv[1:]
    if any(arg.startswith("-") for arg in overrides):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from mr2ct.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            compose(tool, overrides=overrides, return_hydra_config=True)
    except HydraException as err:
        raise UsageError(_composition_message(err, overrides)) from err
    finally:
        GlobalHydra.instance().clear()


def run_tool(tool: str) -> None:
    """Run ``mr2ct.<tool>``'s entry point with the checked command line."""
    try:
        sys.argv = prepare_argv(tool, sys.argv)
        set_project_root()
        check_overrides(tool, sys.argv)
    except UsageError as err:
        print(f"mr2ct: error: {err}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"mr2ct.{tool}")
    if hasattr(module, "run_cli"):  # a tool with more to do than its Hydra main (train: resume folders)
        module.run_cli()
        return
    module.main()


def _console(tool: str):
    def entry() -> None:
        run_tool(tool)

    entry.__name__ = tool
    entry.__doc__ = f"``mr2ct-{tool}``"
    return entry


train, translate, evaluate, segment, split, leakcheck, augment, plan, export = (_console(t) for t in TOOLS)
