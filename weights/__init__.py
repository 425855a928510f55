"""The checkpoint converter: original T5-family checkpoints <-> t5core models."""

from .keymap import to_checkpoint, to_t5core
from .load import CheckpointError, load_checkpoint
from .save import checkpoint_state_dict, save_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "checkpoint_state_dict", "to_t5core", "to_checkpoint"]
