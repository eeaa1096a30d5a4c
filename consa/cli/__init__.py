"""The `consa` command line (`main`) and the HTTP client of a consa server (consa.cli.client).

Nothing here imports torch at module level: `consa --help` and the `consa jobs` commands start at
once; the library commands import what they run when they run.
"""

from consa.cli.commands import main

__all__ = ["main"]
