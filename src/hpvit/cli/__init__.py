"""The ``hpvit`` command line (argument parsing and the commands' entry points; see :mod:`hpvit.cli.main`).

``main`` is the console script. Building any parser imports no torch: the modules here import the
library only inside the functions that run a command.
"""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
