"""Token classification (NER): a BIO tag per word, entity-level metrics.

Owns its preprocessing (BIO tags aligned to sub-word tokens), its head (AutoModelForTokenClassification
adds a new linear layer over every token of any backbone), its loss (the model's cross-entropy over
the labelled positions) and its metrics (entity-level precision / recall / F1 from seqeval, per entity
type).

Data: CoNLL-style files (`token<TAB>tag` lines, see data/conll.py) or tables (JSON Lines, parquet, a
saved dataset) with a list of tokens and a list of tags per row (`data.tokens_column`,
`data.tags_column`). Tags are IOB2 strings: O, B-<type>, I-<type>.

Alignment (as transformers' run_ner example, Devlin et al. 2019 section 5.3): a word's tag goes to its
first sub-token; its other sub-tokens and the special tokens get -100, which the loss and the metrics
ignore. A prediction is read off each word's first sub-token. Words cut off by `data.max_length` are
neither trained on nor scored (and are tagged O by `predict`).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch

from hybridtune.data import Splits, check_columns
from hybridtune.data import load_splits as load_data_splits
from hybridtune.data.conll import check_sentence
from hybridtune.data.sources import read_table
from hybridtune.device import to_device
from hybridtune.errors import UserError
from hybridtune.tasks import baseline
from hybridtune.tasks.classification import Labels

NAME = "token_classification"  # its spec: hybridtune/tasks/__init__.py; the contract: tasks/base.py
peft_task_type = "TOKEN_CLS"
IGNORE = -100  # the label id torch's cross-entropy (and our metrics) skip


def columns(data_cfg) -> dict[str, str]:
    return {"tokens_column": data_cfg.tokens_column, "tags_column": data_cfg.tags_column}


def row_checker(data_cfg):
    """Check every row (tokens and tags: equal-length lists, IOB2) and make both plain lists of str."""

    def check(frame: pd.DataFrame) -> pd.DataFrame:
        tok, tag = data_cfg.tokens_column, data_cfg.tags_column
        for tokens, tags, where in zip(frame[tok], frame[tag], frame["_where"], strict=True):
            check_sentence(tokens, tags, where)
        frame = frame.copy()
        frame[tok] = [list(map(str, t)) for t in frame[tok]]
        frame[tag] = [list(map(str, t)) for t in frame[tag]]
        return frame

    return check


def load_splits(data_cfg) -> Splits:
    # not stratified (a sentence has many tags); de-duplicated on the tokens alone, so the same
    # sentence tagged twice cannot land in two splits
    return load_data_splits(
        data_cfg, columns(data_cfg), None, row_checker(data_cfg), inputs=[data_cfg.tokens_column], texts=False
    )


def label_space(splits: Splits, data_cfg) -> Labels:
    """O, then B-/I- of every entity type found in any split, types sorted by name.

    Every split counts: a rare type can fall entirely outside the training split of a small data set,
    and its gold entities must still be scored (as misses) rather than refused."""
    types = sorted(
        {
            tag[2:]
            for name in ("train", "validation", "test")
            for tags in splits[name][data_cfg.tags_column]
            for tag in tags
            if tag != "O"
        }
    )
    if not types:
        raise UserError(
            f"data.{data_cfg.tags_column}",
            "only O tags (no entity in the data)",
            "B-/I- tags of at least one type",
        )
    names = ["O", *(f"{p}-{t}" for t in types for p in ("B", "I"))]
    return Labels(values=names, names=names)


def align_labels(word_ids: list[int | None], word_tags: list[int]) -> list[int]:
    """Tag ids per sub-token: a word's tag on its first sub-token, -100 elsewhere (see module doc)."""
    out, previous = [], None
    for word in word_ids:
        out.append(IGNORE if word is None or word == previous else word_tags[word])
        previous = word
    return out


def _check_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "model.name",
            f"a model with a slow tokenizer ({type(tokenizer).__name__})",
            "a fast (Rust) tokenizer: token classification maps sub-tokens to words with word_ids()",
        )


