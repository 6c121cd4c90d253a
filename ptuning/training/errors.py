"""How a training run fails: one message that says why and what to do."""

from __future__ import annotations

from pathlib import Path


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run; the message says where and how to go on.

    Attributes:
        step: the last completed optimizer step.
        checkpoint: the run's last checkpoint, or None when it wrote none yet.
    """

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        if checkpoint is None:
            text = (f"interrupted at step {step}, before the first checkpoint: nothing to resume; start the run again "
                    "with train.resume_from=auto (it replaces this run's record)")
        else:
            text = f"interrupted at step {step}; last checkpoint {checkpoint}; continue with train.resume_from=latest"
        super().__init__(text)
