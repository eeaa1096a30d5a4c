"""Imported by every Python process of a fault test's server whose PYTHONPATH names this folder (the
`consa serve` process and the Celery worker it starts): holds a function of consa at its start while a
marker file exists, so that a test can kill the worker inside a phase that would otherwise last a
second (the export of the tiny model). The test removes the marker to let the next attempt through.

    FAULT_HOLD="consa.export.checkpoint:pack_checkpoint=/tmp/x/hold-export;module:function=marker;..."

Nothing here runs unless FAULT_HOLD is set; production code has no hook for it.
"""

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time

_TARGETS: dict[str, list[tuple[str, str]]] = {}
for _item in filter(None, os.environ.get("FAULT_HOLD", "").split(";")):
    _where, _marker = _item.split("=", 1)
    _module, _function = _where.split(":")
    _TARGETS.setdefault(_module, []).append((_function, _marker))


def _held(function, marker: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        while os.path.exists(marker):
            time.sleep(0.05)
        return function(*args, **kwargs)

    return wrapper


class _Hold(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            for function, marker in _TARGETS[name]:
                setattr(module, function, _held(getattr(module, function), marker))

        spec.loader.exec_module = exec_module
        return spec


if _TARGETS:
    sys.meta_path.insert(0, _Hold())