def encode(frame: pd.DataFrame, tokenizer, labels: Labels | None, data_cfg):
    """A datasets.Dataset of input_ids / attention_mask (/ token_type_ids) and aligned `labels`."""
    import datasets

    _check_fast(tokenizer)
    words = frame[data_cfg.tokens_column].tolist()
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=data_cfg.max_length)
    columns = dict(enc)
    if labels is not None and data_cfg.tags_column in frame:
        index = {name: i for i, name in enumerate(labels.names)}
        columns["labels"] = [
            align_labels(enc.word_ids(i), [index[t] for t in tags])
            for i, tags in enumerate(frame[data_cfg.tags_column])
        ]
    return datasets.Dataset.from_dict(columns)


def collator(tokenizer):
    """Pads input ids and the label lists (with -100) per batch."""
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)


def load_model(path: str, tokenizer, labels: Labels):
    from transformers import AutoModelForTokenClassification

    from hybridtune.model.loading import load_model as load

    return load(
        AutoModelForTokenClassification,
        path,
        tokenizer,
        num_labels=len(labels.names),
        id2label=labels.id2label,
        label2id=labels.label2id,
    )


# --------------------------------------------------------------------------------------------------
# metrics


def tag_sequences(
    pred_ids: np.ndarray, label_ids, names: list[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """(gold, predicted) tag names per sentence, over the labelled positions only."""
    gold, pred = [], []
    for p_row, l_row in zip(pred_ids, label_ids, strict=True):
        keep = [i for i, label in enumerate(l_row) if label != IGNORE]
        gold.append([names[l_row[i]] for i in keep])
        pred.append([names[p_row[i]] for i in keep])
    return gold, pred


def scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision / recall / F1 (conlleval's matching, via seqeval), token accuracy and
    the macro-F1 over entity types."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "accuracy": float(accuracy_score(gold, pred)),
        "f1_macro": float(f1_score(gold, pred, average="macro", zero_division=0)),
    }


def make_compute_metrics(labels: Labels):
    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, label_ids = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        return scores(*tag_sequences(np.asarray(logits).argmax(-1), label_ids, labels.names))

    return compute_metrics


def full_report(gold: list[list[str]], pred: list[list[str]], labels: Labels) -> dict:
    """The headline scores, precision / recall / F1 / support per entity type, the majority-tag
    baseline and the warnings of a model that found no entities (tasks/baseline.py)."""
    from seqeval.metrics import classification_report
    from seqeval.metrics.sequence_labeling import get_entities

    per_type = classification_report(gold, pred, output_dict=True, zero_division=0)
    types = sorted({name[2:] for name in labels.names if name != "O"})
    empty = {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    headline = scores(gold, pred)
    entities = sum(len(get_entities(tags)) for tags in gold)
    words_gold, words_pred = [t for s in gold for t in s], [t for s in pred for t in s]
    base = baseline.shares(
        words_gold, words_pred, labels.names
    )  # over words: the majority tag is almost always O
    return {
        **headline,
        "n": len(gold),
        "entities": entities,
        "baseline": base,
        "warnings": baseline.token_warnings(headline, base, len(words_gold), entities),
        "per_type": {
            t: {k: (int(v) if k == "support" else float(v)) for k, v in per_type.get(t, empty).items()}
            for t in types
        },
        "labels": labels.names,
    }


@torch.no_grad()
def token_logits(
    model: torch.nn.Module, tokenizer, features: list[dict], batch_size: int = 64
) -> list[np.ndarray]:
    """Per example, its logits (length x labels), without padding, in order. Rows are batched by
    length (sorted, then put back in order), as classification's `logits_of` does."""
    collate = collator(tokenizer)
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    out: list[np.ndarray] = [np.zeros(0)] * len(features)
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        chunk = [{k: v for k, v in features[j].items() if k != "labels"} for j in rows]
        batch = to_device(collate(chunk), device)  # on CUDA: pinned host memory, non-blocking copies
        logits = model(**batch).logits.float().cpu().numpy()
        for n, j in enumerate(rows):
            out[j] = logits[n, : len(features[j]["input_ids"])]
    return out


def report(model: torch.nn.Module, tokenizer, dataset, labels: Labels) -> dict:
    """`full_report` of the model's predictions on an encoded dataset (with labels)."""
    rows = list(dataset)
    logits = token_logits(model, tokenizer, rows)
    gold, pred = tag_sequences([x.argmax(-1) for x in logits], [r["labels"] for r in rows], labels.names)
    return full_report(gold, pred, labels)


def eval_frame(data: str | None, data_cfg, labels: Labels) -> pd.DataFrame:
    """The rows to evaluate: the recipe's test split, or every sentence of `data` (file or dataset dir)."""
    if data is None:
        return load_splits(data_cfg).test
    frame = read_table(data, "--data", data_cfg.delimiter)
    if isinstance(frame, dict):
        frame = frame["test"] if "test" in frame else next(iter(frame.values()))
    check_columns(frame, columns(data_cfg), data)
    frame = row_checker(data_cfg)(frame)
    known = set(labels.names)
    for tags, where in zip(frame[data_cfg.tags_column], frame["_where"], strict=True):
        for i, tag in enumerate(tags):
            if tag not in known:
                raise UserError(
                    f"{where}, token {i + 1}",
                    f"tag {tag!r}, unknown to this run",
                    "one of " + ", ".join(labels.names),
                )
    return frame


# --------------------------------------------------------------------------------------------------
# inference


def predict(model, tokenizer, labels: Labels, data_cfg, texts: list[str], text_pairs=None) -> list[dict]:
    """The entities in each text (split into words at whitespace), with character offsets and scores."""
    from seqeval.metrics.sequence_labeling import get_entities

    if text_pairs:
        raise UserError(
            "--pair", f"{len(text_pairs)} second texts", "none: token classification tags single texts"
        )
    _check_fast(tokenizer)
    spans = []
    for i, text in enumerate(texts):
        words = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        if not words:
            raise UserError(f"text {i + 1}", "an empty text", "a non-empty text")
        spans.append(words)
    enc = tokenizer(
        [[w for w, _, _ in s] for s in spans],
        is_split_into_words=True,
        truncation=True,
        max_length=data_cfg.max_length,
    )
    features = [{k: enc[k][i] for k in enc} for i in range(len(texts))]
    rows = []
    for i, logits in enumerate(token_logits(model, tokenizer, features)):
        probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
        tags, conf = ["O"] * len(spans[i]), [1.0] * len(spans[i])
        previous = None
        for position, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                tags[word] = labels.names[int(probs[position].argmax())]
                conf[word] = float(probs[position].max())
            previous = word
        entities = []
        for kind, start, end in get_entities(tags):
            first, last = spans[i][start][1], spans[i][end][2]
            entities.append(
                {
                    "type": kind,
                    "text": texts[i][first:last],
                    "start": first,
                    "end": last,
                    "score": float(np.mean(conf[start : end + 1])),
                }
            )
        rows.append(
            {"text": texts[i], "tokens": [w for w, _, _ in spans[i]], "tags": tags, "entities": entities}
        )
    return rows


def format_prediction(row: dict) -> str:
    """One line per text for the CLI: the text, then `type: entity text (score)` for each entity."""
    found = "; ".join(f"{e['type']}: {e['text']} ({e['score']:.2f})" for e in row["entities"])
    return f"{row['text']}\t{found or '(no entities)'}"


def eval_tables(report: dict, title: str = "test") -> list:
    from rich.table import Table

    from hybridtune.report.console import add_baseline_rows, warning_lines

    summary = Table(title=f"{title}: {report['n']} sentences, {report['entities']} entities")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for key, label in (
        ("f1", "entity F1 (micro)"),
        ("precision", "entity precision"),
        ("recall", "entity recall"),
        ("f1_macro", "entity F1 (macro over types)"),
        ("accuracy", "token accuracy"),
    ):
        summary.add_row(label, f"{100 * report[key]:.2f} %")
    add_baseline_rows(summary, report, "tag")
    per_type = Table(title="per entity type")
    for col in ("type", "precision", "recall", "F1", "support"):
        per_type.add_column(col, justify="left" if col == "type" else "right")
    for name, row in report["per_type"].items():
        per_type.add_row(
            name,
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1-score']:.3f}",
            str(row["support"]),
        )
    return [summary, per_type, *warning_lines(report)]
