"""Does scikit-learn's LogisticRegression need more than its default 100 lbfgs iterations on the
mean-pooled, normalised all-MiniLM-L6-v2 embeddings of a k-shot draw? SetFit fits its head with
the default (max_iter=100), recipes/setfit.yaml with max_iter=1000 (docs/few_shot.md): if the fit
stopped early at 100, SetFit's head would be a more strongly regularised one.

    python benchmarks/check_logistic_iterations.py      # ~1 min on 2 cores

For two draws each of the chatterbot topics (k = 16, 8) and Rotten Tomatoes (k = 16), the draws
bench_fewshot.py uses: lbfgs iterations and test accuracy at both caps, on the pretrained body.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fewshot import DATASETS, export_draw  # noqa: E402


def main() -> None:
    from hybridtune.bundled import model_path
    from hybridtune.strategy.pooling import mean_pool  # the pooling the recipes' head reads

    path = model_path("bundled:minilm")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(texts: list[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                b = tok(texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
                out.append(mean_pool(model(**b).last_hidden_state, b["attention_mask"], True))
        return torch.cat(out).numpy()

    root = Path(tempfile.mkdtemp(prefix="logistic-iterations-"))
    for name, k in (("chatterbot_topics", 16), ("chatterbot_topics", 8), ("rotten_tomatoes", 16)):
        for draw in range(2):
            d = root / name / f"k{k}" / f"d{draw}"
            export_draw(DATASETS[name], k, 5, draw, d, None)
            train, test = (pd.read_json(d / f"{s}.jsonl", lines=True) for s in ("train", "test"))
            x_train, x_test = embed(train.text.tolist()), embed(test.text.tolist())
            row = []
            for cap in (100, 1000):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a ConvergenceWarning would show in n_iter == cap
                    clf = LogisticRegression(max_iter=cap).fit(x_train, train.label.astype(str))
                accuracy = 100 * clf.score(x_test, test.label.astype(str))
                row.append(f"max_iter {cap}: {int(np.max(clf.n_iter_))} iterations, test {accuracy:.2f} %")
            print(f"{name} k={k} draw {draw}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
