"""The recipe: one pydantic schema, the single source of truth of the YAML.

schema.py    the Recipe (its parts' sections made from hybridtune.strategy.PARTS; the task from the
             tasks registry), the checks across sections
sections.py  model, data, train, output: the sections that are not strategy parts
load.py      YAML file -> Recipe: overrides, validation, no inf / nan; recipe_to_yaml
errors.py    the messages, derived from pydantic's errors (key path, found, expected)
"""

from hybridtune.recipe.load import apply_override, load_recipe, read_recipe, recipe_to_yaml, validate_recipe
from hybridtune.recipe.schema import Recipe, recipe_model
from hybridtune.recipe.sections import (
    SEED_MAX,
    DataConfig,
    EarlyStoppingConfig,
    ModelConfig,
    OutputConfig,
    Section,
    SplitConfig,
    TrainConfig,
)

__all__ = [
    "SEED_MAX",
    "DataConfig",
    "EarlyStoppingConfig",
    "ModelConfig",
    "OutputConfig",
    "Recipe",
    "Section",
    "SplitConfig",
    "TrainConfig",
    "apply_override",
    "load_recipe",
    "read_recipe",
    "recipe_model",
    "recipe_to_yaml",
    "validate_recipe",
]
