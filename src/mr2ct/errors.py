"""The project's exceptions: what a user got wrong, as opposed to a bug.

Tools turn these into one ``mr2ct: error: ...`` line and exit 2 (:func:`mr2ct.cli.exit_on_user_error`).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot work, found before any data is loaded or network built."""


class InputError(ValueError):
    """Unusable input: a data file, a checkpoint or an output path. The message names the file."""


def find_user_error(err: BaseException | None) -> ConfigError | InputError | None:
    """The :class:`ConfigError` or :class:`InputError` in ``err``'s chain of causes (Hydra's ``instantiate``,
    MONAI and thread pools wrap exceptions)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (ConfigError, InputError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


__all__ = ["ConfigError", "InputError", "find_user_error"]
