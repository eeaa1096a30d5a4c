"""The benches' default texts, in one place: the search's (this Python's site-packages) and the
held-out one (its standard library), kept apart.

On pyenv, conda and other self-contained installs site-packages lies INSIDE the standard library's
folder (lib/python3.X/site-packages), so a held-out set read from that folder would be mostly the
search's own text. There the held-out default is a copy of the standard library's .py files without
site-packages (made once in the temp folder). The GPU image's venv keeps the two apart already
(/usr/lib/python3.12 vs the venv's site-packages).
"""

import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

TRAIN_TEXT = sysconfig.get_paths()["purelib"]
STDLIB = os.path.dirname(os.__file__)


def held_out_text() -> str:
    """The standard library's folder, or where it holds site-packages, its own .py files copied out."""
    stdlib = Path(STDLIB).resolve()
    if not Path(TRAIN_TEXT).resolve().is_relative_to(stdlib):
        return str(stdlib)
    copy = Path(tempfile.gettempdir()) / f"consa-held-out-stdlib-{sys.version_info[0]}.{sys.version_info[1]}"
    if not (copy / ".complete").exists():
        def skip(folder, names):
            return [n for n in names if n in ("site-packages", "dist-packages", "__pycache__")
                    or (not n.endswith(".py") and not (Path(folder) / n).is_dir())]

        partial = Path(tempfile.mkdtemp(dir=copy.parent, prefix=copy.name + "."))
        shutil.copytree(stdlib, partial, ignore=skip, dirs_exist_ok=True)
        (partial / ".complete").touch()
        try:
            partial.rename(copy)  # whole or not at all: another process may be making it too
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
    return str(copy)


def check_held_out(held_out, *train) -> None:
    """SystemExit when a training folder lies inside the held-out one (the same folder is allowed: a
    caller who names one folder for both chose it)."""
    ev = Path(held_out).resolve()
    for t in train:
        tr = Path(t).resolve()
        if tr != ev and tr.is_relative_to(ev):
            raise SystemExit(f"the held-out text {held_out} contains the search's text {t}: its files would be "
                             "scored as held out; name a held-out folder without it (--eval-data)")
