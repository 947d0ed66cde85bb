"""Weights without waste: models built without memory, tensors read one at a time, sharded files.

A full-size MSMedCap has 4.13 B parameters. Building it the ordinary way makes a random fp32 copy
(16.5 GB) before a single real weight is read, and writing it as one safetensors file holds a
second copy in memory. Here a model is built with its parameters on the meta device (no memory),
each weight is read from its file when it is assigned (in the file's dtype, or cast on the way),
and checkpoints are written in shards of bounded size, as transformers does.

Buffers are built for real: they are small, and some (position ids) are never stored in a file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

SINGLE_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 2 * 1024**3  # as transformers' default "2GB"-ish shards: any one file stays easy to copy and to hash


class WeightsError(RuntimeError):
    """Missing, unexpected or mis-shaped weights; the message names them."""


@contextmanager
def empty_weights() -> Iterator[None]:
    """Inside, every parameter a module registers lives on the meta device: shape and dtype, no memory.

    Initialisers run on meta tensors as no-ops, so building a 4 B-parameter model takes no time
    and no memory; :func:`assign` then gives each parameter its real tensor.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter (an LM head tied to its embeddings), each group in model order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = getattr(module, leaf)
    if isinstance(current, nn.Parameter):
        value = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=current.requires_grad)
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value


def assign(model: nn.Module, tensors: dict[str, torch.Tensor], *, what: str) -> None:
    """Give ``model`` exactly these tensors (their own storage and dtype: no copy is made).

    Every parameter and persistent buffer must be given (one name of a tied group is enough),
    nothing else may be; a shape that differs is an error.
    """
    expected = model.state_dict(keep_vars=True)
    groups = {name: group for group in tied_groups(model) for name in group}
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(n for n in expected if n not in tensors and not any(m in tensors for m in groups.get(n, ())))
    if missing or unexpected:
        raise WeightsError(f"{what}: {len(missing)} missing weight(s) {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise WeightsError(f"{what}: {name} has shape {tuple(value.shape)}, the model expects {tuple(expected[name].shape)}")
    buffers = {name for name, _ in model.named_buffers()}
    done: set[str] = set()
    for name, value in tensors.items():
        if name in done:
            continue
        group = groups.get(name, [name])
        shared = value if name in buffers else nn.Parameter(value, requires_grad=expected[name].requires_grad)
        for member in group:
            _set(model, member, shared)
            done.add(member)


def meta_names(model: nn.Module) -> list[str]:
    """Parameters and buffers still without memory (nothing was assigned to them)."""
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]


# -- reading ---------------------------------------------------------------------------------


class TensorFiles:
    """The tensors of a checkpoint on disk, read one at a time by name.

    ``path``: a safetensors file, a directory of them (sharded with an index, or not), or a
    PyTorch ``.bin``/``.pth`` (memory-mapped where the file allows; a LAVIS file's tensors sit
    under its ``"model"`` entry).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        self._torch: dict[str, torch.Tensor] | None = None
        if self.path.is_dir():
            files = sorted(self.path.glob("*.safetensors"))
            if files:
                for file in files:
                    with safe_open(str(file), framework="pt") as f:
                        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                            self._where[key] = file
                return
            torch_files = sorted([*self.path.glob("*.bin"), *self.path.glob("*.pth"), *self.path.glob("*.pt")])
            if not torch_files:
                raise WeightsError(f"{self.path}: no *.safetensors or *.bin weights in this directory")
            self._load_torch(torch_files)
        elif self.path.suffix == ".safetensors":
            with safe_open(str(self.path), framework="pt") as f:
                self._where = dict.fromkeys(f.keys(), self.path)
        elif self.path.is_file():
            self._load_torch([self.path])
        else:
            raise WeightsError(f"{self.path} does not exist")

    def _load_torch(self, files: list[Path]) -> None:
        self._torch = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]  # LAVIS: {"model", "optimizer", "config", "scaler", "epoch"}
            if not isinstance(state, dict):
                raise WeightsError(f"{file}: not a state dict")
            self._torch.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})

    def keys(self) -> set[str]:
        return set(self._torch) if self._torch is not None else set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self.keys()

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self._torch is not None:
            tensor = self._torch[name]
        else:
            with safe_open(str(self._where[name]), framework="pt") as f:
                tensor = f.get_tensor(name)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def take(self, names: Callable[[str], str | None], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{target name: tensor} for every source name that ``names`` maps (None: skip it)."""
        out = {}
        for source in sorted(self.keys()):
            target = names(source)
            if target is not None:
                out[target] = self.get(source, dtype)
        return out


def prefixed(prefix: str, rename: Callable[[str], str] = lambda k: k) -> Callable[[str], str | None]:
    """A name map for :meth:`TensorFiles.take`: keys under ``prefix``, prefix removed, then renamed."""

    def names(key: str) -> str | None:
        return rename(key[len(prefix) :]) if key.startswith(prefix) else None

    return names


# -- checkpoint files ------------------------------------------------------------------------------


def weight_files(directory: Path) -> list[Path]:
    """The weights files of a MedCap checkpoint, in order: one ``model.safetensors`` or the index's shards."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    return []


#: One entry of a file plan: (name, bytes it will take, a function that gives the tensor to write).
Entry = tuple[str, int, Callable[[], torch.Tensor]]


def write_shards(entries: Iterable[Entry], directory: Path, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write tensors in shards of at most ``shard_bytes`` (one ``model.safetensors`` when they fit),
    asking each entry for its tensor only when its shard is written: at most one shard of
    converted copies is in memory at a time. Returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in [directory / SINGLE_FILE, directory / INDEX, *directory.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[1] > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[1]
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for file, shard in zip(names, shards, strict=True):
        tensors = {name: make().contiguous() for name, _, make in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(names) > 1:
        (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    return [directory / n for n in names]


def _detached(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to(dtype)


def model_entries(
    model: nn.Module, *, dtype_of: Callable[[str, torch.Tensor], torch.dtype] | None = None, skip: Callable[[str], bool] = lambda _: False
) -> list[Entry]:
    """A model's state as a file plan: tied parameters once (under their first name), ``skip``
    left out, floating-point tensors cast to ``dtype_of(name, tensor)`` on the way out."""
    tied = {name for group in tied_groups(model) for name in group[1:]}
    entries: list[Entry] = []
    for name, tensor in model.state_dict().items():
        if name in tied or skip(name):
            continue
        dtype = dtype_of(name, tensor) if dtype_of is not None and tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * torch.empty((), dtype=dtype).element_size()
        entries.append((name, nbytes, partial(_detached, tensor, dtype)))
    return entries


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a MedCap checkpoint directory, in the dtype it was stored in."""
    files = weight_files(directory)
    if not files:
        raise WeightsError(f"{directory}: no {SINGLE_FILE} or {INDEX}")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                out[key] = f.get_tensor(key)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    table: dict[str, Any] = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of bf16, fp16, fp32") from None
