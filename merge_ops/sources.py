"""Where input tensors come from: checkpoints on disk (lazily, memory-mapped) or tensors in memory.

Every source answers the same questions (names, shapes, dtypes, a tensor by
name, the model config), so the planner and the executor never care whether a
model is a sharded safetensors directory, a hub id fetched into the cache, an
earlier stage of a multi-stage recipe, or weights already resident on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

import torch
from mergetune.errors import MergetuneError

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files a merge output carries over from its donor model, besides weights and config.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: What a checkpoint's weights are stored in, as transformers (and vLLM) look for them: safetensors, or pickles.
SAFETENSORS_FILES, PICKLED_FILES = "*.safetensors", "pytorch_model*.bin"
WEIGHT_FILES = (SAFETENSORS_FILES, PICKLED_FILES)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap: a longer "header" is damage
FINGERPRINT_SAMPLE_BYTES = 64  # read at a tensor's start and middle for `CheckpointSource.fingerprint`
#: A safetensors header's dtype names (the format's own), read here and written by `writer`.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorSource(Protocol):
    """What the planner and executor need to know about one input model."""

    label: str
    config: dict[str, Any]
    directory: Optional[Path]

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str, device: str = "cpu") -> torch.Tensor: ...


@dataclass(frozen=True)
class _Stored:
    """Where one tensor's bytes are in a safetensors shard."""

    shard: Path
    start: int
    end: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class CheckpointSource:
    """A model directory of safetensors shards, read tensor by tensor.

    Only headers are read up front. A tensor's bytes are read with `pread` into a
    fresh buffer when asked for — not memory-mapped, so pages already used do not
    stay in the process's memory: the merge never holds a whole model.
    """

    def __init__(self, label: str, directory: Path, allow_pickle: bool = False):
        self.label = label
        self.directory = directory
        self.config = _read_config(directory, label)
        self._stored: dict[str, _Stored] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._descriptors: dict[Path, int] = {}
        shards = _safetensors_shards(directory, label)
        if shards:
            for shard in shards:
                self._stored.update(self._read_header(shard))
        else:
            self._load_pickled(directory, label, allow_pickle)

    def _read_header(self, shard: Path) -> dict[str, _Stored]:
        """Every tensor's place in `shard`, each checked against the file before any tensor is read."""
        try:
            size = shard.stat().st_size
            with open(shard, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise self._corrupt(shard, "no header")
                length = struct.unpack("<Q", prefix)[0]
                if length > size - 8:
                    raise self._corrupt(shard, f"header of {length} bytes in a file of {size}")
                if length > MAX_HEADER_BYTES:  # checked before the read allocates it
                    raise self._corrupt(shard, f"header of {length} bytes, over the {MAX_HEADER_BYTES} a header may have")
                header = json.loads(handle.read(length))
        except OSError as error:
            raise MergetuneError(f"model {self.label}: cannot read {shard}: {error}") from None
        except ValueError as error:
            raise self._corrupt(shard, f"header is not JSON: {error}") from None
        if not isinstance(header, dict):
            raise self._corrupt(shard, "header is not a JSON object")
        return {
            name: self._stored_tensor(shard, name, info, 8 + length, size)
            for name, info in header.items()
            if name != "__metadata__"
        }

    def _stored_tensor(self, shard: Path, name: str, info: Any, data_start: int, size: int) -> _Stored:
        """One header entry whose dtype, shape and byte range agree with each other and lie inside the file."""
        entry = info if isinstance(info, dict) else {}
        offsets, shape, dtype_name = entry.get("data_offsets"), entry.get("shape"), entry.get("dtype")
        if not (_naturals(offsets) and len(offsets) == 2 and _naturals(shape) and isinstance(dtype_name, str)):
            raise self._corrupt(shard, f"bad entry for tensor {name}")
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise MergetuneError(
                f"model {self.label}: tensor {name} in {shard} has dtype {dtype_name}, which mergetune does not "
                f"read ({', '.join(SAFETENSORS_DTYPES)}); quantized checkpoints are not supported"
            )
        begin, end = offsets
        if data_start + end > size:
            raise self._corrupt(shard, f"tensor {name} ends at byte {data_start + end}, past the end of the file ({size})")
        needed = math.prod(shape) * dtype.itemsize
        if end - begin != needed:
            raise self._corrupt(
                shard, f"tensor {name}: shape {shape} {dtype_name} needs {needed} bytes, its byte range [{begin}, {end}) holds {end - begin}"
            )
        return _Stored(shard, data_start + begin, data_start + end, tuple(shape), dtype)

    def _corrupt(self, shard: Path, reason: str) -> MergetuneError:
        return MergetuneError(f"model {self.label}: {shard} is corrupt or truncated ({reason})")

    def _load_pickled(self, directory: Path, label: str, allow_pickle: bool) -> None:
        files = sorted(directory.glob(PICKLED_FILES))
        if not files:
            raise MergetuneError(f"model {label}: no {SAFETENSORS_FILES} (or {PICKLED_FILES}) weights in {directory}")
        if not allow_pickle:
            raise MergetuneError(
                f"model {label}: only pickled weights ({files[0].name}) in {directory}; pickles can run code when "
                "loaded. Convert them to safetensors, or pass --allow-pickle if you trust this model"
            )
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # torch raises many types for a bad pickle
                raise MergetuneError(f"model {label}: cannot load {file}: {error}") from None
            if not isinstance(state, dict) or not all(
                isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
            ):
                raise MergetuneError(f"model {label}: {file} does not hold a state dict (tensor names to tensors)")
            self._pickled.update(state)

    def names(self) -> list[str]:
        return list(self._stored) or list(self._pickled)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._pickled:
            return tuple(self._pickled[name].shape)
        return self._stored[name].shape

    def dtype(self, name: str) -> torch.dtype:
        if name in self._pickled:
            return self._pickled[name].dtype
        return self._stored[name].dtype

    def fingerprint(self) -> str:
        """A digest of every tensor's name, shape, dtype and a few bytes at its start and middle.

        Equal for the same checkpoint however it is sharded, different for another fine-tune of the
        same shape (its weights differ everywhere), and two reads of 64 bytes per tensor (about 1,500
        for a 70B) where a hash of every byte would read the whole model once more.
        """
        digest = hashlib.sha256()
        for name in sorted(self.names()):
            digest.update(f"{name}|{list(self.shape(name))}|{self.dtype(name)}|".encode())
            digest.update(self._samples(name))
        return digest.hexdigest()[:16]

    def _samples(self, name: str) -> bytes:
        """FINGERPRINT_SAMPLE_BYTES of the tensor's bytes at its start and at its middle."""
        if name in self._pickled:
            raw = self._pickled[name].reshape(-1).view(torch.uint8)
            return b"".join(bytes(raw[at : at + FINGERPRINT_SAMPLE_BYTES].tolist()) for at in (0, raw.numel() // 2))
        stored = self._stored[name]
        size = stored.end - stored.start
        descriptor = self._descriptor(stored.shard)
        try:
            return b"".join(
                os.pread(descriptor, min(FINGERPRINT_SAMPLE_BYTES, size - at), stored.start + at) for at in (0, size // 2)
            )
        except OSError as error:
            raise MergetuneError(f"model {self.label}: cannot read tensor {name} from {stored.shard}: {error}") from None

    def get(self, name: str, device: str = "cpu") -> torch.Tensor:
        if name in self._pickled:
            return self._pickled[name].to(device)
        stored = self._stored[name]
        buffer = torch.empty(stored.end - stored.start, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        descriptor = self._descriptor(stored.shard)
        done = 0
        try:
            while done < len(view):
                count = os.preadv(descriptor, [view[done:]], stored.start + done)
                if count == 0:
                    raise OSError(f"unexpected end of file after {done} of {len(view)} bytes")
                done += count
        except OSError as error:
            raise MergetuneError(f"model {self.label}: cannot read tensor {name} from {stored.shard}: {error}") from None
        tensor = buffer.view(stored.dtype).reshape(stored.shape)
        return tensor.to(device) if device != "cpu" else tensor

    def _descriptor(self, shard: Path) -> int:
        if shard not in self._descriptors:
            self._descriptors[shard] = os.open(shard, os.O_RDONLY)
        return self._descriptors[shard]

    def __del__(self) -> None:
        for descriptor in getattr(self, "_descriptors", {}).values():
            os.close(descriptor)


def resident_bytes(source: TensorSource) -> int:
    """What a source takes once resident: every tensor in its stored dtype."""
    return sum(math.prod(source.shape(name)) * source.dtype(name).itemsize for name in source.names())


class MemorySource:
    """Tensors already in memory: an earlier stage's output, or sources kept resident for a search."""

    def __init__(
        self,
        label: str,
        tensors: Mapping[str, torch.Tensor],
        config: dict[str, Any],
        directory: Optional[Path] = None,
    ):
        self.label = label
        self.tensors = dict(tensors)
        self.config = config
        self.directory = directory

    @classmethod
    def resident(
        cls, source: TensorSource, device: str = "cpu", loaded: Optional[Callable[[int], None]] = None
    ) -> "MemorySource":
        """Load every tensor of `source` onto `device` once; `loaded(bytes)` after each (for progress)."""
        tensors = {}
        for name in source.names():
            tensors[name] = source.get(name, device)
            if loaded is not None:
                loaded(tensors[name].numel() * tensors[name].element_size())
        return cls(source.label, tensors, source.config, source.directory)

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str, device: str = "cpu") -> torch.Tensor:
        return self.tensors[name].to(device)


def _naturals(value: Any) -> bool:
    """A list of non-negative integers (a shape, a byte range), as JSON gives them."""
    return isinstance(value, list) and all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value)


def read_json_object(path: Path, owner: str) -> dict[str, Any]:
    """A JSON file that must hold an object, or one MergetuneError naming `owner` and the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise MergetuneError(f"{owner}: cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise MergetuneError(f"{owner}: {path} holds a JSON {type(data).__name__}, not an object")
    return data


def _read_config(directory: Path, label: str) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        raise MergetuneError(f"model {label}: no config.json in {directory}")
    return read_json_object(path, f"model {label}")


def _safetensors_shards(directory: Path, label: str) -> list[Path]:
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        weight_map = read_json_object(index, f"model {label}").get("weight_map")
        # Shard names are plain file names: an index must not point the reader outside the model.
        if not isinstance(weight_map, dict) or not all(
            isinstance(file, str) and file == Path(file).name and file not in ("", ".", "..") for file in weight_map.values()
        ):
            raise MergetuneError(f"model {label}: {index}: weight_map must map tensor names to shard file names in {directory}")
        shards = sorted({directory / file for file in weight_map.values()})
        missing = [shard.name for shard in shards if not shard.exists()]
        if missing:
            raise MergetuneError(f"model {label}: {index.name} lists shard(s) that are missing: {', '.join(missing)}")
        return shards
    return sorted(directory.glob(SAFETENSORS_FILES))


def resolve_model_directory(reference: str) -> Path:
    """A local directory as is; anything else is a hub id fetched (or found) in the HF cache."""
    path = Path(os.path.expanduser(reference))
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise MergetuneError(f"model {reference}: is a file, expected a model directory")
    if "+" in reference:
        raise MergetuneError(f"model {reference}: LoRA adapters (model+adapter) are not supported; merge the adapter first")
    if "@" in reference:
        raise MergetuneError(
            f"model {reference}: revisions (model@revision) are not supported; give a local directory or a plain hub id"
        )
    if reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        raise MergetuneError(f"model {reference}: no such directory (and not a hub id of the form org/name)")
    from huggingface_hub import snapshot_download

    log.info("fetching %s from the Hugging Face hub (safetensors, config, tokenizer)", reference)
    try:
        return Path(
            snapshot_download(
                reference,
                allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.jinja", "merges.txt"],
            )
        )
    except Exception as error:  # hub errors come in many types; all mean "can't get it"
        local = f" ({path.parent}/ is a folder here: a typo in a local path?)" if path.parent.is_dir() else ""
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise MergetuneError(
            f"model {reference}: no such local directory{local}, and fetching it from the hub failed: {first}"
        ) from None


def open_source(reference: str, allow_pickle: bool = False) -> CheckpointSource:
    return CheckpointSource(reference, resolve_model_directory(reference), allow_pickle=allow_pickle)
