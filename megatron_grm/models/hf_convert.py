"""Hugging Face <-> Megatron-Core checkpoints for Llama, Qwen2 and Gemma-2.

HF -> Megatron: every rank builds the GPTModel chunk of its TP/PP layout, fills each parameter with its
shard of the full tensor the family adapter makes from the HF tensors, and all ranks save one
``torch_dist`` checkpoint (``{"model": sharded_state_dict}``), which any other TP/PP layout can load.

Megatron -> HF: one process builds the TP=1/PP=1 model, lets dist_checkpointing reshard the checkpoint
into it, and the adapter turns the full tensors back into HF names.

The adapter works in the unsharded layout; only :func:`tp_shard` knows about tensor parallelism
(contiguous split along the parameter's partition dim; the gated fc1 splits gate and up separately) and
vocabulary padding (zero rows up to Megatron's padded size, dropped again on export).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_grm.models.config import ModelConfig
from megatron_grm.models.gemma2 import Gemma2Adapter
from megatron_grm.models.hf_adapter import ConfigError, StateDictAdapter, WeightRule
from megatron_grm.models.hf_io import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    GENERATION_CONFIG_FILE,
    TOKENIZER_FILES,
    HFFolderError,
    HFWeights,
    copy_files,
    copy_tokenizer,
    read_hf_config,
    remove_weight_files,
    write_safetensors,
)
from megatron_grm.models.llama import LlamaAdapter
from megatron_grm.models.qwen2 import Qwen2Adapter

log = logging.getLogger(__name__)

ADAPTERS: dict[str, StateDictAdapter] = {a.model_type: a for a in (LlamaAdapter(), Qwen2Adapter(), Gemma2Adapter())}
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
METARM_PREFIX = "metarm_head."
METARM_FILE = "metarm_head.safetensors"
TOKENIZER_DIR = "tokenizer"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# config.json dtype names an export may default to (the source model's dtype, recorded at import)
SOURCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapter_for_model_type(model_type: Any, where: str) -> StateDictAdapter:
    if model_type not in ADAPTERS:
        raise ConfigError(f"{where}: model_type={model_type!r} is not supported; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]


def adapter_for_family(family: str) -> StateDictAdapter:
    for adapter in ADAPTERS.values():
        if adapter.family == family:
            return adapter
    raise ConfigError(f"model.family={family!r} has no Hugging Face adapter")


# ------------------------------------------------------------------------------------------ HF side
@dataclass
class HFSource:
    """A validated HF folder: config, family adapter, weight files and the rule table."""

    folder: Path
    raw_config: dict[str, Any]
    cfg: ModelConfig
    adapter: StateDictAdapter
    weights: HFWeights
    rules: dict[str, WeightRule]  # by Megatron name

    def megatron_tensor(self, name: str) -> Tensor:
        """The full (unsharded, unpadded) Megatron tensor ``name`` made from the HF tensors."""
        if name not in self.rules:
            raise KeyError(f"no Hugging Face source for Megatron parameter {name}")
        rule = self.rules[name]
        return rule.merge([self.weights.get(n) for n in rule.hf])

    def hf_dtype(self) -> torch.dtype | None:
        """The dtype config.json declares (``dtype``, or ``torch_dtype`` before transformers 5), if any."""
        name = self.raw_config.get("dtype") or self.raw_config.get("torch_dtype")
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        return dtype if isinstance(dtype, torch.dtype) else None


def open_hf(folder: str | os.PathLike) -> HFSource:
    """Read and check an HF folder completely (config fields, tensor names and shapes) before converting."""
    folder = Path(folder)
    raw = read_hf_config(folder)
    where = str(folder / CONFIG_FILE)
    adapter = adapter_for_model_type(raw.get("model_type"), where)
    cfg = adapter.config_from_hf(raw, where)
    weights = HFWeights(folder)
    rules = adapter.rules(cfg)
    check_weights(weights, rules, cfg, adapter)
    return HFSource(folder, raw, cfg, adapter, weights, {r.megatron: r for r in rules})


def check_weights(weights: HFWeights, rules: list[WeightRule], cfg: ModelConfig, adapter: StateDictAdapter) -> None:
    """Every tensor the rules need is there with the shape config.json implies, and nothing else is."""
    expected: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        expected.update(zip(rule.hf, rule.hf_shapes))
    present = set(weights.names())
    for name, shape in expected.items():
        if name not in present:
            raise HFFolderError(f"{weights.folder}: tensor {name} is missing from the weight files "
                                f"(a {adapter.model_type} model with this config.json needs it)")
        got = weights.shape(name)
        if got != shape:
            raise HFFolderError(f"{weights.where(name)}: tensor {name} has shape {list(got)}, but config.json "
                                f"implies {list(shape)}")
    extra = sorted(n for n in present - expected.keys() if not adapter.ignorable_hf_tensor(n))
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")
        if not torch.equal(weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")):
            raise HFFolderError(f"{weights.where('lm_head.weight')}: tensor lm_head.weight differs from "
                                "model.embed_tokens.weight but config.json sets tie_word_embeddings=true")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise HFFolderError(f"{weights.where(extra[0])}: unexpected tensor {extra[0]}{more}: not part of a "
                            f"{adapter.model_type} model with this config.json; refusing to drop it silently")


# ------------------------------------------------------------------------------------------ sharding
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_parameter_names(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, str]:
    """Local parameter name of this PP stage -> the name in the TP=1/PP=1 model (global layer index)."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    offset = {str(j): str(layer.layer_number - 1) for j, layer in enumerate(layers)}
    names = {}
    for name, _ in model.named_parameters():
        canonical = _LAYER.sub(lambda m: f"decoder.layers.{offset[m.group(1)]}.", name)
        if canonical == "output_layer.weight" and cfg.tie_word_embeddings:
            canonical = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
        names[name] = canonical
    return names


