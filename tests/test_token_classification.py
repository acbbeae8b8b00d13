"""Token classification (NER): BIO alignment, CoNLL / JSONL reading, bad input by file:line, and a few
training steps end to end on the tiny BERT with synthetic tagged sentences."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from hybridtune import api, bundled
from hybridtune.cli import app
from hybridtune.data import Splits
from hybridtune.data.conll import read_conll
from hybridtune.errors import UserError
from hybridtune.recipe import DataConfig, load_recipe
from hybridtune.tasks import token_classification as ner

PEOPLE = ["alice", "bob", "carol", "dave", "erin"]
PLACES = [["paris"], ["london"], ["new", "york"], ["rio", "de", "janeiro"]]
FILLER = ["today", "went", "to", "see", "the", "and", "was", "nice", "in", "with", "lol", "."]


def tagged_sentences(n: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """Sentences whose entities are given away by their words: learnable in a few steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [(w, "O") for w in rng.sample(FILLER, 4)]
        words.insert(rng.randrange(len(words) + 1), (rng.choice(PEOPLE), "B-person"))
        place = rng.choice(PLACES)
        at = rng.randrange(len(words) + 1)
        words[at:at] = [(w, ("B-" if j == 0 else "I-") + "loc") for j, w in enumerate(place)]
        words.append((str(i), "O"))  # no two sentences alike
        out.append(words)
    return out


def write_conll(path: Path, sentences, blank: str = "\n", newline: str = "\n") -> Path:
    lines = []
    for sentence in sentences:
        lines += [f"{w}\t{t}" for w, t in sentence]
        lines.append(blank.rstrip("\n"))
    path.write_text(newline.join(lines) + newline, encoding="utf-8", newline="")
    return path


@pytest.fixture(scope="module")
def ner_conll(tmp_path_factory) -> str:
    return str(write_conll(tmp_path_factory.mktemp("ner") / "train.conll", tagged_sentences(200)))


# --------------------------------------------------------------------------------------------------
# alignment


