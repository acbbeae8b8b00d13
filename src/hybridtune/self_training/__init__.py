"""Self-training on unlabelled text (`self_training:` and `data.unlabeled` in a recipe).

    config.py   the recipe section (imported by the schema: no torch)
    pseudo.py   a teacher's class probabilities for the unlabelled texts, and which of them join
    rounds.py   the rounds: each an ordinary run in <run>/round-<r>; the kept one (keep) is the result

Each round is an ordinary run: it only changes the data (`data.pseudo_labels`), so it works with
every strategy. docs/few_shot.md ("Self-training on unlabelled text").
"""
