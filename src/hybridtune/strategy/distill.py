"""distill: knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network", arXiv:1503.02531). The recipe's model, the student, learns a finished run's (the teacher's)
class distribution softened by a temperature T, mixed with the hard labels:

    loss = alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − alpha) · CE(student, label)

    distill:
      teacher: runs/full     # a finished classification run with this recipe's label set
      temperature: 2.0       # T > 0; above 1 it softens both distributions (Hinton §2)
      alpha: 0.5             # weight of the soft term; 1 − alpha weighs the hard labels
      student_blocks: 3      # optional: the recipe's model cut to its bottom 3 blocks

T² keeps the soft term's gradients on the hard term's scale whatever T (Hinton §2: they scale as 1/T²).
`hybridtune distill TEACHER --blocks 3` writes such a recipe from the teacher's and compares the two
(hybridtune/distillation.py, docs/distill.md). It is a part like the others: the student composes with
freeze, LoRA, adapters, layer-wise lrs, stages.

The teacher's logits are computed once for every training row, when training begins (one teacher pass
instead of one per epoch, and no teacher in memory while the student trains), and looked up per batch
by what the student reads: a digest of the row's token ids. That key needs no column in the batches,
so the engine, the trunk cache (which has a row column of its own) and the other parts are as they
were; identical inputs get identical soft labels, and rows that read alike (two texts cut alike at
max_length) the mean of their teacher logits, all the student could learn from them. The teacher
reads the texts with its own tokenizer and data settings (soft labels over classes need no shared
vocabulary); a chunked student's windows each learn their document's soft label, as they learn its
hard label. The soft labels are written to the run dir (soft_labels.safetensors) before the first
step; a resumed run reads them back, so it learns from the very same numbers.

Unlabelled texts (`data.unlabeled`, data/unlabeled.py) join the training set through the part
contract's `train_rows` hook, as rows labelled -100 (Hinton §3 trains on a transfer set that needs
no labels): the teacher scores them with the labelled rows, and they learn the soft term alone: the
hard loss is the mean over the batch's labelled rows, 0 when there are none (torch's mean over no
rows is NaN).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_outputs import SequenceClassifierOutput

from hybridtune import durable
from hybridtune.data.long_texts import DOC, pool
from hybridtune.data.unlabeled import read_unlabeled
from hybridtune.device import to_device
from hybridtune.errors import UserError
from hybridtune.model.anatomy import Anatomy, unwrap
from hybridtune.model.depth import keep_bottom_blocks
from hybridtune.strategy.base import LossTerm, Part, TrainRows, patch_forward
from hybridtune.train.precision import autocast

ATTR = "hybridtune_distill"  # the SoftLabels holder on the student (a plain attribute, no parameters)
FILE = "soft_labels.safetensors"  # in the run dir: the soft labels the run learns from
ENSEMBLE_MANIFEST = "ensemble.json"  # hybridtune.ensemble's MANIFEST (a layer above: not imported)
FAILED = "failed.json"  # rundir.FAILED: a run that failed after its final/ was saved (the test evaluation)
IGNORE = -100  # torch's cross-entropy ignore_index: a row without a hard label


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(
        ..., min_length=1, description="a finished classification run dir with the same labels"
    )
    temperature: float = Field(2.0, gt=0, description="T: teacher and student logits are divided by T")
    alpha: float = Field(
        0.5, ge=0, le=1, description="loss = alpha·T²·KL(teacher ‖ student) + (1 − alpha)·CE(hard labels)"
    )
    student_blocks: int | None = Field(
        None,
        ge=1,
        description="the recipe's model cut to its bottom k blocks (k below its depth); default: whole",
    )


# --------------------------------------------------------------------------------------------------
# the losses


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), the mean over the rows (Hinton 2015)."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def hard_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The cross-entropy's mean over the rows with a hard label (the model's own loss when all have
    one); 0, with a graph, for a batch of unlabelled rows only, where torch's mean is 0/0 = NaN."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


def hard_label_forward(self, inner, inputs: dict):
    """The model's forward with `hard_loss` as its loss (patch_forward: outermost, after fusion)."""
    labels = inputs.pop("labels", None)
    out = inner(**inputs)
    if labels is None:
        return out
    return SequenceClassifierOutput(
        loss=hard_loss(out.logits, labels),
        logits=out.logits,
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )


