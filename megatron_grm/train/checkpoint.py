"""Megatron distributed checkpoints with an atomically updated ``latest`` pointer.

A checkpoint is written into ``iter_XXXXXXX.tmp`` and renamed only once every rank has finished; the
``latest`` file is then replaced atomically. A crash at any point leaves ``latest`` naming the previous,
complete checkpoint. Re-saving a step that exists (a signal right after a periodic save, a conversion
re-run into the same folder) moves the old folder aside as ``iter_XXXXXXX.replaced`` and deletes it only
after the new one is in place, so a crash in between still finds a complete checkpoint for that step.
The format is Megatron-Core's ``torch_dist``, so loading under another TP/PP layout works
by construction (the optimizer uses the fully reshardable layout).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import queue
import shutil
from collections.abc import Callable
from typing import Any

import torch

from megatron_grm.parallel.distributed import barrier, is_rank0

log = logging.getLogger(__name__)

LATEST = "latest"
REPLACED = ".replaced"
MODEL_CONFIG = "model_config.json"
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(ckpt_root: str) -> str | None:
    """The folder ``latest`` names, or None when there is no complete checkpoint yet."""
    path = os.path.join(ckpt_root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    folder = os.path.join(ckpt_root, name)
    if not os.path.isdir(folder) and os.path.isdir(folder + REPLACED):
        log.warning("%s names %s, which a crash left moved aside; using %s", path, name, folder + REPLACED)
        return folder + REPLACED
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path} names {name!r} but {folder} does not exist")
    return folder


def checkpoint_folder(path: str) -> str:
    """The ``iter_*`` folder a path names: itself, or the one a run's checkpoint root marks ``latest``."""
    if os.path.isfile(os.path.join(path, MODEL_CONFIG)):
        return path
    folder = latest_checkpoint(path)
    if folder is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint folder ({MODEL_CONFIG}) nor a root with 'latest'")
    return folder


