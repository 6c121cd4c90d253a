"""wandb tracking (main process only): offline when no API key is configured."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from ..config import ConfigError


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbTracker:
    def __init__(self, project: str, entity: str | None, run_name: str | None, mode: str | None):
        self.project, self.entity, self.run_name = project, entity, run_name
        self.mode = mode or ("online" if has_wandb_key() else "offline")
        self.run = None

    def start(self, config: dict, output_dir: Path, job_type: str = "train") -> None:
        import wandb

        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.run_name or Path(output_dir).name,
            mode=self.mode,
            dir=str(output_dir),
            config=config,
            job_type=job_type,
            reinit="finish_previous",
        )

    def log(self, values: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in values.items() if v is not None}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def make_tracker(cfg) -> WandbTracker | None:
    """A tracker for ``cfg.logger`` (any job config with a ``logger`` field), or None.

    Called before the job loads anything or writes a file, so that a tracker that cannot work fails first.

    Raises:
        ConfigError: ``logger.mode=online`` without a wandb API key.
    """
    logger = cfg.logger
    if logger.backend != "wandb" or logger.mode == "disabled":
        return None
    if logger.mode == "online" and not has_wandb_key():
        raise ConfigError(
            "logger.mode=online: no wandb API key is configured; log in with `wandb login` (or set "
            "WANDB_API_KEY), or use logger.mode=offline and upload later with `wandb sync`"
        )
    return WandbTracker(logger.project, logger.entity, logger.run_name, logger.mode)