# --------------------------------------------------------------------------------------------------
# the teacher's soft labels


def row_key(ids) -> bytes:
    """A row's key: the digest of its token ids (a list, or a 1-d tensor of the unpadded row)."""
    data = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


def soft_label_rows(build) -> tuple[Any, Any]:
    """The texts the student learns the teacher's soft labels on (a frame) and their encoded rows:
    every training row, the labelled split's and those parts added (`train_rows`: the unlabelled
    texts, label IGNORE, which `hard_loss` skips, so they learn the soft term alone)."""
    frame = build.train_frame if build.train_frame is not None else build.splits.train
    return frame, build.datasets["train"]


def train_rows(config: DistillConfig, build) -> TrainRows | None:
    """The texts of `data.unlabeled` (data/unlabeled.py: each once, none of the labelled splits'),
    encoded as the training split is, with the label IGNORE. None without data.unlabeled, or with
    `self_training`, whose rounds pseudo-label the texts instead (they run without data.unlabeled)."""
    data = build.recipe.data
    if data.unlabeled is None or build.recipe.self_training is not None:
        return None
    unlabeled = read_unlabeled(data, build.splits, build.labels)  # a bad file: UserError, file:row
    frame = pd.DataFrame({data.text_column: unlabeled.texts})
    dataset = build.task.encode(frame, build.tokenizer, None, data)
    dataset = dataset.add_column("labels", [IGNORE] * len(dataset))
    return TrainRows(frame, dataset, {"unlabeled": unlabeled.summary()})


@torch.no_grad()
def teacher_logits(teacher, frame, data_cfg, batch_size: int) -> np.ndarray:
    """The teacher's logits [texts, classes] for the rows of `frame`, read as the teacher reads them:
    its tokenizer and data settings (`data_cfg`), windows pooled per text as its evaluation pools
    them, in its recipe's precision."""
    task, tokenizer = teacher.task, teacher.tokenizer
    dataset = task.encode(frame, tokenizer, None, data_cfg)
    collate = task.collator(tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = teacher.model.to(device).eval()
    features = [{k: v for k, v in row.items() if k not in ("labels", DOC)} for row in dataset]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))  # less padding
    out = np.zeros((len(features), len(teacher.labels.names)), dtype=np.float32)
    with autocast(teacher.recipe.train.precision):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = to_device(collate([features[i] for i in rows]), device)
            out[rows] = model(**batch).logits.float().cpu().numpy()
    return pool(out, dataset[DOC], teacher.labels.pool) if DOC in dataset.column_names else out


