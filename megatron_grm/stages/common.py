"""What every stage does before its own algorithm: read the config, validate it, set up processes."""

from __future__ import annotations

import logging
import os
from typing import Any

from megatron_grm.parallel.distributed import dist_env, init_parallel
from megatron_grm.train.config import RunConfig, validate

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


def to_plain(cfg: Any) -> dict[str, Any]:
    """Hydra's DictConfig (or a dict) as plain, resolved Python containers, without the hydra section."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    cfg = dict(cfg)
    cfg.pop("hydra", None)
    return cfg


def setup_logging() -> None:
    rank = dist_env().rank
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("megatron.core", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def prepare_run(cfg: Any) -> RunConfig:
    """Validate (before anything is built), then initialise torch.distributed + Megatron parallel state."""
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    setup_logging()
    run = RunConfig.from_dict(to_plain(cfg))
    validate(run, world_size=dist_env().world_size)
    init_parallel(run.parallel, seed=run.trainer.seed)
    os.makedirs(run.trainer.run_dir, exist_ok=True)
    return run


def load_config(name: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose a stage config from ``conf/`` without running Hydra's app (tests, tools)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_plain(compose(config_name=name, overrides=list(overrides or [])))
