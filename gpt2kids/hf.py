"""Hugging Face <-> gpt2kids: read any GPT-2 checkpoint (hub id, HF folder, run folder), write HF-format folders.

HF's GPT-2 uses Conv1D layers that store weights as (in, out); `nn.Linear` stores (out, in). The
four such weights (CONV1D_WEIGHTS) are transposed on the way in and on the way out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from gpt2kids.atomic_files import describe_os_error, replace_folder
from gpt2kids.config import GPT2Config
from gpt2kids.errors import UserError, warn
from gpt2kids.model import GPT2, TIED_WEIGHT
from gpt2kids.tokenizer import Tokenizer, tokenizer_files_in

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
STALE_BUFFERS = (".attn.bias", ".attn.masked_bias")  # the dot keeps c_attn.bias out
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
OFFLINE_DEMO = ("with no network, the CPU demo needs no download: python train.py --init scratch --model-size tiny "
                "--epochs 1 --lr 1e-3 --out runs/demo, then python generate.py --model runs/demo \"Pada suatu hari\"")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RUN_EXPORTS = ("best", "final")  # the exports in a gpt2kids run folder, in the order `run_export` takes them


# --- finding a checkpoint -------------------------------------------------------------------------

def weights_file(folder: Path) -> Path | None:
    """The file `read_weights` reads in `folder` (the first of WEIGHT_FILES there), or None."""
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def has_weights(folder: Path) -> bool:
    return weights_file(folder) is not None


def hub_offline() -> str | None:
    """The variable that sets the hub offline here (HF_HUB_OFFLINE, or transformers' TRANSFORMERS_OFFLINE), if any.

    Read at each call: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    """
    return next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if os.environ.get(name, "").lower() in ("1", "true", "yes", "on")), None)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The hub cache's snapshot of `repo_id` (its main branch), if it holds a config and weights."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an unreadable cache is the same as none
        return None
    if not isinstance(config, str):  # None, or the marker of a file known to be missing
        return None
    folder = Path(config).parent
    return folder if has_weights(folder) else None


def _download(repo_id: str) -> Path:
    """Fetch a hub model's config, tokenizer and weights (safetensors if it has them) into the cache.

    Offline (`hub_offline`, or no network) the cached snapshot is used as it is.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with tokenizers
        raise UserError("huggingface_hub is not installed; pip install huggingface_hub, "
                        "or pass a local folder") from None
    side_files = ["config.json", "generation_config.json", "tokenizer.json", "vocab.json", "merges.txt",
                  "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
    offline_switch = hub_offline()
    offline = offline_switch is not None
    try:
        for weights in (["model*.safetensors", "model.safetensors.index.json"],
                        ["pytorch_model*.bin", "pytorch_model.bin.index.json"]):
            folder = Path(snapshot_download(repo_id, local_files_only=offline, allow_patterns=[*side_files, *weights]))
            if has_weights(folder):
                break
    except Exception as error:  # huggingface_hub raises many classes; all mean "could not get it"
        # The hub could not be asked, or the cache's file listing names files this cache never fetched
        # (e.g. weights in a format not chosen here): a cached config and weights are enough.
        cached = _cached_snapshot(repo_id)
        if cached is not None:
            return cached
        if offline:
            raise UserError(f"{repo_id!r} is not a local path and is not in the hub cache, and the hub is "
                            f"offline ({offline_switch}=1); download it once while online, or pass a local "
                            f"folder; {OFFLINE_DEMO}") from None
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face "
                        f"hub ({reason}); check the id, your network, or pass a local folder; "
                        f"{OFFLINE_DEMO}") from None
    return folder


def run_export(folder: Path) -> Path | None:
    """The export a gpt2kids run folder means, in every command: best/ (the lowest held-out loss), else final/;
    None when it holds neither."""
    return next((folder / name for name in RUN_EXPORTS if (folder / name / "config.json").is_file()), None)


def resolve(spec: str | Path) -> Path:
    """The local folder holding the model `spec` names (downloading a hub id if needed)."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.name in WEIGHT_FILES or path.suffix in (".safetensors", ".bin"):
            chosen = weights_file(path.parent)
            if chosen is not None and chosen.name == path.name:
                return path.parent
            # Loading goes by folder: the folder's own weights file would load in place of the one named.
            loads = f"its folder's model is {chosen.name}" if chosen else "its folder holds no model.safetensors"
            raise UserError(f"{path} is not the weights file gpt2kids loads ({loads}); to load it, put it in a "
                            "folder of its own as model.safetensors (pytorch_model.bin for a .bin) beside its "
                            "config.json")
        raise UserError(f"{path} is a file but not a model; pass a model folder or a hub id")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        export = run_export(path)
        if export is not None:
            return export
        raise UserError(f"{path} holds no config.json, and no best/ or final/ export; "
                        "pass an HF model folder, a gpt2kids run folder, or a hub id")
    # owner/name is a hub id, unless a local folder named `owner` says it is a mistyped path (runs/my-rnu).
    if HUB_ID.match(str(spec)) and not str(spec).startswith(("./", "../", "~")) and not path.parent.is_dir():
        return _download(str(spec))
    raise UserError(f"{spec} does not exist; pass an existing folder or a hub id like owner/name")


# --- reading weights ------------------------------------------------------------------------------

def load_plain_pickle(path: Path) -> Any:
    """torch.load with `weights_only`: tensors and plain containers only, a pickle that would run code is refused
    (`refused_global` tells that refusal from other failures). torch's warnings about pickle protocols, which
    come before a refusal, are not shown: the caller says it in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def refused_global(error: BaseException) -> str | None:
    """The function or class a `weights_only` load refused to import (code the pickle would run), if that is why
    `error` was raised; None for a file that is not a pickle of tensors (or one torch's safe unpickler cannot
    read far enough to tell: it reads protocol 2)."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    # torch words it "Unsupported global: GLOBAL print was not ..." or, for a module it blocks (os, posix),
    # "unsupported GLOBAL posix.system whose module ..."; the rest of its text says how to allow it: left out.
    found = re.search(r"unsupported global:?\s+(?:global\s+)?(\S+)", str(error), flags=re.IGNORECASE)
    return found.group(1) if found else None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_plain_pickle(path)
    except Exception as error:
        unpickling = isinstance(error, pickle.UnpicklingError)
        refused = refused_global(error)
        if refused:
            raise UserError(f"{path} is not a plain weights file: it asks to run code when unpickled ({refused}), "
                            "which gpt2kids refuses; convert it to safetensors in a trusted place") from None
        # Not a refusal: the bytes are not a pickle of tensors (torch's unpickling message only says it refused).
        detail = "" if unpickling else f" ({error})"
        raise UserError(f"{path} cannot be read as a PyTorch weights file{detail}; it may be truncated or damaged, "
                        "re-download or re-export it") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        # Copied out of the file's memory map: a tensor adopted straight from it keeps the whole map,
        # and every page read from it (the transposed weights' too), resident as long as the model lives.
        return {name: tensor.clone() for name, tensor in load_file(path).items()}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is damaged or truncated ({error}); re-download or re-export it") from None


def _load_sharded(index: Path, load_shard: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{index} is not a valid shard index ({error})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise UserError(f"{index} is not a valid shard index (its weight_map must map names to shard files)")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise UserError(f"shard {shard_path} named in {index.name} is missing; re-download the model")
        state.update(load_shard(shard_path))
    return state


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The raw state dict stored in an HF folder, safetensors preferred."""
    path = weights_file(folder)
    if path is not None:
        load = _load_safetensors if path.name.startswith("model.safetensors") else _load_bin
        return _load_sharded(path, load) if path.name.endswith(".index.json") else load(path)
    raise UserError(f"{folder} holds no weights (model.safetensors, a sharded index or pytorch_model.bin); "
                    "pass a folder with a complete checkpoint")


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: GPT2Config) -> dict[str, torch.Tensor]:
    """HF GPT-2 keys and layout -> gpt2kids state dict (checked against `config`)."""
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if key.endswith(STALE_BUFFERS) or key == TIED_WEIGHT:
            continue  # causal-mask buffers of old saves; lm_head is tied to wte
        if not key.startswith("transformer."):
            key = "transformer." + key  # the original OpenAI upload has no prefix
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t().contiguous()  # a parameter, not a strided view of the file's tensor
        ours[key] = tensor
    expected = {key: tuple(value.shape) for key, value in empty_model(config).untied_state_dict().items()}
    differences = {"missing": sorted(set(expected) - set(ours)), "unexpected": sorted(set(ours) - set(expected))}
    parts = [f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
             for label, keys in differences.items() if keys]
    if parts:
        raise UserError(f"the weights do not match a GPT-2 model ({'; '.join(parts)})")
    for key, shape in expected.items():
        if tuple(ours[key].shape) != shape:
            raise UserError(f"weight {key} has shape {tuple(ours[key].shape)} but config.json implies {shape}; "
                            "the weights and config.json disagree")
    return ours


