"""The paper's training strategy: config -> data + model -> the four steps -> checkpoints + logs."""
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, load_config
from .loop import evaluate
from .run import RecipeError, Run
from .runner import comparison_table, run_experiment, run_steps
from .schedule import lr_at
from .steps import clone, init_memory, train_baseline, train_routed, train_stem

__all__ = [
    "CheckpointError", "Config", "ConfigError", "RecipeError", "Run", "clone", "comparison_table", "evaluate",
    "init_memory", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_config", "lr_at", "run_experiment",
    "run_steps", "save_checkpoint", "train_baseline", "train_routed", "train_stem",
]