def test_first_sub_token_gets_the_tag_the_rest_and_specials_get_minus_100(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = ["@paulwalk", "visits", "New", "York", "."]
    tags = ["B-person", "O", "B-loc", "I-loc", "O"]
    names = ["O", "B-loc", "I-loc", "B-person", "I-person"]
    labels = ner.Labels(values=names, names=names)
    frame = pd.DataFrame({"tokens": [words], "tags": [tags], "_where": ["x:line 1"]})
    row = ner.encode(frame, tokenizer, labels, DataConfig())[0]
    # by hand: [CLS] @ paul ##walk visits new york . [SEP]
    assert tokenizer.convert_ids_to_tokens(row["input_ids"]) == [
        "[CLS]", "@", "paul", "##walk", "visits", "new", "york", ".", "[SEP]",
    ]  # fmt: skip
    assert row["labels"] == [-100, 3, -100, -100, 0, 1, 2, 0, -100]


def test_align_labels_on_word_ids():
    assert ner.align_labels([None, 0, 0, 1, 2, 2, 2, None], [5, 6, 7]) == [
        -100,
        5,
        -100,
        6,
        7,
        -100,
        -100,
        -100,
    ]


def test_label_space_is_o_then_b_i_per_type_sorted():
    frame = pd.DataFrame({"tags": [["B-zeta", "O"], ["B-alpha", "I-alpha"]], "_where": ["a", "b"]})
    splits = Splits(train=frame, validation=frame.iloc[:1], test=frame.iloc[1:])
    labels = ner.label_space(splits, DataConfig())
    assert labels.names == ["O", "B-alpha", "I-alpha", "B-zeta", "I-zeta"]


# --------------------------------------------------------------------------------------------------
# reading


def test_conll_reader_tolerates_whitespace_blank_lines_crlf_docstart_and_extra_columns(tmp_path):
    sentences = tagged_sentences(3)
    path = write_conll(tmp_path / "a.conll", sentences, blank="\t \n", newline="\r\n")
    frame = read_conll(path)
    assert frame["tokens"].tolist() == [[w for w, _ in s] for s in sentences]
    assert frame["tags"].tolist() == [[t for _, t in s] for s in sentences]
    assert frame["_where"][1] == f"{path}:line {len(sentences[0]) + 2}"
    four = tmp_path / "b.txt"
    four.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n", encoding="utf-8")
    frame = read_conll(four)
    assert frame["tokens"].tolist() == [["EU", "rejects"]] and frame["tags"].tolist() == [["B-ORG", "O"]]


def test_bundled_wnut16_is_2394_tweets_split_the_same_way_every_time():
    frame, names = bundled.dataset("bundled:wnut16")
    assert len(frame) == 2394 and names is None
    assert frame["_where"][0] == "ner.txt:line 1"
    assert frame["tags"][0][frame["tokens"][0].index("Empire")] == "B-facility"
    cfg = load_recipe(None, ["task=token_classification"]).data
    assert cfg.source == "bundled:wnut16"
    a, b = ner.load_splits(cfg), ner.load_splits(cfg)
    assert a.test["_where"].tolist() == b.test["_where"].tolist()
    assert sum(len(a[s]) for s in ("train", "validation", "test")) <= 2394
    assert 200 <= len(a.test) <= 260


def test_jsonl_rows_with_tokens_and_tags(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"words": [w for w, _ in s], "ner": [t for _, t in s]} for s in tagged_sentences(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = DataConfig(source=str(path), tokens_column="words", tags_column="ner")
    splits = ner.load_splits(cfg)
    assert sum(len(splits[s]) for s in ("train", "validation", "test")) == 30
    assert isinstance(splits.train["words"][0], list)


# --------------------------------------------------------------------------------------------------
# bad input: file:line, found, expected


def _conll_error(tmp_path, text: str) -> UserError:
    path = tmp_path / "bad.conll"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        ner.load_splits(DataConfig(source=str(path)))
    return info.value


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a\tO\nb\tB_PER\n", 2, ["'B_PER'", "B-<type>"]),
        ("a\tO\n\nb\tO\nc\tI-loc\n", 4, ["'I-loc' after 'O'", "B-loc"]),
        ("a\tB-person\nb\tI-loc\n", 2, ["'I-loc' after 'B-person'"]),
        ("a\tO\n\nI-loc\tI-loc\n", 3, ["after the start of the sentence"]),
        ("a\tO\nlonely\n", 2, ["'lonely'", "token<TAB>tag"]),
    ],
)
def test_bad_conll_lines_are_reported_by_line(tmp_path, text, line, words):
    error = _conll_error(tmp_path, text)
    assert error.where.endswith(f"bad.conll:line {line}"), error.where
    for word in words:
        assert word in str(error), (word, str(error))


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, ["2 tokens and 1 tags", "one tag per token"]),
        ({"tokens": [], "tags": []}, ["empty sentence"]),
        ({"tokens": ["a", "b"], "tags": ["O", "I-x"]}, ["token 2", "'I-x' after 'O'"]),
        ({"tokens": "a b", "tags": ["O", "O"]}, ["a list of tokens"]),
        ({"tokens": ["a", " "], "tags": ["O", "O"]}, ["token 2", "a non-empty text"]),
    ],
)
def test_bad_jsonl_rows_are_reported_by_line(tmp_path, row, words):
    path = tmp_path / "bad.jsonl"
    good = {"tokens": ["fine"], "tags": ["O"]}
    path.write_text("\n".join(json.dumps(r) for r in [good, good, row]) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        ner.load_splits(DataConfig(source=str(path)))
    assert "bad.jsonl:line 3" in info.value.where, info.value.where
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_ner_data_through_the_cli_exits_2_with_one_line(tmp_path, tiny_bert):
    path = tmp_path / "bad.conll"
    path.write_text("a\tO\nb\tI-loc\n", encoding="utf-8")
    result = CliRunner().invoke(
        app,
        [
            "train",
            "task=token_classification",
            f"model={tiny_bert}",
            f"data={path}",
            f"output.dir={tmp_path / 'r'}",
        ],
    )
    assert result.exit_code == 2 and "bad.conll:line 2" in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_classification_metric_names_are_refused_for_the_other_task():
    with pytest.raises(UserError, match="train.early_stopping.metric"):
        load_recipe(None, ["train.early_stopping.metric=f1"])
    assert load_recipe(None, ["task=token_classification"]).train.early_stopping.metric == "f1"


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, tiny_bert, ner_conll) -> Path:
    out = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(
        None,
        [
            "task=token_classification",
            f"model={tiny_bert}",
            f"data={ner_conll}",
            "train.epochs=3",
            "train.batch_size=16",
            "train.lr=0.005",
            "train.precision=fp32",
            f"output.dir={out}",
            "output.name=ner",
        ],
    )
    return Path(api.train(recipe)["run_dir"])


