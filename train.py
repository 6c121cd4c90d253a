"""Train a P-Tuning v2 prefix: ``python train.py [conf=ptuning_adgen] [key=value ...]``.

Launch on several processes or GPUs with ``accelerate launch [--config_file launch/accelerate/...] train.py``.
"""

from __future__ import annotations

import os
import sys

try:  # Ctrl-C while the libraries load (seconds): one line, as everywhere else
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from hydra_entry import CONF_DIR, check_overrides, fail, to_object
    from ptuning.distributed import exit_together
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("\ninterrupted before training started", file=sys.stderr)
    sys.exit(130)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from ptuning.config import ConfigError
    from ptuning.data import DataError
    from ptuning.evaluation.metrics import METRIC_NAMES
    from ptuning.weights import CheckpointError
    from ptuning.training import TrainingError, run
    from ptuning.training.loop import TrainingInterrupted
    from ptuning.training.tracking import make_tracker

    try:
        job = to_object(cfg)
        if not job.train.output_dir:
            # a sweep's job writes into its own numbered folder, which Hydra made; a single run into
            # outputs/<run_name>, made by the run once its inputs are checked
            hydra_cfg = HydraConfig.get()
            multirun = hydra_cfg.mode == RunMode.MULTIRUN
            job.train.output_dir = hydra_cfg.runtime.output_dir if multirun else os.path.join("outputs", job.run_name)
        trackers = make_tracker(job)
    except ConfigError as err:  # the command line: the same on every process
        fail(str(err))
    try:
        result = run(job, trackers=trackers)
    except (ConfigError, DataError, CheckpointError, TrainingError) as err:
        # an error every process raised alike is printed once (by the main process)
        fail(str(err), every_process=getattr(err, "every_process", False))
    except TrainingInterrupted as interrupted:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as a shell reports Ctrl-C
    if not result.main_process:
        return  # only the main process reports
    line = f"done: step {result.step}, checkpoint {result.checkpoint}"
    if result.eval_loss is not None:
        line += f", eval loss {result.eval_loss:.4f}"
    if result.metrics:
        line += ", " + ", ".join(f"{k} {result.metrics[k]:.2f}" for k in METRIC_NAMES)
    print(line)
    if result.baseline_metrics and result.metrics:
        gains = ", ".join(f"{k} {result.baseline_metrics[k]:.2f} -> {result.metrics[k]:.2f}" for k in METRIC_NAMES)
        print(f"base model (no prefix) -> tuned prefix on {job.data.validation_file}: {gains}")


if __name__ == "__main__":
    try:
        check_overrides("train")  # a bad override: one line, before Hydra's multi-line report
        main()
    except KeyboardInterrupt:  # before the run started (composing, imports)
        print("\ninterrupted before training started", file=sys.stderr)
        sys.exit(130)
    # a finished run of several processes ends without the interpreter's teardown, where freeing the process
    # groups' threads could abort one (status -6) after it had succeeded
    exit_together(0)
