"""Read a table of examples from csv / tsv / jsonl / json / parquet, CoNLL token files or a saved HF dataset dir.

Every row keeps where it came from (`_where`, e.g. `train.csv:row 7`, `train.jsonl:line 3`) so that a
bad row is reported by file and row. CSV rows are numbered as a spreadsheet shows them: the header is
row 1 and each record one row, however many lines its quoted text spans (a blank line is an empty
row, as a spreadsheet shows it); JSON Lines by line. Text is read as text: "NA" or "null" in a review
stays a word.

A CSV file's delimiter is `data.delimiter` when set, else found in its first 64 KiB among `,` `;` tab
`|`: csv.Sniffer's guess first, then those four in order; the first that splits the header into
several columns and every complete record of the sample into as many is taken (`,` when none
does). A `.tsv` file is tab-separated unless `data.delimiter` says otherwise.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd

from hybridtune.data.conll import SUFFIXES as CONLL_SUFFIXES
from hybridtune.data.conll import read_conll
from hybridtune.data.lines import text_lines
from hybridtune.errors import UserError

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", *CONLL_SUFFIXES)
DELIMITERS = (",", ";", "\t", "|")  # what sniffing chooses among, in this order of preference
SNIFF_CHARS = 64 * 1024


def read_table(
    path_text: str, where: str, delimiter: str | None = None
) -> pd.DataFrame | dict[str, pd.DataFrame]:
    """A DataFrame with a `_where` column; a dict of them for a saved DatasetDict (split -> frame).
    `delimiter`: of a CSV file (data.delimiter); None: sniffed (a .tsv file: tab)."""
    path = Path(path_text)
    if not path.exists():
        raise UserError(
            where,
            f"'{path_text}' (no such file or directory)",
            "a csv/tsv/jsonl/parquet file or a saved HF dataset dir",
        )
    if path.is_dir():
        return _read_hf_dir(path, where)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(where, f"'{path.name}'", "a file ending in " + ", ".join(SUFFIXES))
    if path.stat().st_size == 0:
        raise UserError(str(path), "an empty file", "a header and at least one row")
    try:
        if suffix in (".csv", ".tsv"):
            frame = _read_csv(path, delimiter or ("\t" if suffix == ".tsv" else sniff_delimiter(path)))
        elif suffix == ".parquet":
            frame = _read_parquet(path)
        elif suffix in CONLL_SUFFIXES:
            frame = read_conll(path)
        else:
            frame = _read_json(path)
    except UnicodeDecodeError as e:
        raise UserError(
            str(path), f"bytes that are not UTF-8 at byte {e.start}", "a UTF-8 text file"
        ) from None
    if frame.empty:
        raise UserError(str(path), "no rows", "at least one example")
    twice = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
    if twice:
        raise UserError(str(path), f"the column name(s) {twice} twice", "unique column names")
    return frame


def sniff_delimiter(path: Path) -> str:
    """The delimiter of a CSV file, found in its first 64 KiB (see the module docstring)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        sample = f.read(SNIFF_CHARS)
        whole = not f.read(1)
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters="".join(DELIMITERS)).delimiter
    except csv.Error:  # "Could not determine delimiter"
        sniffed = None
    candidates = [d for d in DELIMITERS if d == sniffed] + [d for d in DELIMITERS if d != sniffed]
    for delimiter in candidates:
        if _splits_evenly(sample, delimiter, whole):
            return delimiter
    return candidates[0]


def _splits_evenly(sample: str, delimiter: str, whole: bool) -> bool:
    """Whether the header splits into 2+ columns and every complete record of `sample` into as many."""
    reader = csv.reader(io.StringIO(sample), delimiter=delimiter)
    records = []
    try:
        for record in reader:
            records.append(record)
    except csv.Error:  # a record cut by the end of the sample, or not this delimiter's CSV
        if whole:
            return False
    if not whole and records:
        records.pop()  # the sample may end inside the last record
    records = [r for r in records if r]
    if not records or len(records[0]) < 2:
        return False
    return all(len(r) == len(records[0]) for r in records[1:])


def _read_csv(path: Path, sep: str) -> pd.DataFrame:
    # csv module, not pandas: it tells exactly which record is malformed, and keeps every value a string.
    # Its default field limit (128 KiB) would call a long document malformed; texts are truncated to
    # data.max_length tokens later, so any text up to 1 GiB is read.
    csv.field_size_limit(max(csv.field_size_limit(), 2**30))
    row = 0  # the spreadsheet row of the record read last: a record is one row, whatever its lines
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=sep, strict=True)
        try:
            header = next(reader, None)
            if not header or all(not h.strip() for h in header):
                raise UserError(f"{path}:row 1", "no header", "a header row naming the columns")
            header = [h.strip() for h in header]
            twice = sorted({h for h in header if header.count(h) > 1})
            if twice:  # a second column of one name would shadow the first
                raise UserError(
                    f"{path}:row 1", f"the column name(s) {twice} twice in the header", "unique column names"
                )
            row = 1
            rows, places = [], []
            for record in reader:
                row += 1
                if not record:  # a blank line: an empty row in a spreadsheet too
                    continue
                if len(record) != len(header):
                    raise UserError(
                        f"{path}:row {row}",
                        f"{len(record)} fields",
                        f"{len(header)} fields, as in the header",
                    )
                rows.append(record)
                places.append(f"{path}:row {row}")
        except csv.Error as e:
            raise UserError(f"{path}:row {row + 1}", f"malformed CSV ({e})", "well-formed CSV") from None
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    frame["_where"] = places
    frame.attrs["delimiter"] = sep  # for check_columns: a file the delimiter did not split
    return frame


def _read_json(path: Path) -> pd.DataFrame:
    text = path.read_text(encoding="utf-8-sig")
    records, places = [], []
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:line {e.lineno}", f"invalid JSON ({e.msg})", "a JSON array of objects"
            ) from None
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise UserError(f"{path}:item {i + 1}", f"a {type(item).__name__}", "a JSON object")
            records.append(item)
            places.append(f"{path}:item {i + 1}")
    else:
        for lineno, line in enumerate(text_lines(text), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:line {lineno}", f"invalid JSON ({e.msg})", "one JSON object per line"
                ) from None
            if not isinstance(item, dict):
                raise UserError(
                    f"{path}:line {lineno}", f"a JSON {type(item).__name__}", "a JSON object per line"
                )
            records.append(item)
            places.append(f"{path}:line {lineno}")
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    frame["_where"] = places
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow

    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError, pyarrow.ArrowException) as e:  # what a corrupt file raises
        raise UserError(
            str(path), f"an unreadable parquet file ({type(e).__name__})", "a parquet file"
        ) from None
    frame["_where"] = [f"{path}:row {i + 1}" for i in range(len(frame))]
    return frame


def _read_hf_dir(path: Path, where: str) -> pd.DataFrame | dict[str, pd.DataFrame]:
    import datasets
    import pyarrow

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, pyarrow.ArrowException) as e:  # not a (whole) saved dataset
        raise UserError(
            where,
            f"'{path}', not a saved HF dataset ({type(e).__name__})",
            "a dir written by Dataset.save_to_disk",
        ) from None

    def frame_of(ds, split: str | None) -> pd.DataFrame:
        frame = ds.to_pandas()
        label = f"{path}[{split}]" if split else str(path)
        frame["_where"] = [f"{label}:row {i + 1}" for i in range(len(frame))]
        return frame

    if isinstance(loaded, datasets.DatasetDict):
        return {split: frame_of(ds, split) for split, ds in loaded.items()}
    return frame_of(loaded, None)
