"""Paths given on a benchmark's command line.

``./mtor bench`` runs the benchmarks from the checkout (their results and baselines live
there), so a relative ``--out`` or ``--logs`` would otherwise land in the checkout rather than
where the user typed the command. The wrapper names that directory in ``MTOR_CALLER_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Set by ``./mtor`` to the directory it was called from.
CALLER_DIR_VARIABLE = "MTOR_CALLER_DIR"


def user_path(text: str) -> Path:
    """``text`` as a path the user meant: a relative one is taken from the directory
    ``./mtor`` was called from (when it says so), ``~`` is expanded; an argparse ``type``."""
    path = Path(text).expanduser()
    caller = os.environ.get(CALLER_DIR_VARIABLE)
    if not path.is_absolute() and caller:
        path = Path(caller) / path
    return path