def tp_shard(full: Tensor, param: Tensor, name: str, tp_rank: int, tp_size: int) -> Tensor:
    """This rank's piece of the full tensor, laid out exactly as Megatron's parameter expects it."""
    split = bool(getattr(param, "tensor_model_parallel", False)) and tp_size > 1
    parts = tp_size if split else 1
    if name in VOCAB_PARAMS:
        rows = param.shape[0] * parts
        if full.shape[0] > rows:
            raise ValueError(f"{name}: vocabulary of {full.shape[0]} rows does not fit the model's {rows}")
        full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])]) if rows > full.shape[0] \
            else full
    if split and name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        local = torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    elif split:
        local = full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
    else:
        local = full
    if tuple(local.shape) != tuple(param.shape):
        raise ValueError(f"{name}: TP rank {tp_rank}/{tp_size} piece has shape {list(local.shape)}, the model "
                         f"parameter has {list(param.shape)}")
    return local


@torch.no_grad()
def fill_model_from_hf(model: torch.nn.Module, src: HFSource) -> None:
    """Copy this rank's shard of every parameter from the HF tensors; every parameter must be covered."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    names = global_parameter_names(model, src.cfg)
    for local_name, param in model.named_parameters():
        canonical = names[local_name]
        piece = tp_shard(src.megatron_tensor(canonical), param, canonical, tp_rank, tp_size)
        param.data.copy_(piece)


# ------------------------------------------------------------------------------------------ HF -> Megatron
def check_conversion_target(out: Path, force: bool = False) -> None:
    """Refuse a root that holds a training run's checkpoints: a conversion publishes step 0 as ``latest``,
    and that run would resume from the fresh weights. ``force``: convert there all the same."""
    from megatron_grm.train.checkpoint import checkpoint_name

    others = sorted(p.name for p in out.glob("iter_*") if p.is_dir() and re.fullmatch(r"iter_\d{7}", p.name)
                    and p.name != checkpoint_name(0))  # not an interrupted save's .tmp/.replaced leftovers
    if others and not force:
        listed = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise HFFolderError(f"{out} holds other checkpoints ({listed}); converting there would point its 'latest' "
                            "at step 0: choose another --out (or pass --force)")


def convert_hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, layout,
                        params_dtype: str = "fp32", with_tokenizer: bool = True, force: bool = False) -> str:
    """Collective over the TP*PP ranks of an initialised parallel state; returns the checkpoint folder.

    The tokenizer goes into the checkpoint folder (``iter_0000000/tokenizer``) and is published with it: a
    conversion into a root that held another model never pairs its weights with the other's tokenizer."""
    from megatron_grm.models.precision import PrecisionConfig
    from megatron_grm.models.provider import build_model
    from megatron_grm.parallel.distributed import barrier
    from megatron_grm.train.checkpoint import checkpoint_name, save_checkpoint

    src = open_hf(hf_dir)
    out = Path(out_dir).resolve()
    check_conversion_target(out, force)
    tokenizer_dir = out / checkpoint_name(0) / TOKENIZER_DIR
    cfg = src.cfg
    if with_tokenizer:
        cfg.tokenizer = str(tokenizer_dir)
    model = build_model(cfg, layout, PrecisionConfig(params_dtype=params_dtype), use_te=False)
    fill_model_from_hf(model, src)
    barrier()
    source = {"hf": str(src.folder.resolve()), "model_type": src.adapter.model_type}
    if src.hf_dtype() is not None:  # the export's default dtype (export_dtype)
        source["dtype"] = str(src.hf_dtype()).removeprefix("torch.")
    metadata = {"model": cfg.to_dict(), "tokenizer": str(tokenizer_dir) if with_tokenizer else None,
                "stage": "convert", "source": source,
                "layout": {"tensor_parallel": layout.tensor_parallel, "pipeline_parallel": layout.pipeline_parallel}}
    def add_tokenizer(folder: str) -> None:
        if with_tokenizer:
            copy_tokenizer(src.folder, Path(folder) / TOKENIZER_DIR)

    return save_checkpoint(str(out), 0, {"model": model.sharded_state_dict()}, {}, metadata, add_tokenizer)


