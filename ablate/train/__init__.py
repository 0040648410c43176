"""Training: a run's state (:mod:`.state`), the token stream it reads (:mod:`.stream`), one
readable loop (:mod:`.loop`: ``fit`` over state, stream and hooks), and the trainer that puts
them together for a run and samples and evaluates it (:mod:`.trainer`)."""
from __future__ import annotations

from ablate.train.loop import Hooks, Interrupted, fit
from ablate.train.state import (TrainState, foreign_checkpoints, latest_checkpoint, lr_factor, param_groups,
                                remove_checkpoints)
from ablate.train.stream import CaptionFeatures, TokenStream
from ablate.train.trainer import VAL_IMAGES, Trainer, cpu_share, save_sheet

__all__ = ["CaptionFeatures", "Hooks", "Interrupted", "TokenStream", "TrainState", "Trainer", "VAL_IMAGES",
           "cpu_share", "fit", "foreign_checkpoints", "latest_checkpoint", "lr_factor", "param_groups",
           "remove_checkpoints", "save_sheet"]