def to_hf_state_dict(model: GPT2) -> dict[str, torch.Tensor]:
    """gpt2kids state dict -> HF keys and layout, without the tied `lm_head.weight`."""
    if getattr(model, "optimized_for_decoding", False):
        raise UserError("this model's weights were laid out for decoding by optimize_for_decoding and cannot "
                        "be exported; export the model as loaded or trained, before optimize_for_decoding")
    state = {}
    for key, tensor in model.untied_state_dict().items():
        tensor = tensor.detach()
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        state[key] = tensor.contiguous().cpu()
    return state


# --- loading a model ------------------------------------------------------------------------------

class _NoValuesOnMeta(TorchFunctionMode):
    """Skips `normal_` on meta tensors: they hold no values, and PyTorch's meta `normal_` imports
    torch._dynamo the first time it runs, a slow import that nothing else in loading or decoding needs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        if func in (torch.Tensor.normal_, torch.nn.init.normal_) and getattr(tensor, "is_meta", False):
            return tensor
        return func(*args, **kwargs)


def empty_model(config: GPT2Config) -> GPT2:
    """A GPT2 of `config` on the meta device: its names and shapes, no memory and no values (to load into)."""
    with torch.device("meta"), _NoValuesOnMeta():
        return GPT2(config)


def load_model(spec: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32,
               dropout: float | None = None) -> tuple[GPT2, Path]:
    """Build a GPT2 from any checkpoint `resolve` understands; returns the model and its folder.

    `dtype` None keeps the dtype the weights are stored in. `dropout`, when given, replaces the checkpoint's
    dropout rates.
    """
    folder = resolve(spec)
    config = GPT2Config.from_json_file(folder / "config.json")
    if dropout is not None:
        config = config.with_dropout(dropout)
    state = from_hf_state_dict(read_weights(folder), config)
    model = empty_model(config)
    # assign=True adopts the loaded tensors instead of copying into empty ones.
    model.load_untied_state_dict({k: v if dtype is None else v.to(dtype) for k, v in state.items()}, assign=True)
    return model.to(device), folder


def model_eos_ids(folder: Path) -> list[int]:
    """The end ids transformers' `generate` stops at: generation_config.json's, else config.json's (a list
    or one id); the first is the tokenizer's end-of-text token."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path} is not valid JSON ({error}); re-export or re-download the model") from None
        value = settings.get("eos_token_id") if isinstance(settings, dict) else None
        ids = [i for i in (value if isinstance(value, list) else [value])
               if type(i) is int]  # not a JSON true/false, which Python counts as ints
        if ids:
            return ids
    return []


