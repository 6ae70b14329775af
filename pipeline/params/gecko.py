"""The one place naming where a code default differs from the shipped params.yaml: keys whose default
is the Gecko paper's setting, while params.yaml ships a value chosen on dev data for the bundled LLM.
docs/params.md prints each why; a test fails on a difference not named here, or named but gone.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class PaperSetting(NamedTuple):
    value: Any  # the Gecko paper's setting, as JSON: the code default
    why: str  # why params.yaml ships another value


GECKO: dict[str, PaperSetting] = {
    "score.methods": PaperSetting(
        ["ql", "rc"], "the bundled SmolLM2-135M's RC ranks near noise on labelled data, so QL alone halves the LLM work"
    ),
    "select.weights": PaperSetting(
        {"ql": 1.0, "rc": 1.0, "knn": 0.0, "bm25": 0.0}, "with RC not scored (score.methods), the fusion reads QL alone"
    ),
    "select.negative": PaperSetting(
        "lowest", "range, the hardest candidate the false-negative guard leaves, trained best on dev data"
    ),
}
