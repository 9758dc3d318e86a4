"""Reading and writing Hugging Face model folders: config.json, weight files, tokenizer files.

Kept apart from the weight maps so that a broken folder (missing shard, truncated file, wrong index) is
reported by file and tensor name before any conversion starts, and so the writer is shared by every family.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as transformers reads it and --max-shard-size defaults to
# The shards write_safetensors (and transformers' save_pretrained) name: model-00001-of-00003.safetensors
SAFETENSORS_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")

log = logging.getLogger(__name__)


class HFFolderError(ValueError):
    """A Hugging Face folder is incomplete or inconsistent; the message names the file and tensor."""


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise HFFolderError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise HFFolderError(f"{path}: not valid JSON ({exc})") from exc


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The raw config.json as written (validation happens in the family adapter)."""
    return read_json(Path(folder) / CONFIG_FILE)


class HFWeights:
    """Names, shapes and lazy loading of the tensors of an HF folder (safetensors, sharded or not, or .bin).

    Shapes come from file headers, so a folder can be checked completely without reading any weights.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._bin_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.kind = self._discover()

    def _discover(self) -> str:
        f = self.folder
        if (f / SAFETENSORS_INDEX).exists() and (f / SAFETENSORS_FILE).exists():
            # transformers loads model.safetensors and ignores the index; reading the index here would check
            # (and convert) other weights than the ones transformers runs.
            raise HFFolderError(f"{f}: holds both {SAFETENSORS_FILE} and {SAFETENSORS_INDEX}, so it is ambiguous "
                                "which weights are the model's (transformers would load the single file); remove "
                                "the stale one")
        if (f / SAFETENSORS_INDEX).exists():
            self._read_index(f / SAFETENSORS_INDEX)
            for file in sorted(set(self.file_of.values())):
                self._read_safetensors_header(file)
            return "safetensors"
        if (f / SAFETENSORS_FILE).exists():
            self._read_safetensors_header(SAFETENSORS_FILE, claim_all=True)
            return "safetensors"
        if (f / BIN_INDEX).exists():
            self._read_index(f / BIN_INDEX)
            for file in sorted(set(self.file_of.values())):
                self._read_bin(file)
            return "bin"
        if (f / BIN_FILE).exists():
            self._read_bin(BIN_FILE, claim_all=True)
            return "bin"
        raise HFFolderError(
            f"{f}: no weights found (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX})")

    def _read_index(self, index_path: Path) -> None:
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFFolderError(f"{index_path}: has no 'weight_map'")
        self.file_of = dict(weight_map)
        for file in sorted(set(weight_map.values())):
            if not (self.folder / file).is_file():
                names = sorted(n for n, fl in weight_map.items() if fl == file)
                listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                raise HFFolderError(f"{self.folder / file}: shard listed in {index_path.name} is missing "
                                    f"(it holds tensor {listed})")

    def _read_safetensors_header(self, file: str, claim_all: bool = False) -> None:
        from safetensors import safe_open

        path = self.folder / file
        try:
            with safe_open(str(path), framework="pt") as st:
                for name in st.keys():
                    self._shapes[name] = tuple(st.get_slice(name).get_shape())
                    if claim_all:
                        self.file_of[name] = file
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise HFFolderError(f"{path}: unreadable safetensors file ({exc})") from exc
        for name, owner in self.file_of.items():
            if owner == file and name not in self._shapes:
                raise HFFolderError(f"{path}: tensor {name} listed in the index is not in this file")

    def _read_bin(self, file: str, claim_all: bool = False) -> None:
        path = self.folder / file
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise HFFolderError(f"{path}: unreadable PyTorch weights file ({exc})") from exc
        self._bin_cache[file] = state
        for name, tensor in state.items():
            self._shapes[name] = tuple(tensor.shape)
            if claim_all:
                self.file_of[name] = file
        for name, owner in self.file_of.items():
            if owner == file and name not in state:
                raise HFFolderError(f"{path}: tensor {name} listed in the index is not in this file")

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def where(self, name: str) -> str:
        """The file a tensor lives in, for error messages."""
        return str(self.folder / self.file_of[name]) if name in self.file_of else str(self.folder)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.file_of:
            raise HFFolderError(f"{self.folder}: tensor {name} is missing from the weight files")
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        self.shape(name)
        file = self.file_of[name]
        if self.kind == "bin":
            return self._bin_cache[file][name]
        from safetensors import safe_open

        try:
            with safe_open(str(self.folder / file), framework="pt") as st:
                return st.get_tensor(name)
        except Exception as exc:
            raise HFFolderError(f"{self.folder / file}: cannot read tensor {name} ({exc})") from exc


def remove_weight_files(folder: str | os.PathLike, extra: Iterable[str] = ()) -> list[str]:
    """Delete the safetensors weight files an earlier export left (and ``extra`` names); returns what was removed.

    Without this, an unsharded export over a sharded one (or the reverse) leaves both, and transformers
    (which prefers model.safetensors) and an index reader would load different weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    owned = {SAFETENSORS_FILE, SAFETENSORS_INDEX, *extra}
    removed = sorted(p.name for p in folder.iterdir()
                     if p.is_file() and (p.name in owned or SAFETENSORS_SHARD.fullmatch(p.name)))
    for name in removed:
        (folder / name).unlink()
        log.info("removed %s left by an earlier export", folder / name)
    return removed


def write_safetensors(folder: str | os.PathLike,
                      tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index when over the threshold.

    ``tensors``: a mapping, or (name, tensor) pairs made one at a time: each shard is written once it is full
    and dropped, so a caller that makes its tensors on the fly (an export) holds at most one shard of them.
    Weight files already in ``folder`` are removed first, so the folder holds exactly this model's weights.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    remove_weight_files(folder)
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    parts: list[str] = []  # full shards written so far, under names that do not yet say how many there are
    weight_map: dict[str, int] = {}  # tensor -> shard number
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    for name, tensor in pairs:
        t = tensor.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            parts.append(f".part-{len(parts) + 1:05d}.safetensors")
            save_file(shard, str(folder / parts[-1]), metadata={"format": "pt"})
            shard, size = {}, 0
        shard[name] = t
        weight_map[name] = len(parts) + 1
        size += nbytes
        total += nbytes
    if not parts:
        save_file(shard, str(folder / SAFETENSORS_FILE), metadata={"format": "pt"})
        return [SAFETENSORS_FILE]
    parts.append(f".part-{len(parts) + 1:05d}.safetensors")
    save_file(shard, str(folder / parts[-1]), metadata={"format": "pt"})
    files = [f"model-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
    for part, file in zip(parts, files):
        os.replace(folder / part, folder / file)
    index = {"metadata": {"total_size": total}, "weight_map": {name: files[i - 1] for name, i in weight_map.items()}}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files + [SAFETENSORS_INDEX]


def copy_files(src: str | os.PathLike, dst: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Copy the listed files that exist in ``src`` to ``dst``; returns the names copied."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files (and generation_config.json, which carries the stop tokens) of an HF folder."""
    copied = copy_files(src, dst, TOKENIZER_FILES + (GENERATION_CONFIG_FILE,))
    if not set(copied) & set(TOKENIZER_FILES):
        raise HFFolderError(f"{src}: no tokenizer files found (looked for {', '.join(TOKENIZER_FILES)})")
    return copied