def load_tokenizer(folder: Path) -> Tokenizer:
    """The folder's tokenizer, its end-of-text token being the model's eos_token_id where it can be."""
    if not tokenizer_files_in(folder):
        raise UserError(f"{folder} holds no tokenizer (tokenizer.json or vocab.json + merges.txt); copy the "
                        "model's tokenizer files into it (train.py can also take one with --tokenizer)")
    eos_id = next(iter(model_eos_ids(folder)), None)
    tokenizer = Tokenizer.from_path(folder, eos_id=eos_id)
    declared = tokenizer.special_tokens.get("eos_token")
    if eos_id is not None and tokenizer.eos_id != eos_id:
        warn(f"the model's eos_token_id {eos_id} is not a token of the tokenizer in {folder}; "
             f"using its end-of-text token {tokenizer.eos_token!r} (id {tokenizer.eos_id})")
    elif declared is not None and declared != tokenizer.eos_token:
        why = ("the model's eos_token_id, where transformers' generate stops" if eos_id is not None
               else "the tokenizer lacks it")
        warn(f"{folder}: the tokenizer declares eos_token {declared!r} but ends text with "
             f"{tokenizer.eos_token!r} (id {tokenizer.eos_id}): {why}")
    return tokenizer


# --- writing an HF folder -------------------------------------------------------------------------

def export(model: GPT2, tokenizer: Tokenizer | None, out_dir: str | Path, *,
           card_files: dict[str, str] | None = None, generation: dict[str, object] | None = None) -> None:
    """Write an HF-format folder atomically: the old folder stays whole until the new one is done.

    `card_files` maps names to texts written beside the weights: the model card's README.md and loss.svg.
    `generation` is generation_config.json's content (default: sampling, 100 new tokens, the model's ids).
    """
    config = model.config
    pad_id = None
    if tokenizer is not None:
        # Name the end id the tokenizer ended every training story with, so transformers' generate
        # stops where gpt2kids does.
        config = dataclasses.replace(config, eos_token_id=tokenizer.eos_id)
        pad_id = tokenizer.token_id("pad_token")
    generation = generation or {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                                "pad_token_id": config.eos_token_id if pad_id is None else pad_id,
                                "do_sample": True, "max_new_tokens": 100}

    def fill(folder: Path) -> None:  # a fresh folder, synced and swapped in whole by replace_folder
        save_file(to_hf_state_dict(model), folder / "model.safetensors", metadata={"format": "pt"})
        texts = {"config.json": json.dumps(config.to_hf_dict(), indent=2) + "\n",
                 "generation_config.json": json.dumps(generation, indent=2) + "\n",
                 **(card_files or {})}
        for name, text in texts.items():
            (folder / name).write_text(text, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(folder, model_max_length=config.n_positions)

    try:
        replace_folder(out_dir, fill)
    except OSError as error:  # a full disk, no permission: the half-built folder is gone, the old one stays
        raise UserError(f"{describe_os_error(error, Path(out_dir))}; what was there is left as it was") from None
