"""Prompt-based classification (PET): a masked or causal LM scores a verbalizer word per label in the
answer slot of a template; see strategy/prompt.py for the template, the scoring and the loss.

Data, labels, metrics and reports are classification's (tasks/classification.py); what differs is
the encoding (the template around the text), the model (AutoModelForMaskedLM for encoders,
AutoModelForCausalLM for decoders, with its own pretrained LM head instead of a new classifier) and
that the untrained model already classifies: `zero_shot` reports it, `hybridtune train` writes it into
report.json next to the tuned figures, and `hybridtune eval RECIPE.yaml` evaluates a recipe's base
model without training.

The task depends on the recipe's `prompt` section, so it has the `bind` capability (tasks/base.py):
api binds it to the recipe and uses the returned `PromptTask` wherever it would use a task module.
"""

from __future__ import annotations

import pandas as pd

from hybridtune.strategy import prompt
from hybridtune.tasks import classification

NAME = "prompt_classification"  # its spec: hybridtune/tasks/__init__.py; the contract: tasks/base.py
# what the CLI reads off the task module of a finished run (api.task_of): classification's
eval_tables = classification.eval_tables
format_prediction = classification.format_prediction


def bind(recipe) -> PromptTask:
    return PromptTask(recipe)


class PromptTask:
    """The task module's interface, with the recipe's prompt config at hand."""

    NAME = NAME
    Labels = classification.Labels
    # classification's, unchanged
    load_splits = staticmethod(classification.load_splits)
    label_space = staticmethod(classification.label_space)
    make_compute_metrics = staticmethod(classification.make_compute_metrics)
    report = staticmethod(classification.report)
    eval_frame = staticmethod(classification.eval_frame)
    format_prediction = staticmethod(classification.format_prediction)
    eval_tables = staticmethod(classification.eval_tables)

    def __init__(self, recipe):
        self.recipe = recipe
        self.config = recipe.prompt or prompt.PromptConfig()
        self.prompt_format: prompt.PromptFormat | None = None

    @property
    def peft_task_type(self) -> str | None:
        # peft's CAUSAL_LM wrapper for decoders; none of its task wrappers fits a masked LM
        return "CAUSAL_LM" if self.prompt_format and self.prompt_format.kind == "causal" else None

    # ----------------------------------------------------------------------------------------------
    # model

    def load_model(self, path: str, tokenizer, labels):
        """The LM with its pretrained head: masked LM if the architecture has one, else causal LM."""
        from transformers import AutoConfig

        from hybridtune.model.loading import lm_class
        from hybridtune.model.loading import load_model as load

        try:
            model_type = AutoConfig.from_pretrained(path).model_type
        except Exception:  # the loader below reports it with the recipe key
            model_type = None
        model, new = load(lm_class(model_type), path, tokenizer)
        kind = prompt.kind_of(model)
        tokenizer.padding_side = "left" if kind == "causal" else "right"  # the answer follows the last token
        self.prompt_format = prompt.resolve(
            self.config, tokenizer, kind, labels.names, bool(self.recipe.data.text_pair_column)
        )
        return model, new

    def base_scorer(self):
        """The base model with the prompt and nothing trained: the zero-shot classifier."""
        from hybridtune.model.loading import resolve, tokenizer_path

        return prompt.load_scorer(
            resolve(self.recipe.model.name), self.prompt_format, tokenizer_path(self.recipe.model)[0]
        )

    def zero_shot(self, tokenizer, dataset, labels, model=None) -> dict:
        """classification's full report of the base scorer (or of `model`, an LM this task loaded, with the
        prompt attached) on an encoded dataset."""
        scorer = self.base_scorer() if model is None else prompt.attach(model, self.prompt_format).eval()
        return classification.report(scorer, tokenizer, dataset, labels)

    # ----------------------------------------------------------------------------------------------
    # data

    def encode(self, frame: pd.DataFrame, tokenizer, labels, data_cfg):
        import datasets

        if self.prompt_format is None:
            raise RuntimeError("load_model resolves the prompt against the model; call it first")
        texts = frame[data_cfg.text_column].tolist()
        pairs = frame[data_cfg.text_pair_column].tolist() if data_cfg.text_pair_column else None
        ids = prompt.encode(self.prompt_format, tokenizer, texts, pairs, data_cfg.max_length)
        columns = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
        # segment ids for encoders that use them; a decoder (GPT-2) would add them to its embeddings
        if "token_type_ids" in tokenizer.model_input_names and self.prompt_format.kind == "mlm":
            columns["token_type_ids"] = [[0] * len(x) for x in ids]
        if labels is not None and data_cfg.label_column in frame:
            index = {v: i for i, v in enumerate(labels.values)}
            columns["labels"] = [index[v] for v in frame[data_cfg.label_column]]
        return datasets.Dataset.from_dict(columns)

    def collator(self, tokenizer):
        return classification.collator(tokenizer)

    def predict(self, model, tokenizer, labels, data_cfg, texts: list[str], text_pairs=None) -> list[dict]:
        return classification.predict(
            model, tokenizer, labels, data_cfg, texts, text_pairs, encoder=self.encode
        )
