"""contrastive: tune the body on pairs of training texts first, then the head (SetFit: Tunstall et
al. 2022, "Efficient Few-Shot Learning Without Prompts", §3).

    pooling: mean                 # the head reads the mean-pooled embedding (strategy/pooling.py)
    contrastive:
      pairs: 20                   # R: per training text, R same-label and R different-label pairs
      sampling: cycle             # cycle | random | oversampling | undersampling | unique
      epochs: 1
      lr: 2.0e-5
      head: logistic              # logistic: fit the head in closed form on the tuned embeddings
      then: none                  # what the classification training trains next: none | head | all

Stage 1 (its own loop, before the Trainer): pairs (a, b) of training texts with target 1 when they
share a label and 0 otherwise; loss = (cos(p_a, p_b) - target)² (sentence-transformers'
CosineSimilarityLoss, which SetFit uses) on the mean-pooled embedding p of the backbone. What trains
is what the recipe's parts left trainable — full body, LoRA, BitFit, a freeze selection, adapters —
each parameter at `contrastive.lr` times its layer-wise factor from `lr` (LLRD, head lr, groups):
so "contrastive LoRA on the top half, then a head" is `freeze` + `peft` + `contrastive`. AdamW
(weight decay 0.01), linear warmup over `warmup` of the steps, then linear decay (ST's defaults).

`epochs: 0` skips stage 1 (with `head: logistic`: a linear probe on the pretrained embedding).
`blend: b` < 1 ends stage 1 with every tuned weight at b·tuned + (1 − b)·its value before the stage
(WiSE-FT, Wortsman et al. 2022: weight-space ensembling of the tuned and the pretrained model; on LoRA
it scales the learned update); the head is then fitted on that body.

Stage 2: `head: logistic` fits scikit-learn's LogisticRegression (lbfgs, C = `logistic_c`) on the
pooled embeddings of the train split and writes it into the head's linear layer (BERT-like heads
with `pooling`: the head is then exactly that regression); `head: train` leaves the head to the
Trainer. Then the recipe's normal training runs on the model as tuned, training `then`: `head`
(the body frozen), `all` (what the parts made trainable), or `none` (no Trainer steps: SetFit).

Pairs (`sampling`), all seeded by train.seed, made of the distinct pairs of training texts — a
text with itself included, a same-label pair, as SetFit's combinations with replacement
(`self_pairs: false` leaves them out):
- cycle: SetFit's `num_iterations` = R (sampler.py, ContrastiveDataset): R·n same-label and R·n
  other-label pairs, taken in turn from the shuffled distinct pairs of each kind and starting over
  when they run out, so every pair is used about equally often;
- random: for each text, R partners of its label and R of another, each drawn at random with
  replacement (a class with one text pairs it with itself): some pairs twice, some never;
- unique: every distinct pair once; oversampling: the smaller kind (usually same-label) repeated up
  to the size of the larger (SetFit ≥ 1.0's default without `num_iterations`); undersampling: the
  larger cut to the smaller.
`max_pairs` caps the total (a seeded subset).
"""

from __future__ import annotations

import math
import time
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hybridtune.errors import UserError
from hybridtune.strategy.base import Part
from hybridtune.strategy.pooling import embedding, head_modules


class ContrastiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: int = Field(
        20, ge=1, description="R: same-label and different-label pairs per text (random, cycle)"
    )
    sampling: Literal["cycle", "random", "oversampling", "undersampling", "unique"] = "random"
    self_pairs: bool = Field(
        True, description="a text paired with itself counts as a same-label pair (SetFit's); not with random"
    )
    max_pairs: int | None = Field(None, ge=1, description="at most this many pairs (a seeded subset)")
    epochs: float = Field(
        1, ge=0, description="passes over the pairs; 0: no body tuning, the head alone (a linear probe)"
    )
    batch_size: int = Field(16, ge=1, description="pairs per step")
    lr: float = Field(
        2e-5, gt=0, lt=1, description="body lr of this stage (times the `lr` section's factors)"
    )
    warmup: float = Field(0.1, ge=0, lt=1, description="share of the stage's steps spent warming up")
    head: Literal["logistic", "train"] = Field(
        "train",
        description="logistic: fit the linear head in closed form (needs `pooling`); train: by the Trainer",
    )
    logistic_c: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic head (sklearn's C)")
    blend: float = Field(
        1.0,
        ge=0,
        le=1,
        description="after the stage, each tuned weight becomes blend·tuned + (1 - blend)·before (WiSE-FT); "
        "1: the tuned body as is, 0: the body as before (a linear probe)",
    )
    then: Literal["head", "all", "none"] = Field(
        "head",
        description="what the classification training then trains: head, all (the parts' choice), none",
    )


def make_pairs(
    labels: list[int], config: ContrastiveConfig, rng: np.random.Generator
) -> list[tuple[int, int, float]]:
    """(i, j, target) index pairs over the training rows; see the module docstring."""
    labels_arr = np.asarray(labels)
    n = len(labels)
    out: list[tuple[int, int, float]]
    if config.sampling == "random":
        by_label = {v: np.flatnonzero(labels_arr == v) for v in sorted(set(labels))}
        not_label = {v: np.flatnonzero(labels_arr != v) for v in by_label}
        out = []
        for _ in range(config.pairs):
            for i in range(n):
                same = by_label[labels[i]]
                others = same[same != i] if len(same) > 1 else same
                out.append((i, int(rng.choice(others)), 1.0))
                out.append((i, int(rng.choice(not_label[labels[i]])), 0.0))
    else:  # index arrays into the distinct pairs: tuples only for the pairs kept
        first, second = np.triu_indices(n, 0 if config.self_pairs else 1)
        same = labels_arr[first] == labels_arr[second]
        pos, neg = np.flatnonzero(same), np.flatnonzero(~same)
        if config.sampling == "cycle":
            want = config.pairs * n
            kinds = [np.resize(rng.permutation(kind), want) for kind in (pos, neg) if len(kind)]
            chosen = np.stack(kinds, axis=1).ravel() if kinds else pos  # same, other, same, ... as SetFit
        else:
            small, large = sorted([pos, neg], key=len)
            if config.sampling == "oversampling" and len(small):
                small = np.resize(small, len(large))
            elif config.sampling == "undersampling":
                large = np.sort(rng.choice(large, size=len(small), replace=False))
            chosen = np.concatenate([small, large])
        out = [(int(first[k]), int(second[k]), float(same[k])) for k in chosen]
    order = rng.permutation(len(out))
    if config.max_pairs is not None:
        order = order[: config.max_pairs]
    return [out[k] for k in order]


def head_linear(model: nn.Module, n_labels: int) -> nn.Linear | None:
    """The head's one linear layer, when the head is nothing else (dropout aside): BERT-like models
    with `pooling`. None for heads with a hidden layer (RoBERTa, DistilBERT)."""
    linears, other = [], []
    for _, module in head_modules(model):
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                linears.append(sub)
            elif any(True for _ in sub.parameters(recurse=False)):
                other.append(sub)
    if len(linears) == 1 and not other and linears[0].out_features == n_labels:
        return linears[0]
    return None


def apply(model: nn.Module, config: ContrastiveConfig, build) -> nn.Module:
    """Checks only: the stage runs when training starts (`run`)."""
    peft_config = next(iter(getattr(model, "peft_config", {}).values()), None)
    if peft_config is not None and peft_config.is_prompt_learning:
        raise UserError(
            "contrastive",
            f"peft method {peft_config.peft_type.value.lower()}, whose virtual tokens the pooled embedding "
            "would not see",
            "a weight method (lora, dora, ia3, ...), adapters, bitfit or freeze",
        )
    if config.head == "logistic" and head_linear(model, len(build.labels.names)) is None:
        names = ", ".join(type(m).__name__ for _, m in head_modules(model))
        raise UserError(
            "contrastive.head",
            f"logistic with a head of {names}, not one linear layer on the pooled embedding",
            "head: train (the Trainer fits this head), or a BERT-like model",
        )
    return model


def check(config: ContrastiveConfig, recipe) -> None:
    if recipe.task != "classification":
        raise ValueError(f"contrastive: found it with task {recipe.task}; expected task: classification")
    if recipe.stages is not None:
        raise ValueError(
            "contrastive: found it with `stages`; expected one of them (the stage trains what "
            "the parts leave trainable, then `contrastive.then` decides)"
        )
    if recipe.data.text_pair_column:
        raise ValueError(
            f"contrastive: found data.text_pair_column {recipe.data.text_pair_column!r}; expected "
            "single texts (pairs are made of two training texts)"
        )
    if config.epochs == 0 and config.head != "logistic":
        raise ValueError(
            "contrastive.epochs: found 0 with head: train, a stage that does nothing; expected head: "
            "logistic (the closed-form head on the pretrained embedding) or epochs > 0"
        )
    if config.head == "logistic" and recipe.pooling is None:
        raise ValueError(
            "contrastive.head: found logistic without `pooling`; expected pooling: mean (the "
            "logistic head reads the pooled embedding the body was tuned on)"
        )


def training_args(config: ContrastiveConfig) -> dict:
    """`then: none`: the Trainer takes no step (the model is final after the stage)."""
    if config.then != "none":
        return {}
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    return {
        "num_train_epochs": 0,
        "max_steps": -1,
        "eval_strategy": IntervalStrategy.NO,
        "save_strategy": SaveStrategy.NO,
        "load_best_model_at_end": False,
    }


def validate_untrained(recipe, trainer) -> None:
    """`then: none` with a validation split: the Trainer took no step and so never validated; the
    model as the stages left it is validated once (Trainer's evaluate: the callbacks hear it,
    metrics.jsonl has it) and that is the run's best validation score, as every other run has one
    (report.json's best_validation: a search ranks its trials on it, compare reports it)."""
    dataset = trainer.eval_dataset
    if recipe.contrastive.then != "none" or recipe.data.validation_shots == 0 or not dataset:
        return
    metric = trainer.args.metric_for_best_model
    metrics = trainer.evaluate()
    trainer.state.best_metric = metrics.get(metric if metric.startswith("eval_") else f"eval_{metric}")


def _batches(tokenizer, texts: list[str], max_length: int, device) -> dict:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def tune(
    model,
    tokenizer,
    texts,
    labels,
    config: ContrastiveConfig,
    lr_factor,
    seed: int,
    max_length: int,
    autocast,
) -> dict:
    """Stage 1: the body on pairs (cosine-similarity loss); returns what contrastive.json records."""
    from transformers import get_linear_schedule_with_warmup

    if config.epochs == 0:  # a linear probe: the head alone, on the embedding as pretrained
        return {"pairs": 0, "positive_pairs": 0, "steps": 0, "seconds": 0.0, "losses": []}
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    pairs = make_pairs(labels, config, rng)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    before = [p.detach().clone() for _, p in named] if config.blend < 1 else None  # for `blend`
    groups: dict[tuple[float, float], list] = {}
    for name, p in named:
        decay = 0.0 if p.ndim < 2 else 0.01  # no decay on biases and norms, as Trainer does
        groups.setdefault((config.lr * lr_factor(name), decay), []).append(p)
    # fused, as the Trainer's default optimizer (adamw_torch_fused) and so SetFit's: one pass over
    # the weights a step (MiniLM, 2 CPU cores: 23 against 134 ms a step, benchmarks/bench_optimizer_step.py)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for _, p in named)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
        fused=fused or None,
    )
    per_epoch = math.ceil(len(pairs) / config.batch_size)
    steps = max(1, math.ceil(per_epoch * config.epochs))
    schedule = get_linear_schedule_with_warmup(optimizer, round(config.warmup * steps), steps)
    device = next(model.parameters()).device
    model.train()
    losses, started = [], time.perf_counter()
    for step in range(steps):
        k = (step % per_epoch) * config.batch_size
        if step and step % per_epoch == 0:
            pairs = [pairs[i] for i in rng.permutation(len(pairs))]  # a new order each pass
        batch = pairs[k : k + config.batch_size]
        a = _batches(tokenizer, [texts[i] for i, _, _ in batch], max_length, device)
        b = _batches(tokenizer, [texts[j] for _, j, _ in batch], max_length, device)
        target = torch.tensor([t for _, _, t in batch], device=device)
        with autocast():
            cos = F.cosine_similarity(embedding(model, a, False), embedding(model, b, False))
        loss = F.mse_loss(cos.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
    if before is not None:  # WiSE-FT (Wortsman et al. 2022): between the weights before and after
        with torch.no_grad():
            for (_, p), p0 in zip(named, before, strict=True):
                p.mul_(config.blend).add_(p0.to(p.dtype), alpha=1 - config.blend)
    return {
        "pairs": len(pairs),
        "positive_pairs": int(sum(t for _, _, t in pairs)),
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 2),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "blend": config.blend,
    }


