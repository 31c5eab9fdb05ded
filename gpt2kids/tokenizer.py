"""GPT-2's byte-level BPE tokenizer: load it, train one, save it in the forms HF reads.

A checkpoint's tokenizer is read the way `transformers.AutoTokenizer` reads a GPT-2 folder (side files
included: `read_side_files`), so ids match what the base model was trained on.

The end-of-text token, which ends every training story and stops generation, is chosen in this order:
1. `eos_id` given by the caller: the model's `eos_token_id`, where transformers' `generate` stops
   (`gpt2kids.hf.load_tokenizer` passes it), when it names a token of this tokenizer;
2. the declared `eos_token`, when the vocabulary holds it;
3. `<|endoftext|>`, when the vocabulary holds it (tokenizers trained here always do).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from gpt2kids.atomic_files import atomic_write_text, read_json_object
from gpt2kids.errors import UserError

END_OF_TEXT = "<|endoftext|>"
# The special-token roles transformers' tokenizers know, in its order.
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_class values whose transformers implementation sets the pre-tokenizer's add_prefix_space from
# tokenizer_config.json (default False), whatever tokenizer.json says.
GPT2_CLASSES = (None, "GPT2Tokenizer", "GPT2TokenizerFast")
# tokenizer_class values whose transformers implementation leaves tokenizer.json's add_prefix_space alone.
GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _byte_level(model: models.Model, add_prefix_space: bool = False) -> HFTokenizer:
    tokenizer = HFTokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _token_text(value: object) -> str | None:
    """A special token as the side files write it: a string, or a dict with "content" (an AddedToken)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when there is no such file."""
    return read_json_object(path, "re-export or re-download the tokenizer") or {}


def read_side_files(folder: Path) -> tuple[dict[str, str], bool | None]:
    """The special tokens and the add_prefix_space that a tokenizer folder's side files declare.

    add_prefix_space follows transformers: a GPT-2 tokenizer class (named, or implied by a GPT-2 model's
    config.json) takes it from tokenizer_config.json, default False; None leaves tokenizer.json's in force.
    """
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path)
    declared = {role: _token_text(config.get(role)) for role in SPECIAL_ROLES}
    if "added_tokens_decoder" not in config:
        # transformers lets special_tokens_map.json override the config, except in newer saves
        # (those with added_tokens_decoder), where it reads the config alone.
        mapping = _read_json(folder / "special_tokens_map.json")
        declared.update({role: _token_text(mapping[role]) for role in SPECIAL_ROLES if role in mapping})
    special = {role: token for role, token in declared.items() if token is not None}
    add_prefix_space: bool | None = None
    if config_path.is_file():
        if config.get("tokenizer_class") in GPT2_CLASSES:
            add_prefix_space = bool(config.get("add_prefix_space", False))
        elif "add_prefix_space" in config and config.get("tokenizer_class") not in GENERIC_CLASSES:
            add_prefix_space = bool(config["add_prefix_space"])
    elif _is_gpt2_model_folder(folder):  # AutoTokenizer picks GPT2Tokenizer from the model type
        add_prefix_space = False
    return special, add_prefix_space


def added_tokens_of(folder: Path) -> dict[int, tuple[str, bool]]:
    """{id: (token, special)} of the tokens a vocab.json + merges.txt save added past its vocabulary: older
    transformers wrote them to added_tokens.json, newer ones to tokenizer_config.json's added_tokens_decoder."""
    added = {token_id: (content, False) for content, token_id in _read_json(folder / "added_tokens.json").items()
             if type(token_id) is int}  # not a JSON true/false, which Python counts as ints
    config = _read_json(folder / "tokenizer_config.json")
    for token_id, token in (config.get("added_tokens_decoder") or {}).items():
        content = _token_text(token)
        if content is not None and str(token_id).isdigit():
            added[int(token_id)] = (content, isinstance(token, dict) and bool(token.get("special", False)))
    return added


