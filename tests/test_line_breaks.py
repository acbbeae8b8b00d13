"""Texts holding characters that `str.splitlines` takes for line breaks (U+0085 NEL, U+2028, U+2029,
form feed, ...) stay one text: JSON Lines and one-text-per-line files break at \\n, \\r\\n, \\r only.
Found in a self-training run on Rotten Tomatoes, whose sentences hold U+0085: the pseudo-labels file
(json.dumps with ensure_ascii=False writes it raw) failed to load at its line 296."""

from __future__ import annotations

import json

import pytest

from hybridtune.data.lines import text_lines
from hybridtune.data.sources import read_table
from hybridtune.data.unlabeled import _read_lines

ODD = ["a film\x85 of its time", "line\u2028separator", "para\u2029graph", "form\x0cfeed", "plain"]


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_a_jsonl_file_with_odd_separators_in_its_texts_reads_one_row_per_line(tmp_path, ending):
    path = tmp_path / "train.jsonl"
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(ODD)]
    path.write_text(ending.join(json.dumps(r, ensure_ascii=False) for r in rows) + ending, encoding="utf-8")
    table = read_table(str(path), "data.source")
    assert table["text"].tolist() == ODD
    assert table["label"].tolist() == [0, 1, 0, 1, 0]


def test_an_unlabelled_text_file_keeps_odd_separators_inside_its_texts(tmp_path):
    path = tmp_path / "unlabeled.txt"
    path.write_text("\n".join(ODD) + "\n\n", encoding="utf-8")
    assert _read_lines(path, "text")["text"].tolist() == ODD


def test_text_lines_breaks_at_newline_kinds_only():
    assert text_lines("a\x85b\r\nc\rd\ne\n") == ["a\x85b", "c", "d", "e"]
    assert text_lines("") == []
    assert text_lines("no end") == ["no end"]
    assert "a\x85b\nc".splitlines() == ["a", "b", "c"]  # what the readers did before: 3 lines, not 2
