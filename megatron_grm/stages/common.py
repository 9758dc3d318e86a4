"""What every stage does before its own algorithm: read the config, validate it, set up processes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from megatron_grm.parallel.distributed import destroy_parallel, dist_env, init_parallel
from megatron_grm.train.config import RunConfig, validate
from megatron_grm.train.signals import stop_request

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


CHAR_VOCAB_LIMIT = 256  # the CPU models over the character tokenizer (99 symbols) have at most this many rows


def setup_logging() -> None:
    """Rank 0 logs at INFO, the others at WARNING, every line tagged with its rank.

    Hydra configures the root logger before the stage runs (a stdout handler and
    ``<run_dir>/hydra/<stage>.log``), which would make ``basicConfig`` a no-op: replace its handlers, and
    keep its log file for rank 0 only, so a multi-node job does not append from every rank to one file on
    a shared filesystem.
    """
    rank = dist_env().rank
    root = logging.getLogger()
    for handler in list(root.handlers):
        if rank != 0 or not isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.addHandler(logging.StreamHandler(sys.stdout))
    formatter = logging.Formatter(f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in ("megatron.core", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(stage: Callable[[Any], Any], cfg: Any) -> None:
    """A stage's Hydra entry point: run it, then release the process groups (NCCL communicators left
    alive can hang a rank at exit), also on the preemption exit (``SystemExit`` 75). After an exception
    the groups are left alone: other ranks may still wait in a collective. The stop signals' handlers are
    installed first, so SIGTERM/SIGUSR1 at any point become a checkpoint-and-requeue at the next step."""
    stop_request()
    try:
        stage(cfg)
    except SystemExit:
        destroy_parallel()
        raise
    destroy_parallel()


def tokenizer_name(run: RunConfig) -> str:
    """``model.tokenizer``; unset, the tokenizer the loaded checkpoint records (tools/convert and every
    stage write it into ``model_config.json``); else the character tokenizer, but only for a model small
    enough to be one of the CPU models over it: a real model would silently read characters."""
    if run.model.tokenizer:
        return run.model.tokenizer
    recorded = _recorded_tokenizer(run)
    if recorded:
        return recorded
    if run.model.vocab_size > CHAR_VOCAB_LIMIT:
        raise ValueError(
            f"model.tokenizer is not set and trainer.load={run.trainer.load} records none: a model with "
            f"vocab_size={run.model.vocab_size} would read the character tokenizer; set model.tokenizer to the "
            "tokenizer folder tools/convert wrote (<checkpoint root>/iter_0000000/tokenizer)")
    return "char"


def _recorded_tokenizer(run: RunConfig) -> str | None:
    """The tokenizer of the checkpoint ``trainer.load`` names, found as the exporter finds it (the folder its
    metadata records, else ``<iter folder>/tokenizer`` or ``<root>/tokenizer``); the recorded value itself
    when none is on disk, so the loader's error names it."""
    from megatron_grm.models.hf_convert import find_tokenizer, resolve_checkpoint
    from megatron_grm.train.checkpoint import read_metadata

    if not run.trainer.load:
        return None
    try:
        folder, root = resolve_checkpoint(run.trainer.load)
    except FileNotFoundError:
        return None  # not a checkpoint (yet): the stage's own load reports it
    metadata = read_metadata(str(folder))
    recorded = metadata.get("tokenizer")
    if recorded == "char":
        return recorded
    found = find_tokenizer({k: v for k, v in metadata.items() if k == "tokenizer"}, run.model, folder, root)
    return str(found) if found is not None else recorded


def prompt_record(template: str, chat: bool) -> dict[str, Any]:
    """The ``prompt`` entry a stage that trains on GRM prompts writes into its checkpoints' metadata."""
    return {"template": template, "chat": chat}


def prompt_template_mismatch(load: str | None, template: str, chat: bool, names: tuple[str, str]) -> str | None:
    """Why GRM prompts built in ``template`` (with or without chat formatting) are not the ones the checkpoint
    ``load`` names was trained on, or None: no checkpoint, one that records no template (a Hugging Face
    conversion, an SFT, one written before templates were recorded) or the same one. ``names`` are this
    stage's two settings, which the message tells the user to set."""
    from megatron_grm.models.hf_convert import resolve_checkpoint
    from megatron_grm.train.checkpoint import read_metadata

    if not load:
        return None
    try:
        folder, _ = resolve_checkpoint(load)
    except FileNotFoundError:
        return None  # not a checkpoint (yet): the stage's own load reports it
    recorded = read_metadata(str(folder)).get("prompt")
    if not isinstance(recorded, dict) or (recorded.get("template"), recorded.get("chat")) == (template, chat):
        return None
    theirs, their_chat = recorded.get("template"), recorded.get("chat")
    return (f"{folder} was trained on GRM prompts in template {theirs!r} with chat={their_chat}; this run "
            f"builds them in {template!r} with chat={chat}, which it never saw: set {names[0]}={theirs} "
            f"{names[1]}={str(their_chat).lower()}")