def check_bpe_vocab_size(vocab_size: int) -> None:
    minimum = 256 + 1  # a byte-level BPE holds every byte, and the end-of-text token
    if vocab_size < minimum:
        raise UserError(f"--vocab-size {vocab_size} is too small; a byte-level BPE needs at least {minimum}")


def _is_gpt2_model_folder(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "gpt2"


def _byte_level_steps(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The ByteLevel steps of a tokenizer.json's pre-tokenizer (itself, or inside a Sequence)."""
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return [step for step in steps if step.get("type") == "ByteLevel"]


def _set_prefix_space(backend: HFTokenizer, add_prefix_space: bool) -> HFTokenizer:
    """The backend with every ByteLevel pre-tokenizer set to `add_prefix_space` (others untouched)."""
    state = json.loads(backend.to_str())
    steps = [step for step in _byte_level_steps(state) if step.get("add_prefix_space") != add_prefix_space]
    for step in steps:
        step["add_prefix_space"] = add_prefix_space
    return HFTokenizer.from_str(json.dumps(state)) if steps else backend


class Tokenizer:
    """A byte-level BPE tokenizer with the special tokens its checkpoint declares.

    `special_tokens` maps roles (`bos_token`, `eos_token`, `unk_token`, `pad_token`, `mask_token`, ...)
    to tokens; they are kept as declared and written back by `save`. `eos_id` is the model's end id,
    preferred when it names a token of this vocabulary (see the module docstring).
    """

    def __init__(self, backend: HFTokenizer, special_tokens: Mapping[str, str] | None = None,
                 eos_id: int | None = None) -> None:
        self.backend = backend
        declared = {role: token for role, token in (special_tokens or {}).items()
                    if role in SPECIAL_ROLES and isinstance(token, str) and token}
        if eos_id is not None and 0 <= eos_id < self.vocab_size and backend.id_to_token(eos_id) is not None:
            chosen = eos_id
        elif "eos_token" in declared and backend.token_to_id(declared["eos_token"]) is not None:
            chosen = backend.token_to_id(declared["eos_token"])
        elif backend.token_to_id(END_OF_TEXT) is not None:
            chosen = backend.token_to_id(END_OF_TEXT)
        else:
            raise UserError("the tokenizer has no end-of-text token: no eos_token in tokenizer_config.json or "
                            f"special_tokens_map.json, no {END_OF_TEXT}, and no eos_token_id in config.json "
                            "that names one of its tokens; declare one of them")
        self.eos_id: int = chosen
        if not declared:  # a bare tokenizer.json: GPT-2's convention, one token for all three roles
            declared = dict.fromkeys(("bos_token", "eos_token", "unk_token"), self.eos_token)
        self.special_tokens: dict[str, str] = declared

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str:
        return self.backend.id_to_token(self.eos_id)

    @property
    def add_prefix_space(self) -> bool:
        """Whether encoding puts a space before the text (the ByteLevel pre-tokenizer's setting)."""
        return any(step.get("add_prefix_space", False) for step in _byte_level_steps(json.loads(self.backend.to_str())))

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path, eos_id: int | None = None) -> Tokenizer:
        """A `tokenizer.json`, or a folder holding one or `vocab.json` + `merges.txt`.

        The side files (`tokenizer_config.json`, `special_tokens_map.json`) next to it are read too.
        """
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                special, add_prefix_space = read_side_files(path)
                return cls.from_vocab_and_merges(path / "vocab.json", path / "merges.txt", special,
                                                 bool(add_prefix_space), eos_id, added_tokens_of(path))
            else:
                raise UserError(f"{path} holds no tokenizer.json and no vocab.json + merges.txt; "
                                "pass --tokenizer with a tokenizer file or folder")
        if not path.is_file():
            raise UserError(f"tokenizer {path} does not exist; check the path")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises plain Exception subclasses for bad files
            raise UserError(f"{path} is not a valid tokenizer.json ({error}); re-export or re-download it") from None
        special, add_prefix_space = read_side_files(path.parent)
        if add_prefix_space is not None:
            backend = _set_prefix_space(backend, add_prefix_space)
        # Declared specials the vocabulary holds are matched whole, as transformers does; those tokenizer.json
        # already adds keep its flags (RoBERTa's "<mask>" takes the space before it: lstrip).
        added = {token.content for token in backend.get_added_tokens_decoder().values()}
        present = [token for token in special.values() if backend.token_to_id(token) is not None and token not in added]
        if present:
            backend.add_special_tokens(sorted(set(present)))
        return cls(backend, special, eos_id)

    @classmethod
    def from_json_string(cls, text: str, special_tokens: Mapping[str, str] | None = None,
                         eos_id: int | None = None) -> Tokenizer:
        return cls(HFTokenizer.from_str(text), special_tokens, eos_id)

    @classmethod
    def from_vocab_and_merges(cls, vocab: Path, merges: Path, special_tokens: Mapping[str, str] | None = None,
                              add_prefix_space: bool = False, eos_id: int | None = None,
                              added_tokens: Mapping[int, tuple[str, bool]] | None = None) -> Tokenizer:
        """GPT-2's two original files, with the tokens a save added past them (`added_tokens_of`) at their ids,
        the declared specials, and `<|endoftext|>` in the roles undeclared."""
        try:
            model = models.BPE.from_file(str(vocab), str(merges))
        except Exception as error:
            raise UserError(f"cannot read {vocab} and {merges} as a BPE tokenizer ({error})") from None
        backend = _byte_level(model, add_prefix_space)
        for token_id, (content, special) in sorted((added_tokens or {}).items()):
            if backend.token_to_id(content) == token_id:
                continue
            if token_id != backend.get_vocab_size(with_added_tokens=True):  # tokenizers numbers them in turn
                raise UserError(f"{vocab.parent} gives the added token {content!r} the id {token_id}, which is not "
                                "the next free one; this tokenizer cannot be read as saved")
            backend.add_tokens([AddedToken(content, special=special, normalized=not special)])
        # As transformers' GPT2Tokenizer: `<|endoftext|>` is bos, eos and unk unless declared otherwise, and
        # the specials are added (new ids where the vocabulary lacks them).
        special = {**dict.fromkeys(("bos_token", "eos_token", "unk_token"), END_OF_TEXT), **(special_tokens or {})}
        backend.add_special_tokens(list(dict.fromkeys(special.values())))
        return cls(backend, special, eos_id)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE (all 256 bytes in the alphabet, so nothing is ever unknown)."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        check_bpe_vocab_size(vocab_size)
        backend = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                      initial_alphabet=alphabet, show_progress=False)
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    # --- use ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_id(self, role: str) -> int | None:
        """The id of the token declared for `role` (e.g. "pad_token"), if the vocabulary holds it."""
        token = self.special_tokens.get(role)
        return self.backend.token_to_id(token) if token is not None else None

    # --- saving ------------------------------------------------------------------------------

    def files_special_tokens(self) -> dict[str, str]:
        """The special tokens `save` declares: as loaded, with eos naming `eos_id`'s token where that is a
        special token (declaring an ordinary BPE token special would change how text is split)."""
        special = dict(self.special_tokens)
        added = {token.content for token in self.backend.get_added_tokens_decoder().values()}
        if self.eos_token in added or "eos_token" not in special:
            special["eos_token"] = self.eos_token
        return special

    def save(self, folder: str | Path, model_max_length: int | None = None) -> None:
        """Write `tokenizer.json`, `vocab.json` + `merges.txt` and the small HF side files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.backend.to_str()
        atomic_write_text(folder / "tokenizer.json", state)
        parsed = json.loads(state)
        vocab = dict(parsed["model"]["vocab"])
        for token in parsed.get("added_tokens", []):  # added tokens past the BPE vocabulary, e.g. a late eos
            vocab.setdefault(token["content"], token["id"])
        merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in parsed["model"]["merges"]]
        atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
        special = self.files_special_tokens()
        # tokenizer_config's add_prefix_space overrides tokenizer.json's in transformers: write the real one.
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": self.add_prefix_space,
                            "model_max_length": model_max_length or 1024, **special}
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
        atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def tokenizer_files_in(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
