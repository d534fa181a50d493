"""The training stage: recipes, the training loop, and crash-safe checkpoints.

    from mot_transition.train import load_recipe, train
    result = train(load_recipe("tiny", ["train.steps=100"]), "runs/tiny")
"""

from .checkpoint import latest_checkpoint, list_checkpoints, load_model, load_training_state, save_checkpoint
from .recipe import (
    DataRecipe,
    ModelRecipe,
    OptimRecipe,
    Recipe,
    TrainRecipe,
    load_recipe,
    parse_override,
    recipe_from_dict,
    recipe_to_toml,
    resolve_recipe_path,
)
from .trainer import (
    Distributed,
    Trainer,
    TrainingDiverged,
    TrainResult,
    build_optimizer,
    evaluate,
    lr_at,
    prepare_run_data,
    setup_distributed,
    train,
)

__all__ = [
    "DataRecipe",
    "Distributed",
    "ModelRecipe",
    "OptimRecipe",
    "Recipe",
    "TrainRecipe",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "build_optimizer",
    "evaluate",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model",
    "load_recipe",
    "load_training_state",
    "lr_at",
    "parse_override",
    "prepare_run_data",
    "recipe_from_dict",
    "recipe_to_toml",
    "resolve_recipe_path",
    "save_checkpoint",
    "setup_distributed",
    "train",
]
