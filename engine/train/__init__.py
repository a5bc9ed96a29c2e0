"""Encoder training: the plain-torch loop, the Ray Train wrapper and checkpoints."""

from engine.train.checkpoint import check_input_dim, load_checkpoint, model_from_checkpoint, save_checkpoint
from engine.train.trainer import adopt_pretrained, train_encoder

__all__ = ["adopt_pretrained", "check_input_dim", "load_checkpoint", "model_from_checkpoint", "save_checkpoint",
           "train_encoder"]
