"""Progress bars for long work: tqdm (``tqdm.auto``: a widget in notebooks, a bar on terminals and
in logs), or nothing when disabled. tqdm comes with transformers, which ``ivg`` needs."""
from __future__ import annotations

import sys


def progress_bar(total: int, *, desc: str, unit: str, enabled: bool):
    """A tqdm bar over ``total`` units on stderr (``update(k)``, ``set_postfix_str(s)``, ``close()``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
