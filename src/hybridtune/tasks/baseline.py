"""Did the run learn anything? The trivial baselines of a classification evaluation, and warnings
when a model does no better than them.

A model that answers the most frequent label for every input scores that label's share as its
accuracy (the majority-class baseline), and a collapsed model (a learning rate too high, a head that
never trained, labels shuffled against the texts) predicts one class for almost everything. Both
look like any other result in a table of numbers, so every evaluation of a classifier reports

    baseline:  majority_label, majority_share        the most frequent true label of the split
               top_predicted_label, top_predicted_share   the label the model predicts most
    warnings:  ["majority baseline: ...", "one class: ..."]   (empty when neither applies)

and the CLI, eval.json, report.json and compare's table carry the warnings. Each warning starts
with a short kind and a colon, which compare shows.

Token classification (NER) has its analogues, over words: the share of the most frequent gold tag
(almost always `O`: a model tagging everything `O` has that token accuracy and an entity F1 of 0),
and the warnings "no entities" (entity F1 0 on a split that has entities, e.g. only `O` predicted),
"one tag" (the same tag for every word) and "majority baseline" (token accuracy not above the
majority tag's share).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

# a model predicting one class for this share of a split or more has likely collapsed to it, unless
# the class itself is that frequent (then the majority-baseline warning speaks instead)
ONE_CLASS_SHARE = 0.95
EPS = 1e-9  # accuracy equal to the baseline counts as "not above" it despite float rounding


def shares(gold: Sequence, pred: Sequence, order: Sequence | None = None) -> dict:
    """The majority label of `gold` and the most-predicted one of `pred`, with their shares; a tie
    goes to the label first in `order` (the run's label order), else first seen."""
    n = len(gold)
    if n == 0:
        return {}
    true_counts, pred_counts = Counter(gold), Counter(pred)
    order = list(order or dict.fromkeys([*gold, *pred]))
    majority = max(order, key=lambda label: true_counts[label])  # max keeps the first of equals
    top = max(order, key=lambda label: pred_counts[label])
    return {
        "majority_label": majority,
        "majority_share": true_counts[majority] / n,
        "top_predicted_label": top,
        "top_predicted_share": pred_counts[top] / n,
        "top_predicted_true_share": true_counts[top] / n,
    }


def classification_warnings(accuracy: float, base: dict, n: int) -> list[str]:
    if not base:
        return []
    out = []
    if accuracy <= base["majority_share"] + EPS:
        out.append(
            f"majority baseline: accuracy {accuracy:.2%} is not above {base['majority_share']:.2%}, what "
            f"always answering the most frequent label '{base['majority_label']}' scores on these {n} "
            "examples; the model may have learned nothing"
        )
    top_share, true_share = base["top_predicted_share"], base["top_predicted_true_share"]
    if top_share >= ONE_CLASS_SHARE and true_share < ONE_CLASS_SHARE:
        out.append(
            f"one class: '{base['top_predicted_label']}' predicted for {top_share:.1%} of the {n} "
            f"examples (its true share: {true_share:.1%})"
        )
    return out


def token_warnings(scores: dict, base: dict, words: int, entities: int) -> list[str]:
    if not base:
        return []
    out = []
    if entities and scores["f1"] == 0:
        out.append(f"no entities: entity F1 is 0 on a split with {entities} entities")
    if base["top_predicted_share"] == 1.0 and base["top_predicted_true_share"] < 1.0:
        out.append(f"one tag: '{base['top_predicted_label']}' predicted for every one of the {words} words")
    if scores["accuracy"] <= base["majority_share"] + EPS and base["majority_share"] < 1.0:
        out.append(
            f"majority baseline: token accuracy {scores['accuracy']:.2%} is not above "
            f"{base['majority_share']:.2%}, the share of '{base['majority_label']}' among the {words} words"
        )
    return out


def short(warnings: Sequence[str]) -> list[str]:
    """The kinds of the warnings ("majority baseline", "one class", ...), as compare shows them."""
    return [w.split(":", 1)[0] for w in warnings]


def constant_answer_score(metric: str, gold: Sequence) -> float | None:
    """What answering the most frequent label of `gold` for every example scores under a classifier's
    validation `metric`: accuracy, that label's share p; macro-F1 (scikit-learn's, over the k labels
    present), 2p / (1 + p) for that label and 0 for the k - 1 others, averaged. None for any other
    metric (no constant-answer score is known for it here) and for an empty split."""
    counts = Counter(gold)
    if not counts:
        return None
    p = max(counts.values()) / len(gold)
    if metric == "accuracy":
        return p
    if metric == "f1_macro":
        return 2 * p / (1 + p) / len(counts)
    return None