def fsync(path: str) -> None:
    """Flush a file's (or a folder's entries') data from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one, never a part,
    and a machine that loses power after the call returns still has the new one (data and name on disk)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(os.path.dirname(os.path.abspath(path)))


def _write_results_in_process() -> None:
    """Hand dist_checkpointing's write results over an in-process queue, with no helper process.

    Its filesystem writer passes each save's results through a queue that is by default a spawned
    multiprocessing Manager's (megatron-core 0.16.1, ``filesystem_async._results_queue``), made for async
    saves whose writer runs in another process. Our saves are synchronous: ``dist_checkpointing.save``
    writes (through forked workers) and reads the results back in this process. The Manager cost every
    rank ~2 s of CPU and ~0.3 GB, re-importing the main module and torch, and Slurm's stop signals, sent to
    every process of a job step, could kill it before the checkpoint-on-signal save."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(
    ckpt_root: str,
    step: int,
    sharded_state: dict[str, Any],
    per_rank_state: dict[str, Any],
    metadata: dict[str, Any],
    write_extra: Callable[[str], None] | None = None,
) -> str:
    """Save on every rank (collective). ``metadata`` (model config, tokenizer, …) is written as JSON;
    ``write_extra(folder)`` (rank 0) adds files, e.g. a tokenizer, that are published with the checkpoint."""
    from megatron.core import dist_checkpointing

    final = os.path.join(ckpt_root, checkpoint_name(step))
    tmp = final + ".tmp"
    if is_rank0():
        for stale in glob.glob(os.path.join(ckpt_root, "*.tmp")):
            shutil.rmtree(stale, ignore_errors=True)
        _remove_replaced(ckpt_root)
        os.makedirs(tmp)
    barrier()
    _write_results_in_process()
    dist_checkpointing.save(sharded_state, tmp)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    rank_file = os.path.join(tmp, f"rank_state_{rank:05d}.pt")
    torch.save(per_rank_state, rank_file)
    fsync(rank_file)
    barrier()
    if is_rank0():
        if write_extra is not None:
            write_extra(tmp)
        write_atomically(os.path.join(tmp, MODEL_CONFIG), json.dumps(metadata, indent=2, sort_keys=True))
        # On disk before `latest` may name the folder: a node lost after the rename must not leave `latest`
        # naming a folder whose common.pt (scheduler, data position) was still in the page cache.
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                fsync(os.path.join(dirpath, name))
            fsync(dirpath)
        replaced = final + REPLACED
        if os.path.isdir(final):  # re-saving this step: the old folder stays whole until the new one is in place
            if os.path.isdir(replaced):
                shutil.rmtree(replaced)
            os.rename(final, replaced)
        os.rename(tmp, final)
        fsync(ckpt_root)
        write_atomically(os.path.join(ckpt_root, LATEST), checkpoint_name(step))
        shutil.rmtree(replaced, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def _remove_replaced(ckpt_root: str) -> None:
    """Delete folders an interrupted re-save moved aside, except the one ``latest`` still resolves to."""
    try:
        keep = latest_checkpoint(ckpt_root)
    except FileNotFoundError:  # `latest` names a folder that is gone: saving anew is the way out, not an error
        keep = None
    for old in glob.glob(os.path.join(ckpt_root, "*" + REPLACED)):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


EXTRA_STATE = "._extra_state"


def load_checkpoint(folder: str, sharded_state: dict[str, Any]) -> dict[str, Any]:
    """Load into the given sharded state dict structure (any TP/PP layout); returns the loaded dict.

    A module's ``_extra_state`` the checkpoint lacks loads as None: Transformer Engine's modules (and, with
    TE installed, Megatron's final norm) keep FP8 metadata there, which a checkpoint written without TE
    (on CPU, converted from Hugging Face) does not have and a fresh module does not need. Any other entry
    the checkpoint lacks is an error that names it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    extra_states = _extra_state_paths(sharded_state)
    loaded, _, absent = dist_checkpointing.load(sharded_state, folder, strict=StrictHandling.RETURN_UNEXPECTED)
    lacking = sorted(key for key in absent if not key.endswith(EXTRA_STATE))
    if lacking:
        raise KeyError(f"checkpoint {folder} has no entry for {len(lacking)} key(s) this model/optimizer needs: "
                       f"{lacking[:8]}{' ...' if len(lacking) > 8 else ''}")
    for key in absent:
        for path in extra_states[key]:
            _set_path(loaded, path, None)
    return loaded


def _extra_state_paths(state: Any, path: tuple = ()) -> dict[str, list[tuple]]:
    """Checkpoint key -> where in ``state`` each sharded ``_extra_state`` entry sits."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    found: dict[str, list[tuple]] = {}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    for name, value in items:
        if isinstance(value, ShardedBase):
            if value.key.endswith(EXTRA_STATE):
                found.setdefault(value.key, []).append((*path, name))
        else:
            for key, paths in _extra_state_paths(value, (*path, name)).items():
                found.setdefault(key, []).extend(paths)
    return found


def _set_path(state: dict, path: tuple, value: Any) -> None:
    for name in path[:-1]:
        state = state.setdefault(name, {})
    state[path[-1]] = value


def load_rank_state(folder: str, layout: dict[str, int] | None = None) -> dict[str, Any] | None:
    """This rank's RNG/data state, when the checkpoint was written by the same number of ranks in the same
    ``layout`` (tensor/pipeline parallel sizes, as ``save`` records them). Under another layout rank r
    is another model shard with other data (TP=1 x DP=2 -> TP=2: two former data-parallel peers would
    feed different batches into one tensor-parallel group), so nothing per rank carries over."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    files = glob.glob(os.path.join(folder, "rank_state_*.pt"))
    path = os.path.join(folder, f"rank_state_{rank:05d}.pt")
    if len(files) != world or not os.path.exists(path):
        return None
    saved_layout = read_metadata(folder).get("layout")
    if layout is not None and saved_layout is not None and saved_layout != layout:
        return None
    return torch.load(path, weights_only=False, map_location="cpu")  # batches move to the device when used


def read_metadata(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MODEL_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: not a megatron-grm checkpoint")
    with open(path, encoding="utf-8") as f:
        try:
            metadata = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    return metadata