@torch.no_grad()
def fit_logistic(
    model, tokenizer, texts, labels, n_labels: int, c: float, normalize: bool, max_length: int, autocast
) -> dict:
    """Stage 2 (head: logistic): LogisticRegression on the pooled embeddings, written into the head."""
    from sklearn.linear_model import LogisticRegression

    linear = head_linear(model, n_labels)
    device = next(model.parameters()).device
    model.eval()
    parts = []
    for k in range(0, len(texts), 64):
        with autocast():
            parts.append(
                embedding(model, _batches(tokenizer, texts[k : k + 64], max_length, device), normalize)
            )
    x = torch.cat(parts).float().cpu().numpy()
    y = np.asarray(labels)
    clf = LogisticRegression(C=c, max_iter=1000, fit_intercept=linear.bias is not None).fit(x, y)
    coef, bias = clf.coef_, clf.intercept_ if linear.bias is not None else np.zeros(1)
    weight = np.zeros((n_labels, x.shape[1]))
    intercept = np.zeros(n_labels)
    if len(clf.classes_) == 2:  # one row w: softmax over (-w/2, w/2) is sigmoid(w·x + b)
        weight[clf.classes_] = np.stack([-coef[0] / 2, coef[0] / 2])
        intercept[clf.classes_] = [-bias[0] / 2, bias[0] / 2]
    else:
        weight[clf.classes_], intercept[clf.classes_] = coef, bias
    linear.weight.copy_(torch.as_tensor(weight, dtype=linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_(torch.as_tensor(intercept, dtype=linear.bias.dtype))
    return {"train_accuracy": round(float(clf.score(x, y)), 4), "c": c}


def run(prep, precision: str) -> dict:
    """Both stages on a prepared run (run._train calls it before the Trainer); returns the record
    written to contrastive.json."""
    from hybridtune.train.precision import autocast as precision_autocast

    recipe, config = prep.recipe, prep.recipe.contrastive
    texts = prep.splits.train[recipe.data.text_column].tolist()
    index = {v: i for i, v in enumerate(prep.labels.values)}
    labels = [index[v] for v in prep.splits.train[recipe.data.label_column]]
    lrs, base_lr = prep.plan.lrs, recipe.train.lr
    autocast = lambda: precision_autocast(precision)  # noqa: E731
    record = tune(
        prep.model,
        prep.tokenizer,
        texts,
        labels,
        config,
        lambda name: lrs[name][0] / base_lr if name in lrs else 1.0,
        recipe.train.seed,
        recipe.data.max_length,
        autocast,
    )
    if config.head == "logistic":
        normalize = recipe.pooling.normalize if recipe.pooling is not None else True
        record["head"] = fit_logistic(
            prep.model,
            prep.tokenizer,
            texts,
            labels,
            len(prep.labels.names),
            config.logistic_c,
            normalize,
            recipe.data.max_length,
            autocast,
        )
    if config.then == "head":
        for name, p in prep.model.named_parameters():
            if prep.anatomy.slot_of(name) != "head":
                p.requires_grad_(False)
    record["then"] = config.then
    record["trainable_after"] = sum(p.numel() for p in prep.model.parameters() if p.requires_grad)
    return record


PART = Part(
    key="contrastive",
    config=ContrastiveConfig,
    apply=apply,
    check=check,
    training_args=training_args,
    summary="SetFit's stage before the Trainer: the body tuned on same / different-label pairs, then the head",
)
