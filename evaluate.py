"""Evaluate a prefix: ``python evaluate.py [prefix_checkpoint=...] [model.path=...] [data.test_file=...]``.

With no arguments it evaluates the latest checkpoint of the built-in default run (``outputs/default``) on
the bundled dev set and writes ``generated_predictions.jsonl`` and ``metrics.json`` to
``outputs/default/eval-checkpoint-N/``. Across processes: ``accelerate launch --num_processes N
evaluate.py ...`` on N GPUs, ``accelerate launch --multi_gpu --num_processes N evaluate.py ...`` on a
machine without GPUs (gloo; accelerate's ``--cpu`` launcher starts a single process). Predictions are
gathered back in input order and only the main process writes.
"""

from __future__ import annotations

import os
import sys

try:  # Ctrl-C while the libraries load (seconds): one line, as everywhere else
    import hydra
    from omegaconf import DictConfig

    from hydra_entry import CONF_DIR, check_overrides, fail, to_object
    from ptuning.distributed import exit_together
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("\ninterrupted: nothing was written", file=sys.stderr)
    sys.exit(130)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from ptuning.config import ConfigError
    from ptuning.data import DataError
    from ptuning.evaluation.run import run
    from ptuning.weights import CheckpointError
    from ptuning.training.tracking import make_tracker

    try:
        job = to_object(cfg)
        tracker = make_tracker(job)
    except ConfigError as err:  # the command line: the same on every process
        fail(str(err))
    try:
        run(job, tracker=tracker)
    except (ConfigError, DataError, CheckpointError) as err:
        # an error every process raised alike is printed once (by the main process)
        fail(str(err), every_process=getattr(err, "every_process", False))


if __name__ == "__main__":
    try:
        check_overrides("evaluate")  # a bad override: one line, before Hydra's multi-line report
        main()
    except KeyboardInterrupt:  # Ctrl-C: predictions and metrics are written only at the end, whole
        if int(os.environ.get("RANK", "0")) == 0:
            print("\ninterrupted: nothing was written", file=sys.stderr)
        sys.exit(130)
    # a finished run of several processes ends without the interpreter's teardown, where freeing the process
    # groups' threads could abort one (status -6) after it had succeeded
    exit_together(0)
