"""Train a P-Tuning v2 prefix: ``python train.py [conf=ptuning_adgen] [key=value ...]``.

Launch on several processes or GPUs with ``accelerate launch [--config_file conf/accelerate/...] train.py``.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hydra_entry import CONF_DIR, check_overrides, fail, to_object


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from ptuning.config import ConfigError
    from ptuning.data import DataError
    from ptuning.evaluation.metrics import METRIC_NAMES
    from ptuning.weights import CheckpointError
    from ptuning.training import TrainingError, run
    from ptuning.training.tracking import make_tracker

    try:
        job = to_object(cfg)
        if not job.train.output_dir:
            job.train.output_dir = HydraConfig.get().runtime.output_dir
        result = run(job, trackers=make_tracker(job))
    except (ConfigError, DataError, CheckpointError, TrainingError) as err:
        fail(str(err))
    line = f"done: step {result.step}, checkpoint {result.checkpoint}"
    if result.eval_loss is not None:
        line += f", eval loss {result.eval_loss:.4f}"
    if result.metrics:
        line += ", " + ", ".join(f"{k} {result.metrics[k]:.2f}" for k in METRIC_NAMES)
    print(line)
    if result.baseline_metrics and result.metrics:
        gains = ", ".join(f"{k} {result.baseline_metrics[k]:.2f} -> {result.metrics[k]:.2f}" for k in METRIC_NAMES)
        print(f"untuned -> tuned prefix on {job.data.validation_file}: {gains}")


if __name__ == "__main__":
    check_overrides("train")  # a bad override: one line, before Hydra's multi-line report
    main()