class SoftLabels:
    """The teacher's logits for every training row, keyed by `row_key`. A plain holder, not an
    nn.Module: nothing of it is in the student's parameters, state dict, checkpoints or final/."""

    def __init__(self, teacher, frame, dataset, data_cfg, batch_size: int, reference: dict):
        self.teacher, self.frame, self.data_cfg, self.batch_size = teacher, frame, data_cfg, batch_size
        self.reference = reference  # the teacher, T and alpha: the file's metadata
        self.rows = [row_key(ids) for ids in dataset["input_ids"]]
        # the text each encoded row comes from: itself, or a window's document (data.long_texts: chunks)
        self.texts = list(dataset[DOC]) if DOC in dataset.column_names else list(range(len(dataset)))
        if len(self.texts) and max(self.texts) >= len(frame):
            raise RuntimeError(f"distill: {len(frame)} texts for rows of text {max(self.texts)}")
        self.index: dict[bytes, int] = {}
        self.logits: torch.Tensor | None = None
        self.seconds: float | None = None

    def compute(self) -> None:
        """One teacher pass over the texts (once: later calls return at once); the teacher is released."""
        if self.logits is not None:
            return
        started = time.perf_counter()
        per_text = teacher_logits(self.teacher, self.frame, self.data_cfg, self.batch_size)
        groups: dict[bytes, list[int]] = {}
        for key, text in zip(self.rows, self.texts, strict=True):
            groups.setdefault(key, []).append(int(text))
        self.index = {key: i for i, key in enumerate(groups)}
        stacked = np.stack([per_text[texts].mean(0) for texts in groups.values()]) if groups else per_text
        self.logits = torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32))
        self.seconds = round(time.perf_counter() - started, 3)
        self.release()

    def release(self) -> None:
        self.teacher = self.frame = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The teacher's logits for the rows of a padded batch (the mask picks each row's tokens)."""
        self.compute()
        ids = input_ids.detach().cpu()
        mask = attention_mask.detach().cpu().bool() if attention_mask is not None else None
        found = []
        for i in range(ids.shape[0]):
            j = self.index.get(row_key(ids[i][mask[i]] if mask is not None else ids[i]))
            if j is None:
                raise RuntimeError("distill: a training row the teacher did not score (its tokens differ)")
            found.append(j)
        return self.logits[found]

    def metadata(self) -> dict[str, str]:
        digest = hashlib.sha256(self.logits.numpy().tobytes()).hexdigest()
        info = {"rows": len(self.index), "seconds": self.seconds, "sha256": digest, **self.reference}
        return {k: json.dumps(v) for k, v in info.items()}

    def save(self, path: Path) -> None:
        from safetensors.torch import save

        keys = np.frombuffer(b"".join(self.index), dtype=np.uint8).reshape(-1, 16).copy()
        tensors = {"keys": torch.from_numpy(keys), "logits": self.logits}
        durable.write_bytes(path, save(tensors, metadata=self.metadata()))

    def load(self, path: Path) -> None:
        """The soft labels a run wrote when it began (a resumed run learns from the same numbers)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys, logits, meta = f.get_tensor("keys"), f.get_tensor("logits"), f.metadata()
        index = {bytes(row.tolist()): i for i, row in enumerate(keys)}
        if not set(self.rows) <= set(index):
            raise UserError(
                str(path), "soft labels of other training rows", "those of this run's training split"
            )
        self.index, self.logits, self.seconds = index, logits, json.loads(meta.get("seconds", "null"))
        self.release()


class SoftLabelsFile(TrainerCallback):
    """The soft labels computed when training begins and written once to the run dir; a resumed run
    (the file is there) reads them back instead."""

    def __init__(self, soft: SoftLabels):
        self.soft = soft

    def on_train_begin(self, args, state, control, **kwargs):
        path = Path(args.output_dir).parent / FILE  # output_dir: <run>/checkpoints
        if path.is_file() and state.global_step > 0:
            self.soft.load(path)
            return
        self.soft.compute()
        if state.is_world_process_zero:
            self.soft.save(path)


# --------------------------------------------------------------------------------------------------
# the hooks


def reshape(model: nn.Module, config: DistillConfig) -> nn.Module:
    if config.student_blocks is None:
        return model
    anatomy = Anatomy.of(model)
    k, depth = config.student_blocks, anatomy.num_blocks
    if k >= depth:
        raise UserError(
            "distill.student_blocks",
            f"{k} for a model of {depth} blocks",
            f"1 to {depth - 1} (the bottom blocks the student keeps)",
        )
    return keep_bottom_blocks(model, anatomy.blocks_path, k)