# ------------------------------------------------------------------------------------------ Megatron -> HF
def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(iteration folder, checkpoint root) from either a root with ``latest`` or an ``iter_*`` folder."""
    from megatron_grm.train.checkpoint import checkpoint_folder

    path = Path(path).resolve()
    folder = Path(checkpoint_folder(str(path)))
    return folder, (path.parent if folder == path else path)


class CheckpointError(ValueError):
    """A Megatron checkpoint is incomplete or does not match its model_config.json; names file and tensor."""


def check_checkpoint_files(folder: Path) -> None:
    """Every data file the torch_dist metadata refers to exists (else: which file, which tensors)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"{folder}: unreadable torch_dist metadata ({exc})") from exc
    held: dict[str, set[str]] = {}
    for index, info in metadata.storage_data.items():
        held.setdefault(info.relative_path, set()).add(index.fqn)
    for file, keys in sorted(held.items()):
        if not (folder / file).is_file():
            names = sorted(keys)
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise CheckpointError(f"{folder / file}: checkpoint data file is missing (it holds tensor "
                                  f"{', '.join(names[:3])}{more})")


def _root_cause(exc: Exception) -> str:
    """torch.distributed.checkpoint wraps each rank's error; the first one is the message worth showing."""
    for failure in getattr(exc, "failures", {}).values():  # rank -> (exception, traceback summary)
        return str(failure[0] if isinstance(failure, tuple) else failure)
    return str(exc)


