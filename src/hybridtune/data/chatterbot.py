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


# topics with fewer distinct texts than this are left out of bundled:chatterbot_topics: a class
# needs room for a 16-shot draw from its train split (80 % of its rows)
MIN_TOPIC_TEXTS = 20


def read_topics(package: Path) -> pd.DataFrame:
    """text / label / _where: every distinct line of a conversation (question or answer), labelled
    by the topic file it comes from (`ai`, `computers`, `food`, ...). A text found in two topics
    ("Yes.", "What is AI?") says nothing of either and is dropped; topics with fewer than
    MIN_TOPIC_TEXTS texts left are dropped too."""
    rows, topics_of = [], {}
    for path in sorted((package / "data" / "english").glob("*.yml")):
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader) or {}
        topic = path.stem
        for c, conversation in enumerate(data.get("conversations") or [], start=1):
            for i, turn in enumerate(conversation, start=1):
                text = str(turn).strip() if isinstance(turn, str) else ""
                if text and topic not in topics_of.setdefault(text, set()):
                    topics_of[text].add(topic)
                    rows.append((text, topic, f"{path.name}:conversation {c}, turn {i}"))
    frame = pd.DataFrame(rows, columns=["text", "label", "_where"])
    frame = frame[[len(topics_of[t]) == 1 for t in frame["text"]]]
    counts = frame["label"].value_counts()
    frame = frame[frame["label"].map(counts) >= MIN_TOPIC_TEXTS]
    return frame.reset_index(drop=True)