def test_training_end_to_end_reports_entity_metrics(ner_run):
    report = json.loads((ner_run / "eval.json").read_text())
    for key in ("f1", "precision", "recall", "accuracy", "f1_macro", "per_type", "entities"):
        assert key in report, key
    assert set(report["per_type"]) == {"loc", "person"}
    assert report["f1"] >= 0.8, report["f1"]  # the synthetic entities are learnable
    summary = json.loads((ner_run / "report.json").read_text())
    assert set(summary["test"]) == {"f1", "precision", "recall", "n"}
    logs = [json.loads(line) for line in (ner_run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_f1" in r for r in logs)
    assert json.loads((ner_run / "run.json").read_text())["task"] == "token_classification"
    # evaluating the finished run gives the same numbers
    assert api.evaluate(str(ner_run))["f1"] == report["f1"]


def test_final_model_loads_with_plain_transformers(ner_run):
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(ner_run / "final")
    assert model.config.id2label[0] == "O" and model.config.num_labels == 5


def test_predict_finds_entities_with_offsets_and_the_cli_prints_them(ner_run):
    text = "today alice went to new york lol"
    [row] = api.predict(str(ner_run), [text])
    assert row["tokens"] == text.split()
    found = {(e["type"], e["text"]) for e in row["entities"]}
    assert found == {("person", "alice"), ("loc", "new york")}, row
    for e in row["entities"]:
        assert text[e["start"] : e["end"]] == e["text"] and 0 < e["score"] <= 1
    result = CliRunner().invoke(app, ["predict", str(ner_run), text])
    assert result.exit_code == 0, result.output
    assert "person: alice" in result.output and "loc: new york" in result.output


def test_evaluate_on_a_file_refuses_tags_the_run_never_saw(ner_run, tmp_path):
    path = write_conll(tmp_path / "other.conll", [[("x", "O"), ("acme", "B-company")]])
    with pytest.raises(UserError, match=r"other.conll:line 1, token 2.*'B-company', unknown to this run"):
        api.evaluate(str(ner_run), str(path))
    ok = write_conll(tmp_path / "ok.conll", tagged_sentences(10, seed=3))
    assert api.evaluate(str(ner_run), str(ok))["n"] == 10


def test_lora_on_token_classification_saves_an_adapter(tiny_bert, ner_conll, tmp_path):
    recipe = load_recipe(
        None,
        [
            "task=token_classification",
            f"model={tiny_bert}",
            f"data={ner_conll}",
            "peft.method=lora",
            "train.max_steps=4",
            "train.precision=fp32",
            f"output.dir={tmp_path}",
        ],
    )
    run = Path(api.train(recipe)["run_dir"])
    assert (run / "final" / "adapter_config.json").is_file()
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS"
    assert len(api.predict(str(run), ["alice in paris"])[0]["tags"]) == 3


def test_the_example_recipe_runs_on_the_tiny_model(tiny_bert, ner_conll, tmp_path):
    path = Path(__file__).parent.parent / "recipes" / "ner_wnut16.yaml"
    overrides = [
        f"model={tiny_bert}",
        f"data.source={ner_conll}",
        "train.max_steps=3",
        f"output.dir={tmp_path}",
    ]
    recipe = load_recipe(path, [*overrides, "train.precision=fp32"])
    assert recipe.task == "token_classification" and recipe.train.early_stopping.metric == "f1"
    assert load_recipe(path).data.source == "bundled:wnut16"
    assert "f1" in api.train(recipe)["test"]
