"""The one progress bar of every stage: tqdm on stderr, off when a run is quiet or has nothing to count.

tqdm is imported only when a bar is made, so `fret --help` never pays for it.
"""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Any | None:
    """A tqdm bar over `total` units, or None when `enabled` is false or `total` is 0.

    A smoothing of 0.1 (tqdm's default is 0.3) keeps the rate steady over batches of uneven
    length; the width follows the terminal's, since the LLM stages' bars carry a rate postfix.
    """
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, smoothing=0.1, dynamic_ncols=True)