def load_teacher(path: str, build) -> Any:
    """The teacher run (inference.LoadedRun), checked against the recipe: a finished run of its task
    and labels, reading text pairs where the recipe does."""
    where, root = "distill.teacher", Path(path).expanduser()
    if (root / ENSEMBLE_MANIFEST).is_file():
        raise UserError(
            where, f"an ensemble dir ({path})", "a run dir (distil from an ensemble's best member)"
        )
    if not (root / "run.json").is_file() or not (root / "final").is_dir():  # final/: written when it ends
        raise UserError(
            where,
            f"'{path}', not a finished run (no run.json and final/)",
            "a run dir `hybridtune train` finished",
        )
    if (root / FAILED).is_file():
        raise UserError(where, f"'{path}', a failed run ({FAILED})", "a run dir `hybridtune train` finished")
    teacher = build.load_run(str(root))
    if teacher.task.NAME != build.task.NAME:
        raise UserError(where, f"a {teacher.task.NAME} run", f"a {build.task.NAME} run, this recipe's task")
    ours = list(build.labels.names)
    if list(teacher.labels.names) != ours:
        raise UserError(
            where, f"a run with labels {teacher.labels.names}", f"a run with this recipe's labels {ours}"
        )
    if bool(teacher.recipe.data.text_pair_column) != bool(build.recipe.data.text_pair_column):
        raise UserError(
            where,
            "a run of another input kind (one text / text pairs)",
            "a run that reads what this recipe reads",
        )
    return teacher


def apply(model: nn.Module, config: DistillConfig, build) -> nn.Module:
    teacher = load_teacher(config.teacher, build)
    frame, dataset = soft_label_rows(build)
    data = build.recipe.data
    # the teacher's own max_length and long-text handling, on this recipe's text columns
    data_cfg = teacher.recipe.data.model_copy(
        update={"text_column": data.text_column, "text_pair_column": data.text_pair_column}
    )
    reference = {
        "teacher": str(Path(config.teacher).expanduser().resolve()),
        "temperature": config.temperature,
        "alpha": config.alpha,
    }
    soft = SoftLabels(teacher, frame, dataset, data_cfg, build.recipe.train.eval_batch_size, reference)
    base = unwrap(model)
    setattr(base, ATTR, soft)
    patch_forward(base, hard_label_forward)
    return model


def soft_labels_of(model: nn.Module) -> SoftLabels:
    return getattr(unwrap(getattr(model, "module", model)), ATTR)  # DDP's .module, peft's base


def loss_terms(
    config: DistillConfig, model: nn.Module, inputs: dict, task_loss: torch.Tensor, outputs
) -> list[LossTerm]:
    student = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    teacher = soft_labels_of(model).lookup(inputs["input_ids"], inputs.get("attention_mask"))
    value = soft_loss(student, teacher.to(student.device), config.temperature)
    return [LossTerm("distill", value, config.alpha)]


def task_weight(config: DistillConfig) -> float:
    return 1.0 - config.alpha


def check(config: DistillConfig, recipe) -> None:
    if recipe.task != "classification":
        raise ValueError(
            f"distill: found it with task {recipe.task}; expected task classification (the target is "
            "the teacher's class distribution)"
        )
    if recipe.ensemble is not None and recipe.ensemble.shared_trunk:
        raise ValueError(
            "distill: found it with ensemble.shared_trunk; expected members trained one by one (the "
            "joint model's loss is its members' sum, with no soft labels of each)"
        )
    if recipe.data.unlabeled is not None and recipe.self_training is None:
        if recipe.data.text_pair_column:
            raise ValueError(
                "distill: found data.unlabeled with data.text_pair_column; expected single texts "
                "(unlabelled texts are single texts)"
            )
        if config.alpha == 0:
            raise ValueError(
                "distill.alpha: found 0 with data.unlabeled; expected alpha > 0 (the unlabelled texts "
                "learn the soft term alone, weighed alpha)"
            )
    if recipe.contrastive is not None and recipe.contrastive.then == "none":
        raise ValueError(
            "distill: found it with contrastive.then: none; expected head or all (with none the "
            "Trainer takes no step, so nothing learns the soft labels)"
        )


def callbacks(model: nn.Module, config: DistillConfig, build) -> list[TrainerCallback]:
    return [SoftLabelsFile(soft_labels_of(model))]


PART = Part(
    key="distill",
    config=DistillConfig,
    apply=apply,
    reshape=reshape,
    train_rows=train_rows,
    check=check,
    loss_terms=loss_terms,
    task_weight=task_weight,
    callbacks=callbacks,
    loads_runs=True,
    summary="knowledge distillation: the model learns a finished run's soft labels (temperature T, "
    "weight alpha with the hard labels), on data.unlabeled too; optionally cut to its bottom k blocks",
)
