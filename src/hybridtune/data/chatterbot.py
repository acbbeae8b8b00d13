"""bundled:chatterbot — question -> answer pairs from the ChatterBot corpus (`chatterbot-corpus`, BSD-3).

The package holds one YAML file per topic (`data/english/*.yml`), each a list of conversations, each a
list of turns. Every two consecutive turns of a conversation make a pair (turn i asks, turn i+1
answers). The same question often comes with several answers ("What is AI?" has two): the task's
split drops repeated prompts (first kept), so every question has one reference answer and none is in
two splits. YAML is read with `BaseLoader`, which keeps every scalar a string: YAML 1.1 would turn an
answer "yes" into True and "1984" into an int.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml


def read_pairs(package: Path) -> pd.DataFrame:
    """prompt / response / _where (`ai.yml:conversation 3, turn 1`) for every consecutive pair of turns."""
    rows = []
    for path in sorted((package / "data" / "english").glob("*.yml")):
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader) or {}
        for c, conversation in enumerate(data.get("conversations") or [], start=1):
            turns = [str(t).strip() for t in conversation if isinstance(t, str)]
            for i, (question, answer) in enumerate(zip(turns, turns[1:], strict=False), start=1):
                if question and answer:
                    rows.append((question, answer, f"{path.name}:conversation {c}, turn {i}"))
    return pd.DataFrame(rows, columns=["prompt", "response", "_where"])
