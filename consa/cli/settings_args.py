"""argparse flags generated from the settings dataclasses of consa.core.config, for `consa search` and
`consa jobs submit` alike (one definition of every flag's default, help, bounds and choices)."""

import argparse
from dataclasses import MISSING

from consa.core.config import check_setting, setting_fields


def _checked(settings, name: str, kind):
    """An argparse type: parse the text as `kind`, then check it against the setting's bounds and choices."""
    def parse(text: str):
        try:
            return check_setting(name, kind(text), settings=settings)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = kind.__name__  # argparse names the type in "invalid <type> value" messages
    return parse


def add_setting_args(p, settings, server_defaults: bool = False) -> None:
    """One flag per setting of `settings` (SearchConfig, RunOptions): default, help, bounds and choices come
    from consa.core.config.

    With `server_defaults` (`consa jobs submit`) a flag left out stays None, so the server applies its own.
    """
    for name, kind, default, meta, _ in setting_fields(settings):
        flags = ["--" + name.replace("_", "-")] + (["--data"] if name == "dataset" else [])
        help = meta["help"] + ("" if default in (MISSING, None) else " (default: %(default)s)")
        if server_defaults and default is not MISSING:
            default, help = None, meta["help"] + f" (server default: {default})"
        if kind is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help)
            continue
        p.add_argument(*flags, dest=name, type=_checked(settings, name, kind), required=default is MISSING,
                       default=None if default is MISSING else default, help=help,
                       metavar="|".join(meta["choices"]) if "choices" in meta else None)
