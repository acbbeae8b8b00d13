"""No silent garbage from a tokenizer: a model dir without tokenizer files is refused unless
`model.tokenizer` names one, and a vocabulary that maps most training words to [UNK] stops the run
before training, with the share found (exit 2, one line, no run dir)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hybridtune.cli import app

from .refusal import assert_refused


@pytest.fixture(scope="module")
def bare_model(tiny_bert, tmp_path_factory) -> Path:
    """The tiny model's weights and config, without its tokenizer files."""
    out = tmp_path_factory.mktemp("bare")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_bert) / name, out / name)
    return out


def _train(tmp_path, *args: str):
    out = tmp_path / "runs"
    result = CliRunner().invoke(
        app, ["train", *args, "train.max_steps=2", "train.precision=fp32", f"output.dir={out}"]
    )
    return result, out


def test_a_model_dir_without_tokenizer_files_is_refused(tmp_path, bare_model, sentiment_csv):
    result, out = _train(tmp_path, f"model={bare_model}", f"data.source={sentiment_csv}")
    # says how to name one: model.tokenizer
    assert_refused(result, out, "model.name", "without tokenizer files", "model.tokenizer", absent=True)


def test_model_tokenizer_names_the_tokenizer_of_a_bare_model_dir(
    tmp_path, bare_model, sentiment_csv, tokenizer_dir
):
    result, out = _train(
        tmp_path, f"model={bare_model}", f"model.tokenizer={tokenizer_dir}", f"data.source={sentiment_csv}"
    )
    assert result.exit_code == 0, (result.output, result.exception)
    (run,) = out.iterdir()
    assert (run / "final" / "tokenizer.json").is_file()  # the named tokenizer is saved with the model
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(run / "final")) == len(
        AutoTokenizer.from_pretrained(tokenizer_dir)
    )


def test_a_vocabulary_that_maps_most_words_to_unk_stops_before_training(tmp_path, tiny_bert, sentiment_csv):
    """A WordPiece vocabulary of a few words: the sentiment words and most fillers become [UNK]."""
    from transformers import BertTokenizer

    vocab = tmp_path / "tiny-vocab"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(vocab)
    result, out = _train(
        tmp_path, f"model={tiny_bert}", f"model.tokenizer={vocab}", f"data.source={sentiment_csv}"
    )
    line = assert_refused(result, out, "maps ", absent=True)
    assert line.startswith("error: model.tokenizer:"), line
    share = float(line.split("maps ")[1].split(" %")[0])
    assert 50 < share < 100  # 'the' and 'film' are known; the rest of each row is not


def test_check_vocabulary_counts_words_not_rows(tokenizer_dir):
    from transformers import AutoTokenizer

    from hybridtune.errors import UserError
    from hybridtune.model.loading import check_vocabulary

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_vocabulary(tokenizer, ["a fine film " + "\u2603" * 3])  # 1 unknown word of 4: kept
    with pytest.raises(UserError, match=r"maps 75\.0 %"):
        check_vocabulary(tokenizer, ["\u2603 \u2604 \U0001f600 film"])
