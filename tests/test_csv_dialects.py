"""CSV files as users have them (data/sources.py): the delimiter sniffed among , ; tab | or set by
`data.delimiter`; rows numbered as a spreadsheet shows them, a quoted text over several lines being one
row; a delimiter that splits nothing is refused naming the file and `data.delimiter`."""

from __future__ import annotations

import csv
import io

import pytest

from hybridtune.data import load_splits
from hybridtune.data.sources import read_table, sniff_delimiter
from hybridtune.errors import UserError
from hybridtune.recipe import DataConfig, load_recipe

from .conftest import sentiment_rows
from .refusal import refused

COLUMNS = {"text_column": "text", "label_column": "label"}


def _write(path, rows, delimiter: str = ",", header=("text", "label")):
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    return path


# texts with every delimiter in them, quoted where the file's delimiter needs it
TRICKY = [
    ("good, really; quite | good", "positive"),
    ('she said "awful"\tand left', "negative"),
    ("plain", "positive"),
    ("a; b, c", "negative"),
]


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"], ids=["comma", "semicolon", "tab", "pipe"])
def test_the_delimiter_is_sniffed(tmp_path, delimiter):
    path = _write(tmp_path / "d.csv", TRICKY * 5, delimiter)
    assert sniff_delimiter(path) == delimiter
    table = read_table(str(path), "data.source")
    assert list(zip(table["text"], table["label"], strict=True)) == TRICKY * 5


def test_a_semicolon_file_from_a_spreadsheet_trains(tmp_path, tiny_bert):
    """The shape a European spreadsheet exports: `;`, CRLF, quotes doubled, a BOM."""
    from hybridtune import api

    rows = [(f'{text} "{i}"', label) for i, (text, label) in enumerate(sentiment_rows(40))]
    path = _write(tmp_path / "export.csv", rows, ";")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    overrides = [
        f"model.name={tiny_bert}",
        f"data.source={path}",
        "train.max_steps=1",
        "train.precision=fp32",
        f"output.dir={tmp_path / 'runs'}",
    ]
    summary = api.train(load_recipe(None, overrides))
    assert summary["steps"] == 1 and summary["test"]["n"] == 4


def test_data_delimiter_overrides_sniffing(tmp_path):
    # both ',' and ';' split every row of this file into two columns: whichever sniffing takes,
    # `data.delimiter` decides
    path = tmp_path / "d.csv"
    path.write_text("text;label,x\na;b,1\nc;d,2\n", encoding="utf-8")
    at_semicolon = read_table(str(path), "data.source", delimiter=";")
    assert at_semicolon["label,x"].tolist() == ["b,1", "d,2"]
    at_comma = read_table(str(path), "data.source", delimiter=",")
    assert at_comma["x"].tolist() == ["1", "2"] and at_comma["text;label"].tolist() == ["a;b", "c;d"]
    assert load_recipe(None, ["data.delimiter=tab"]).data.delimiter == "\t"
    assert load_recipe(None, ["data.delimiter=\\t"]).data.delimiter == "\t"
    assert load_recipe(None, ["data.delimiter=;"]).data.delimiter == ";"
    assert load_recipe(None, ["data.delimiter=|"]).data.delimiter == "|"  # not YAML's block scalar


def test_a_tsv_file_is_read_at_tabs_unless_told(tmp_path):
    path = _write(tmp_path / "d.tsv", [("a, b", "1"), ("c, d", "0")], "\t")
    assert read_table(str(path), "data.source")["text"].tolist() == ["a, b", "c, d"]


def test_multi_line_texts_count_as_one_spreadsheet_row_each(tmp_path):
    rows = [("first line\nsecond line\nthird", "positive")] * 4 + [("", "negative")]
    path = _write(tmp_path / "d.csv", rows)  # the empty text: spreadsheet row 6, line 14 of the file
    assert path.read_text().count("\n") == 14
    with pytest.raises(UserError) as error:
        load_splits(DataConfig(source=str(path)), COLUMNS, stratify="label")
    assert error.value.where == f"{path}:row 6"
    table = read_table(str(path), "data.source")
    assert table["_where"].tolist() == [f"{path}:row {i}" for i in range(2, 7)]
    assert table["text"].iloc[0] == "first line\nsecond line\nthird"


def test_a_malformed_record_far_down_is_reported_at_its_spreadsheet_row(tmp_path):
    """Every tenth text spans two lines: the bad record is row 9,000 (line 9,899 of the file)."""
    rows = [(f"review {i}" + ("\ncontinued" if i % 10 == 0 else ""), "positive") for i in range(8998)]
    path = _write(tmp_path / "d.csv", rows)
    with path.open("a", encoding="utf-8") as f:
        f.write("a review, with, commas unquoted,positive\n")
    with pytest.raises(UserError) as error:
        read_table(str(path), "data.source")
    assert error.value.where == f"{path}:row 9000"
    assert "4 fields" in str(error.value)


def test_an_open_quote_is_reported_at_the_row_it_opens(tmp_path):
    path = _write(tmp_path / "d.csv", [("two\nlines", "positive"), ("ok", "negative")])
    with path.open("a", encoding="utf-8") as f:
        f.write('"a review cut sho')
    with pytest.raises(UserError, match="malformed CSV") as error:
        read_table(str(path), "data.source")
    assert error.value.where == f"{path}:row 4"


def test_a_blank_line_is_an_empty_spreadsheet_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,1\n\n,0\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        load_splits(DataConfig(source=str(path)), COLUMNS, stratify="label")
    assert error.value.where == f"{path}:row 4"


def test_a_delimiter_that_splits_no_row_is_refused(tmp_path, tiny_bert):
    path = _write(tmp_path / "semi.csv", sentiment_rows(20), ";")
    out = tmp_path / "runs"
    refused(
        [
            "train",
            f"model={tiny_bert}",
            f"data.source={path}",
            "data.delimiter=,",
            "train.max_steps=1",
            f"output.dir={out}",
        ],
        out,
        "semi.csv",
        "data.delimiter",
        "one column ('text;label') when split at ','",
        "'text', 'label'",
    )


def test_a_delimiter_sniffing_cannot_find_is_refused(tmp_path, tiny_bert):
    path = tmp_path / "colon.csv"
    path.write_text("text:label\n" + "".join(f"{t}:{label}\n" for t, label in sentiment_rows(20)))
    out = tmp_path / "runs"
    refused(
        ["train", f"model={tiny_bert}", f"data.source={path}", "train.max_steps=1", f"output.dir={out}"],
        out,
        "colon.csv",
        "data.delimiter",
    )
    # told, it reads
    table = read_table(str(path), "data.source", delimiter=":")
    assert list(table.columns) == ["text", "label", "_where"] and len(table) == 20


@pytest.mark.parametrize("value", ["ab", '"', ""])
def test_a_delimiter_is_one_character(value, tmp_path):
    out = tmp_path / "runs"
    refused(
        ["train", f"data.delimiter='{value}'", "train.max_steps=1", f"output.dir={out}"],
        out,
        "data.delimiter",
    )
