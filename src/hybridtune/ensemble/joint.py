"""Shared-trunk training: K members above one frozen trunk, trained together (one trunk forward
per batch), then saved as K normal runs and combined as an output ensemble."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hybridtune import run as one_run
from hybridtune import rundir
from hybridtune.ensemble.config import COMBINES
from hybridtune.ensemble.members import member_recipes
from hybridtune.ensemble.outputs import build
from hybridtune.ensemble.shared import share_trunk, trunk_depth
from hybridtune.errors import UserError
from hybridtune.model.anatomy import Anatomy, canonical, unwrap
from hybridtune.recipe import recipe_to_yaml
from hybridtune.strategy.plan import Plan
from hybridtune.tasks import classification
from hybridtune.train import run_files
from hybridtune.train.engine import make_trainer, training_arguments


class JointMembers(torch.nn.Module):
    """K classifiers trained as one module: the trunk they share (frozen, bit-identical) runs once
    per batch through the leader; the loss is the sum of the members' losses (each member's
    gradients are its own), the logits the mean of theirs (the ensemble's validation score)."""

    def __init__(self, models: list[torch.nn.Module], depth: int):

        super().__init__()
        self.members = torch.nn.ModuleList(models)
        self.depth = depth
        self.cache: dict[int, Any] = {}
        self.config = unwrap(models[0]).config  # what Trainer reads of a model
        # the followers' own trunk blocks are kept to be put back before the members are saved
        self._hooks, self._trunks, self._path = share_trunk(models, depth, self.cache)

    def forward(self, labels=None, **batch):
        from transformers.modeling_outputs import SequenceClassifierOutput

        outputs = [m(**batch, labels=labels) for m in self.members]  # the leader first
        self.cache.clear()
        loss = sum(o.loss for o in outputs) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=torch.stack([o.logits for o in outputs]).mean(0))

    def separate(self) -> list[torch.nn.Module]:
        """The members as independent models again (each with its own trunk blocks)."""
        for hook in self._hooks:
            hook.remove()
        for model, trunk in zip(self.members[1:], self._trunks, strict=True):
            blocks = unwrap(model).get_submodule(self._path)
            for i, block in enumerate(trunk):
                blocks[i] = block
        return list(self.members)


def frozen_trunk_depth(models: list[torch.nn.Module]) -> int:
    """The bottom blocks (with the embeddings) that are frozen and bit-identical in every model."""
    anatomy = Anatomy.of(models[0])
    frozen: dict[str, bool] = {}
    for model in models:
        for name, p in model.named_parameters():
            slot = anatomy.slot_of(canonical(name))
            frozen[slot] = frozen.get(slot, True) and not p.requires_grad
    if not frozen.get("embeddings", True):
        return 0
    depth = trunk_depth(models)
    frozen_depth = 0
    while frozen_depth < depth and frozen.get(f"block.{frozen_depth}", True):
        frozen_depth += 1
    return frozen_depth


def train_joint(recipe) -> dict:
    """`ensemble: {shared_trunk: true}`: the members (seeds) train together above their frozen
    trunk, one trunk forward per batch; each is then saved as a normal run under members/<i>."""
    cfg = recipe.ensemble
    members = member_recipes(recipe)
    if cfg.vary != "seed" or recipe.stages is not None or cfg.combine not in COMBINES:
        raise UserError(
            "ensemble.shared_trunk",
            f"vary {cfg.vary!r}, combine {cfg.combine}, stages {'set' if recipe.stages else 'none'}",
            "vary: seed, an output combine (mean_logits, mean_probs, vote, weighted) and no stages "
            "(the trunk must stay frozen and the same in every member)",
        )
    preps = [one_run.prepare(r) for r in members]
    models = [p.model for p in preps]
    depth = frozen_trunk_depth(models)
    if depth < 1:
        raise UserError(
            "ensemble.shared_trunk",
            "members without a frozen trunk (their embeddings or bottom block train)",
            "a freeze that keeps the embeddings and at least the bottom block frozen (head-only, top-k)",
        )
    run = rundir.run_dir_path(recipe.output.dir, recipe.output.name, recipe.name)
    with rundir.new_run_dir(run):  # the run dir's lock, held while the members train
        return _train_joint(recipe, members, preps, depth, run)


def _train_joint(recipe, members: list, preps: list, depth: int, run: Path) -> dict:

    cfg = recipe.ensemble
    models = [p.model for p in preps]
    first = preps[0]
    rundir.write_text(run / "recipe.yaml", recipe_to_yaml(recipe))
    joint = JointMembers(models, depth)
    plan = Plan(
        first.plan.steps_per_epoch,
        first.plan.total_steps,
        {f"members.{i}.{n}": v for i, p in enumerate(preps) for n, v in p.plan.lrs.items()},
        {f"members.{i}.{n}" for i, p in enumerate(preps) for n in p.plan.base_names},
        None,
        recipe.schedule,
    )
    args = training_arguments(recipe.train, recipe.output, run / "checkpoints")
    args.remove_unused_columns = False  # the joint forward takes **batch: keep the tokenized columns
    trainer = make_trainer(
        joint,
        first.tokenizer,
        first.datasets,
        members[0],
        args,
        run,
        classification.make_compute_metrics(first.labels),
        plan=plan,
        collator=classification.collator(first.tokenizer),
    )
    started = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - started
    separated = joint.separate()
    paths = []
    for i, (prep, model) in enumerate(zip(preps, separated, strict=True)):
        member_run = run / "members" / str(i)
        rundir.new_run_dir(member_run).release()  # written here and now, under the run's lock
        run_files.begin(
            member_run, prep.recipe, prep.labels, model, prep.params, trained_with_shared_trunk=str(run)
        )
        run_files.save_final(member_run, model, prep.tokenizer, prep.recipe)
        test = classification.report(model, prep.tokenizer, prep.datasets["test"], prep.labels)
        rundir.write_json(member_run / "eval.json", test)
        rundir.write_json(
            member_run / "report.json", {"test": {k: test[k] for k in ("accuracy", "f1_macro", "n")}}
        )
        paths.append(str(member_run))
    result = build(paths, str(run), cfg.combine, cfg.weights, copy_members=False)
    test, validation = result["ensemble"]["test"], result["ensemble"]["validation"]
    trainable = sum(p.params["trainable"] for p in preps)
    total = sum(p.params["total"] for p in preps)
    summary = {
        "run_dir": str(run),
        "recipe": recipe.name,
        "test": test,
        **run_files.training_summary(
            trainer,
            out,
            seconds,
            run_files.train_tokens(first.datasets["train"], trainer.state.epoch),
            recipe.train.precision,
            {"trainable": trainable, "total": total},
        ),
        "combine": cfg.combine,
        "shared_trunk_blocks": depth,
        "members": [{"run_dir": m["path"], "test": m["test"]} for m in result["members"]],
        "metric": "accuracy",
        "gain_over_best_member": test["accuracy"] - max(m["test"]["accuracy"] for m in result["members"]),
        "ensemble_validation": validation,
    }
    rundir.write_json(
        run / "params.json", {"trainable": trainable, "total": total, "members": [p.params for p in preps]}
    )
    rundir.write_json(run / "report.json", summary)
    return summary
