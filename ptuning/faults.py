"""Test-only fault injection: lets the kill-and-resume tests stop a training process at an exact moment.

``PTUNING_TEST_KILL_AT=<point>@<step>`` (for example ``save-write@6``) makes the process send itself
SIGKILL when it reaches ``point`` at training step ``step``; ``PTUNING_TEST_KILL_SIGNAL=SIGINT`` sends that
signal instead (Ctrl-C at an exact moment). SIGKILL is what a pre-empted job gets: no
``finally`` blocks, no buffer flushing, no ``atexit``; sending it from inside only makes the moment exact,
which a test that watched files from outside could not guarantee (a checkpoint rename takes
microseconds). The variable is read by ``tests/test_reliability.py`` only; unset, a call costs one
environment lookup.

Points:

* ``locked``: at the start, right after the run took its output folder (its lock), before anything is written
  (``step`` is 0);
* ``step``: in the middle of a step: gradients computed, the optimizer update not yet applied;
* ``eval``: inside the evaluation loss, after its first batch (``step`` is the training step it follows);
* ``save-write``: inside a checkpoint write: every file complete in the ``.tmp-checkpoint-N`` folder,
  not yet renamed to ``checkpoint-N``;
* ``saved``: right after ``checkpoint-N`` is in place (and older ones pruned);
* ``generate``: in evaluation, before generating batch ``step`` (counted from 0 on each process).
"""

from __future__ import annotations

import os
import signal

ENV = "PTUNING_TEST_KILL_AT"
SIGNAL_ENV = "PTUNING_TEST_KILL_SIGNAL"
POINTS = ("locked", "step", "eval", "save-write", "saved", "generate")


def kill_point(point: str, step: int) -> None:
    """SIGKILLs this process (or sends it ``PTUNING_TEST_KILL_SIGNAL``) when ``PTUNING_TEST_KILL_AT`` names
    ``point`` at ``step``."""
    target = os.environ.get(ENV)
    if target and target == f"{point}@{step}":
        os.kill(os.getpid(), getattr(signal, os.environ.get(SIGNAL_ENV, "SIGKILL")))
