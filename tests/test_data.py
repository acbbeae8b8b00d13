"""Data sources, splits and the bundled Rotten Tomatoes split."""

import pandas as pd
import pytest

from hybridtune.data import load_splits
from hybridtune.data.sources import read_table
from hybridtune.errors import UserError
from hybridtune.recipe import DataConfig

COLUMNS = {"text_column": "text", "label_column": "label"}


def test_bundled_rotten_tomatoes_split_is_stratified_disjoint_and_reproducible():
    cfg = DataConfig()
    a = load_splits(cfg, COLUMNS, stratify="label")
    b = load_splits(cfg, COLUMNS, stratify="label")
    sizes = {name: len(a[name]) for name in ("train", "validation", "test")}
    assert sum(sizes.values()) == 8530 - 0  # RT has no exact duplicate sentence
    assert abs(sizes["test"] - 853) <= 1 and abs(sizes["validation"] - 853) <= 1
    for name in ("train", "validation", "test"):
        assert a[name]["text"].tolist() == b[name]["text"].tolist()
        share = a[name]["label"].astype(int).mean()
        assert abs(share - 0.5) < 0.01
    texts = [set(a[name]["text"].str.strip()) for name in ("train", "validation", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert a.label_names == ["negative", "positive"]


def test_duplicates_never_cross_splits(tmp_path):
    rows = [(f"text {i % 50}", i % 2) for i in range(200)]  # every text 4 times
    path = tmp_path / "dups.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    splits = load_splits(DataConfig(source=str(path)), COLUMNS, stratify="label")
    total = sum(len(splits[n]) for n in ("train", "validation", "test"))
    assert total == 50
    seen = [set(splits[n]["text"]) for n in ("train", "validation", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "parquet"])
def test_formats_read_the_same(tmp_path, suffix):
    frame = pd.DataFrame({"text": ["good", "bad", "NA"], "label": [1, 0, 1]})
    path = tmp_path / f"d.{suffix}"
    if suffix == "csv":
        frame.to_csv(path, index=False)
    elif suffix == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    table = read_table(str(path), "data.source")
    assert table["text"].tolist() == ["good", "bad", "NA"]  # "NA" stays a word
    assert [str(v) for v in table["label"]] == ["1", "0", "1"]
    assert table["_where"].iloc[0].endswith(("row 2", "line 1", "row 1"))


def test_saved_hf_dataset_dir_with_its_own_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"text": [f"{name} {i}" for i in range(10)], "label": [i % 2 for i in range(10)]}
            )
            for name in ("train", "validation", "test")
        }
    )
    dd.save_to_disk(tmp_path / "ds")
    splits = load_splits(DataConfig(source=str(tmp_path / "ds")), COLUMNS, stratify="label")
    assert len(splits.train) == 10 and splits.test["text"].iloc[0] == "test 0"


def test_explicit_files_and_a_split_off_validation(tmp_path):
    train = tmp_path / "train.csv"
    test = tmp_path / "test.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(40)], "label": [i % 2 for i in range(40)]}).to_csv(
        train, index=False
    )
    pd.DataFrame({"text": ["x", "y"], "label": [0, 1]}).to_csv(test, index=False)
    splits = load_splits(DataConfig(train=str(train), test=str(test)), COLUMNS, stratify="label")
    assert len(splits.test) == 2 and len(splits.validation) == 4 and len(splits.train) == 36


def test_csv_row_numbers_in_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,1\n,0\n")
    with pytest.raises(UserError, match=r"d.csv:row 3: found an empty text"):
        load_splits(DataConfig(source=str(path)), COLUMNS, stratify="label")
