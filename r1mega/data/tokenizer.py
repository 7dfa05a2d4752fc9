"""The tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`, and the embedded default.

`Tokenizer.from_dir` reads a model directory's tokenizer.json (+ tokenizer_config.json for the names of
the EOS/PAD/BOS tokens); `save` writes both so that `transformers.AutoTokenizer` loads the directory.

`build_default_tokenizer` trains, in code and without any download, a small byte-level BPE on text
drawn from the synthetic tasks rendered in the R1-Zero template, with the reflective words. Digits are
pre-tokenized one by one, so every number is a sequence of single-digit tokens (arithmetic stays
learnable). `<|endoftext|>` is EOS and PAD; `<think>`, `</think>`, `<answer>`, `</answer>` are single
tokens but not "special" ones (as in Qwen and DeepSeek tokenizers), so decoding with
`skip_special_tokens=True` keeps them for the format reward. The result is cached under
$R1MEGA_CACHE (default ~/.cache/r1mega), keyed by a hash of its recipe.

Deliberately left out: sentencepiece `tokenizer.model` files (convert them to tokenizer.json first)
and chat templates (templates.py renders text; the saved config carries a ChatML one for transformers).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from r1mega.data.reflection import REFLECTIVE_WORDS

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
DEFAULT_VOCAB_SIZE = 512
# EOS names tried, in order, when a directory's tokenizer_config.json does not name one.
_EOS_CANDIDATES = [EOS, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>"]
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str, pad_token: Optional[str] = None,
                 bos_token: Optional[str] = None, config: Optional[dict[str, Any]] = None, source: str = "<memory>"):
        self.backend, self.source = backend, source
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token or eos_token, bos_token
        self.config = dict(config or {})  # the tokenizer_config.json it came with, kept on save
        for key, token in (("eos_token", self.eos_token), ("pad_token", self.pad_token), ("bos_token", bos_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{source}: {key} {token!r} is not in the vocabulary")

    # ---- encoding
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. `add_special_tokens=True` applies the tokenizer's post-processor (e.g. a
        Llama/DeepSeek BOS): for a whole prompt, never for a continuation."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> Optional[str]:
        return self.backend.id_to_token(index)

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included: the smallest valid embedding size."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.backend.token_to_id(self.pad_token)

    @property
    def bos_token_id(self) -> Optional[int]:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    # ---- files
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory {root} does not exist")
        file = root / "tokenizer.json"
        if not file.is_file():
            hint = " (only a sentencepiece tokenizer.model: convert it to tokenizer.json)" \
                if (root / "tokenizer.model").exists() else ""
            raise FileNotFoundError(f"{file} not found{hint}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # the Rust parser raises a bare Exception
            raise ValueError(f"{file} is not a valid tokenizer.json: {error}") from error
        config_file = root / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{config_file} is not valid JSON: {error}") from error
            if not isinstance(config, dict):
                raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        eos = _token_name(config.get("eos_token")) or next(
            (t for t in _EOS_CANDIDATES if backend.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"{config_file if config_file.is_file() else file}: no eos_token given and none of "
                             f"{_EOS_CANDIDATES} is in the vocabulary")
        source = str(config_file) if config_file.is_file() else str(file)
        return cls(backend, eos, _token_name(config.get("pad_token")), _token_name(config.get("bos_token")),
                   config, source)

    def save(self, directory: str | os.PathLike) -> Path:
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(root / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": 1 << 20, "chat_template": CHATML_JINJA, **self.config,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "bos_token": self.bos_token}
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
        return root


def _token_name(value: Any) -> Optional[str]:
    # tokenizer_config.json holds a token either as a string or as {"content": ..., ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


# ---- the embedded default
# Fixed, not "every registered task": a new task must not silently change the default tokenizer (its
# cache key is the recipe below; change the recipe's version when changing the corpus).
CORPUS_TASKS = ("arithmetic", "countdown")


def _corpus(seed: int = 0) -> Iterator[str]:
    """Training text for the default BPE: templated task questions with worked demonstrations."""
    from r1mega.data.tasks import demonstration, generate
    from r1mega.data.templates import render_chatml, render_r1_zero

    rng = random.Random(seed)
    for i in range(3000):
        task = CORPUS_TASKS[i % len(CORPUS_TASKS)]
        sample = generate(task, rng, difficulty=1 + i % 4)
        yield render_r1_zero(sample["prompt"]) + " " + demonstration(sample, rng, wrong_rate=0.3, bad_format_rate=0.1)
        if i % 10 == 0:
            yield render_chatml([{"role": "user", "content": sample["prompt"]}], add_generation_prompt=True)
    words = list(REFLECTIVE_WORDS) + [w.capitalize() for w in REFLECTIVE_WORDS]
    for _ in range(300):
        yield " ".join(rng.choice(words) for _ in range(8)) + "."


def _default_recipe(vocab_size: int) -> dict[str, Any]:
    return {"version": 1, "vocab_size": vocab_size, "special": SPECIAL_TOKENS, "tags": TAG_TOKENS,
            "tokenizers": tokenizers.__version__}


def train_default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train the default byte-level BPE (no cache). The tags are stripped from the training text and
    added afterwards, so no merge is spent on pieces of them."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(TAG_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)

    def untagged() -> Iterator[str]:
        for text in _corpus():
            for tag in TAG_TOKENS:
                text = text.replace(tag, " ")
            yield text

    backend.train_from_iterator(untagged(), trainer=trainer)
    backend.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
    return Tokenizer(backend, EOS, EOS, None, source="<default tokenizer>")


def cache_dir() -> Path:
    return Path(os.environ.get("R1MEGA_CACHE") or Path.home() / ".cache" / "r1mega")


def build_default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """The default tokenizer, trained once and then loaded from the cache."""
    recipe = json.dumps(_default_recipe(vocab_size), sort_keys=True)
    target = cache_dir() / f"tokenizer-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    if (target / "tokenizer_config.json").is_file():
        return Tokenizer.from_dir(target)
    tokenizer = train_default_tokenizer(vocab_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a concurrent or killed build never leaves a half-written dir.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    tokenizer.save(staging)
    (staging / "recipe.json").write_text(recipe + "\n")
    try:
        staging.rename(target)
    except OSError:  # another process got there first: theirs is the same recipe
        for file in staging.iterdir():
            file.unlink()
        staging.rmdir()
    return Tokenizer.from_dir(target)
