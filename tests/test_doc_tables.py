"""The docs' key tables (docs/strategies.md, docs/few_shot.md) are the schema's
(scripts/gen_strategy_tables.py writes them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location(
        "gen_strategy_tables", ROOT / "scripts" / "gen_strategy_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_strategy_tables_match_the_schema():
    script = _script()
    text = script.DOC.read_text(encoding="utf-8")
    assert "<!-- generated: keys lr -->" in text and "<!-- generated: parts -->" in text
    assert script.render(text) == text, "docs/strategies.md drifted: run scripts/gen_strategy_tables.py"
    few_shot = (ROOT / "docs" / "few_shot.md").read_text(encoding="utf-8")
    assert "<!-- generated: keys self_training -->" in few_shot and "| `keep` | `best` |" in few_shot
    assert script.main(["--check"]) == 0  # every page in DOCS


def test_a_hand_edited_table_is_drift():
    script = _script()
    text = script.DOC.read_text(encoding="utf-8")
    edited = text.replace("| `warmup` | `0.06` |", "| `warmup` | `0.1` |")
    assert edited != text and script.render(edited) == text
    for key in ("cumulative", "train_new_head", "lr_scale", "decay_depth", "per_stage"):
        assert f"| `{key}` |" in text  # one row per key of each section