def check_run_dir_matches_launcher(run_dir: str) -> None:
    """Under slurm/*.sh the batch script made, logs to and marks ``$GRM_RUN_DIR``; a ``trainer.run_dir`` that
    Hydra resolves elsewhere (an interpolation, quotes, another working directory) would put checkpoints
    where the requeued job does not look, or outside a container's mounts. Refuse before any work."""
    launcher = os.environ.get("GRM_RUN_DIR")
    if launcher and os.path.abspath(run_dir) != os.path.abspath(launcher):
        raise ValueError(f"trainer.run_dir resolves to {os.path.abspath(run_dir)}, but the Slurm launcher prepared "
                         f"{os.path.abspath(launcher)} (GRM_RUN_DIR): give the run folder as GRM_RUN_DIR=... "
                         "instead, or a trainer.run_dir without interpolations")


def prepare_run(cfg: Any, training: bool = True) -> RunConfig:
    """Validate (before anything is built), then initialise torch.distributed + Megatron parallel state.
    ``training=False``: a stage that takes no optimizer step (evaluation; see ``validate``)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    setup_logging()
    run = RunConfig.from_dict(to_plain(cfg))
    validate(run, world_size=dist_env().world_size, training=training)
    check_run_dir_matches_launcher(run.trainer.run_dir)
    check_cuda_matches_cluster(run)
    init_parallel(run.parallel, seed=run.trainer.seed, timeout_minutes=run.cluster.distributed_timeout_minutes)
    os.makedirs(run.trainer.run_dir, exist_ok=True)
    if dist_env().rank == 0:
        save_run_config(cfg, run.trainer.run_dir)
    return run


def save_run_config(cfg: Any, run_dir: str) -> str:
    """Write the composed, resolved config and the command-line overrides (when Hydra's app runs) into
    ``<run_dir>/hydra/`` as ``config.yaml`` and ``overrides.yaml``. A later attempt of the same run (a
    requeue, a resubmission) overwrites them; when its config or overrides differ, the previous pair is
    kept first as ``config.<n>.yaml`` / ``overrides.<n>.yaml`` (n = 1, 2, ...). Returns the folder."""
    from omegaconf import OmegaConf

    folder = os.path.join(run_dir, "hydra")
    os.makedirs(folder, exist_ok=True)
    texts = {"config": OmegaConf.to_yaml(to_plain(cfg))}
    overrides = _hydra_overrides()
    if overrides is not None:
        texts["overrides"] = OmegaConf.to_yaml(overrides)
    paths = {name: os.path.join(folder, f"{name}.yaml") for name in ("config", "overrides")}
    previous = {name: _read(path) for name, path in paths.items()}
    if previous["config"] is not None and any(previous[name] != texts.get(name) for name in paths):
        n = 1
        while any(os.path.exists(os.path.join(folder, f"{name}.{n}.yaml")) for name in paths):
            n += 1
        for name, path in paths.items():
            if previous[name] is not None:
                os.replace(path, os.path.join(folder, f"{name}.{n}.yaml"))
    for name, text in texts.items():
        tmp = f"{paths[name]}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, paths[name])
    if overrides is None and os.path.exists(paths["overrides"]):
        os.remove(paths["overrides"])  # this attempt's overrides are unknown: keep no stale ones beside its config
    return folder


def _hydra_overrides() -> list[str] | None:
    """The command-line overrides of the running Hydra app; None when the config was composed otherwise."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover
        return None
    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def check_cuda_matches_cluster(run: RunConfig) -> None:
    """A cluster config that names a GPU must find CUDA: otherwise (a CPU build of torch in the job's
    environment, a GPU-less allocation) the stage would fall back to gloo and the CPU layer and run a
    cluster-sized job on host cores."""
    import torch

    if run.cluster.gpu is not None and not torch.cuda.is_available():
        raise RuntimeError(
            f"cluster={run.cluster.name} names {run.cluster.gpu} GPUs but this process sees no CUDA (torch "
            f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use "
            "cluster=local_cpu for a CPU run")
    if run.precision.fp8 is not None and torch.cuda.is_available():  # the config's check trusted the cluster file
        run.precision.check_hardware(torch.cuda.get_device_capability(), torch.cuda.get_device_name())


def load_config(name: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose a stage config from ``conf/`` without running Hydra's app (tests, tools)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_plain(compose(config_name=name, overrides=list(overrides or [])))
