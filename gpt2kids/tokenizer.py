"""GPT-2's byte-level BPE tokenizer: load it, train one, save it in the forms HF reads."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from gpt2kids.atomic_files import atomic_write_text
from gpt2kids.errors import UserError

END_OF_TEXT = "<|endoftext|>"


def _byte_level(model: models.Model) -> HFTokenizer:
    tokenizer = HFTokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


class Tokenizer:
    """A byte-level BPE tokenizer with `<|endoftext|>` as its end-of-text token."""

    def __init__(self, backend: HFTokenizer) -> None:
        self.backend = backend
        eos = backend.token_to_id(END_OF_TEXT)
        if eos is None:
            raise UserError(f"the tokenizer has no {END_OF_TEXT} token; GPT-2 tokenizers need one")
        self.eos_id: int = eos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """A `tokenizer.json`, or a folder holding one or `vocab.json` + `merges.txt`."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls.from_vocab_and_merges(path / "vocab.json", path / "merges.txt")
            else:
                raise UserError(f"{path} holds no tokenizer.json and no vocab.json + merges.txt; "
                                "pass --tokenizer with a tokenizer file or folder")
        if not path.is_file():
            raise UserError(f"tokenizer {path} does not exist; check the path")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as error:  # tokenizers raises plain Exception subclasses for bad files
            raise UserError(f"{path} is not a valid tokenizer.json ({error}); re-export or re-download it") from None

    @classmethod
    def from_json_string(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))

    @classmethod
    def from_vocab_and_merges(cls, vocab: Path, merges: Path) -> Tokenizer:
        try:
            model = models.BPE.from_file(str(vocab), str(merges))
        except Exception as error:
            raise UserError(f"cannot read {vocab} and {merges} as a BPE tokenizer ({error})") from None
        backend = _byte_level(model)
        backend.add_special_tokens([END_OF_TEXT])
        return cls(backend)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE (all 256 bytes in the alphabet, so nothing is ever unknown)."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise UserError(f"--vocab-size {vocab_size} is too small; a byte-level BPE needs at least "
                            f"{len(alphabet) + 1}")
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

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- saving ------------------------------------------------------------------------------

    def save(self, folder: str | Path, model_max_length: int | None = None) -> None:
        """Write `tokenizer.json`, `vocab.json` + `merges.txt` and the small HF side files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.backend.to_str())
        model = json.loads(self.backend.to_str())["model"]
        vocab = model["vocab"]
        merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
        atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
        special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                            "model_max_length": model_max_length or 1024, **special}
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
        atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def tokenizer_files_in(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