def stored_tensor_metadata(folder: Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    check_checkpoint_files(folder)
    return dist_checkpointing.load_tensors_metadata(str(folder))


def load_megatron_model(ckpt: str | os.PathLike) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any], Path]:
    """The TP=1/PP=1 model of a checkpoint saved at any layout (parallel state must be TP=1/PP=1)."""
    from megatron_grm.models.precision import PrecisionConfig
    from megatron_grm.models.provider import build_model
    from megatron_grm.parallel.distributed import ParallelLayout
    from megatron_grm.train.checkpoint import MODEL_CONFIG, load_checkpoint, read_metadata

    folder, _ = resolve_checkpoint(ckpt)
    metadata = read_metadata(str(folder))
    if not isinstance(metadata.get("model"), dict):
        raise ValueError(f"{folder / MODEL_CONFIG}: field 'model' is missing or not an object")
    try:
        cfg = ModelConfig.from_dict(metadata["model"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{folder / MODEL_CONFIG}: field 'model': {exc}") from None
    stored = stored_tensor_metadata(folder)
    emb = stored.get("embedding.word_embeddings.weight")
    if emb is None:
        raise KeyError(f"{folder}: no embedding.word_embeddings.weight in the checkpoint")
    dtype = "bf16" if emb.dtype == torch.bfloat16 else "fp32"
    model = build_model(cfg, ParallelLayout(), PrecisionConfig(params_dtype=dtype), use_te=False,
                        vocab_size=int(emb.global_shape[0]))
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = load_checkpoint(str(folder), {"model": model.sharded_state_dict()})
    except (CheckpointingException, CheckpointException) as exc:
        raise CheckpointError(f"{folder}: checkpoint does not match its {MODEL_CONFIG}: {_root_cause(exc)}") from exc
    model.load_state_dict(loaded["model"])
    model.eval()
    return model, cfg, metadata, folder


def megatron_state_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF tensors from a TP=1/PP=1 state dict; a Megatron tensor without an HF counterpart is an error."""
    return dict(megatron_tensors_to_hf(dict(state), cfg))


def megatron_tensors_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """(HF name, tensor) pairs made one Megatron tensor at a time, each popped from ``state`` first: a state
    dict the caller holds nothing else of (the model deleted) shrinks as the pairs are consumed, so an export
    holds about one model in memory, not the model and all of its HF copies. A tensor missing from ``state``
    or left without an HF counterpart raises here, before any pair is made."""
    adapter = adapter_for_family(cfg.family)
    rules = adapter.rules(cfg)
    names = {k for k in state if not k.endswith("_extra_state")}
    for rule in rules:
        if rule.megatron not in names:
            raise KeyError(f"checkpoint has no tensor {rule.megatron} (needed for {', '.join(rule.hf)})")
    unmatched = names - {rule.megatron for rule in rules}
    if unmatched:
        raise KeyError(f"checkpoint tensors {sorted(unmatched)} have no Hugging Face counterpart in {adapter.family}")
    for name in [k for k in state if k.endswith("_extra_state")]:
        del state[name]

    def pairs() -> Iterator[tuple[str, Tensor]]:
        for rule in rules:
            tensor = state.pop(rule.megatron)
            if rule.megatron in VOCAB_PARAMS:
                tensor = tensor[: cfg.vocab_size]
            pieces = [t.clone().contiguous() for t in rule.split(tensor)]
            del tensor  # its memory goes before the pieces are written
            yield from zip(rule.hf, pieces)
            del pieces

    return pairs()


def load_metarm_head(folder: Path) -> dict[str, Tensor]:
    """The MetaRM head tensors (``metarm_head.*``) if the checkpoint has them, as full tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    stored = {k: v for k, v in stored_tensor_metadata(folder).items() if k.startswith(METARM_PREFIX)}
    if not stored:
        return {}
    request = {k: ShardedTensor.from_rank_offsets(k, torch.empty(v.global_shape, dtype=v.dtype))
               for k, v in stored.items()}
    loaded = dist_checkpointing.load(request, str(folder))
    return {k[len(METARM_PREFIX):]: loaded[k].contiguous() for k in stored}


def find_tokenizer(metadata: dict[str, Any], cfg: ModelConfig, folder: Path, root: Path) -> Path | None:
    """The HF tokenizer folder of a checkpoint: the one its metadata names, else (a checkpoint moved
    elsewhere) ``<iter folder>/tokenizer`` or, as conversions before 2026-12-03 wrote it, ``<root>/tokenizer``.
    A checkpoint whose metadata says ``"tokenizer": null`` (converted with --no-tokenizer) has none: a
    tokenizer folder that happens to lie beside it belongs to something else."""
    if "tokenizer" in metadata and metadata["tokenizer"] is None:
        candidates = ()
    else:
        candidates = (metadata.get("tokenizer"), cfg.tokenizer, folder / TOKENIZER_DIR, root / TOKENIZER_DIR)
    for candidate in candidates:
        if candidate and candidate != "char" and Path(candidate).is_dir() \
                and any((Path(candidate) / f).is_file() for f in TOKENIZER_FILES):
            return Path(candidate)
    return None


def token_ids(tokenizer_dir: Path | None) -> dict[str, Any]:
    """bos/eos/pad ids for config.json: generation_config.json if it came along, else the tokenizer's."""
    gen = tokenizer_dir / GENERATION_CONFIG_FILE if tokenizer_dir else None
    if gen is not None and gen.is_file():
        values = json.loads(gen.read_text())
        return {k: values[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in values}
    if tokenizer_dir is None:
        return {}
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:  # a broken tokenizer.json/.model: say which folder, not just the parser's words
        raise HFFolderError(f"{tokenizer_dir}: the tokenizer does not load ({type(exc).__name__}: {exc})") from None
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def write_generation_config(out: Path, tokenizer_dir: Path | None, ids: dict[str, Any]) -> None:
    if tokenizer_dir is not None and copy_files(tokenizer_dir, out, [GENERATION_CONFIG_FILE]):
        return
    from transformers import GenerationConfig

    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(str(out))


def write_metarm_head(out: Path, head: dict[str, Tensor], hidden_size: int) -> None:
    """``metarm_head.safetensors``: the MetaRM scalar head, documented in docs/conversion.md."""
    from safetensors.torch import save_file

    weight = head.get("weight")
    if weight is None or tuple(weight.shape) != (1, hidden_size):
        raise ValueError(f"metarm_head.weight must have shape [1, {hidden_size}], got "
                         f"{None if weight is None else list(weight.shape)}")
    unknown = sorted(set(head) - {"weight", "bias"})
    if unknown:
        raise ValueError(f"metarm_head has tensors {unknown} besides weight/bias; no documented export for them")
    save_file(head, str(out / METARM_FILE), metadata={
        "format": "megatron-grm.metarm_head.v1", "hidden_size": str(hidden_size),
        "input": "final hidden state after the final norm, last token", "output": "logit of P(judgment correct)"})


def export_dtype(dtype: str | None, metadata: dict[str, Any], stored: torch.dtype) -> torch.dtype:
    """``--dtype`` if given, else the HF source's dtype recorded at import, else the checkpoint's own.

    A bf16 model converted with the defaults is stored in fp32 (exact); without the recorded source dtype its
    export would silently come back at twice the size. Checkpoints without the record keep their stored dtype.
    """
    if dtype:
        return DTYPES[dtype]
    source = metadata.get("source")
    name = source.get("dtype") if isinstance(source, dict) else None
    if name in SOURCE_DTYPES:
        log.info("exporting in %s, the dtype of the Hugging Face model it was converted from (--dtype overrides)",
                 name)
        return SOURCE_DTYPES[name]
    if name is not None:
        log.info("source dtype %r is not an export dtype (%s); exporting as stored (%s)", name,
                 ", ".join(SOURCE_DTYPES), stored)
    return stored


def export_mcore_to_hf(ckpt: str | os.PathLike, out_dir: str | os.PathLike,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str | None = None,
                       with_tokenizer: bool = True) -> Path:
    """Write an HF folder that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load (one process, TP=PP=1)."""
    from megatron_grm.train.checkpoint import fsync

    model, cfg, metadata, folder = load_megatron_model(ckpt)
    _, root = resolve_checkpoint(ckpt)
    adapter = adapter_for_family(cfg.family)
    state = model.state_dict()
    del model  # the state's tensors now hold the weights alone: each is freed once converted and written
    stored_dtype = next(v for k, v in state.items() if not k.endswith("_extra_state")).dtype
    pairs = megatron_tensors_to_hf(state, cfg)
    out_dtype = export_dtype(dtype, metadata, stored_dtype)
    tokenizer_dir = find_tokenizer(metadata, cfg, folder, root) if with_tokenizer else None
    if with_tokenizer and tokenizer_dir is None:  # refused before anything in --out is touched
        raise HFFolderError(f"{root}: checkpoint has no Hugging Face tokenizer folder (metadata tokenizer="
                            f"{metadata.get('tokenizer')!r}); pass --no-tokenizer to export weights only")
    # Everything that can fail on bad input comes first; then the files are written into a staging folder
    # inside --out and moved in last, so a refusal, a full disk or a kill while writing leaves an earlier
    # export whole (only a kill among the final renames, after its weight files are removed, does not).
    ids = token_ids(tokenizer_dir)
    hf_config = adapter.hf_config(cfg, out_dtype, ids)
    head = load_metarm_head(folder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".export.tmp.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        written: list[str] = []

        def in_out_dtype() -> Iterator[tuple[str, Tensor]]:
            for name, tensor in pairs:
                written.append(name)
                yield name, tensor.to(out_dtype)

        write_safetensors(staging, in_out_dtype(), max_shard_bytes)
        num_tensors = len(written)
        write_generation_config(staging, tokenizer_dir, ids)
        copied = copy_files(tokenizer_dir, staging, TOKENIZER_FILES) if tokenizer_dir is not None else []
        if head:
            write_metarm_head(staging, {k: v.to(out_dtype) for k, v in head.items()}, cfg.hidden_size)
        for entry in staging.iterdir():
            fsync(str(entry))
        remove_weight_files(out, extra=(METARM_FILE,))  # an earlier export's weights must not outlive this one
        if tokenizer_dir is not None and out.resolve() != tokenizer_dir.resolve():
            # An earlier export's tokenizer files this tokenizer lacks would be read in its place (AutoTokenizer
            # prefers a stale tokenizer.json to this one's tokenizer.model).
            for name in TOKENIZER_FILES:
                if name not in copied and (out / name).is_file():
                    (out / name).unlink()
                    log.info("removed %s: an earlier export's, not a file of this tokenizer", out / name)
        for entry in sorted(staging.iterdir()):
            os.replace(entry, out / entry.name)
        fsync(str(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s (%s, %d tensors%s) to %s", folder, cfg.family, num_tensors,
             ", MetaRM head" if head else "", out)
    return out
