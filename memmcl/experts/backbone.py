"""Backbone loading: one function, `load_backbone`, for every model a user can name.

A name resolves to a local directory that holds an HF causal LM and its tokenizer:
- an existing directory is used as it is;
- a registered name (`tiny`, ...) is built once into a cache directory and then loaded from there, so the tests run
  the same `from_pretrained` code as a user's own model;
- any other string is handed to `from_pretrained` as a hub name, which works only where the model is already in
  the local HF cache (`HF_HUB_OFFLINE=1` is honoured; nothing is fetched by this project).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from memmcl.experts.backbone_cache import BackboneError, cache_root
from memmcl.rundir import atomic_save_dir

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TinyBackboneConfig:
    """A small Llama-architecture causal LM and a byte-level BPE tokenizer trained offline on a corpus."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 320
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    # A frozen *random* network gives a LoRA adapter nothing stable to read (measured: the loss stalls above the
    # label prior), so the tiny base is a real LM: a short causal-LM pretraining on the unlabelled corpus.
    pretrain_steps: int = 400
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    seed: int = 0


SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(corpus: Iterable[str], vocab_size: int, max_length: int):
    """Returns a byte-level BPE `PreTrainedTokenizerFast` trained on `corpus` (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus)
    if not texts:
        raise BackboneError("tiny backbone: the tokenizer corpus is empty; expected at least one text")
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **SPECIAL_TOKENS)


def build_tiny_backbone(out_dir: str | Path, config: TinyBackboneConfig, corpus: Iterable[str]) -> Path:
    """Builds a tiny Llama model and tokenizer from `config`, saves both with `save_pretrained`; returns `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = list(corpus)
    tokenizer = train_tokenizer(texts, config.vocab_size, config.max_position_embeddings)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),  # BPE on a small corpus can stop below the requested size
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(model_config)
        pretrain_causal_lm(model, tokenizer, texts, config)
    out_dir = Path(out_dir)
    atomic_save_dir(out_dir, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return out_dir


def pretrain_causal_lm(model, tokenizer, texts: list[str], config: TinyBackboneConfig) -> None:
    """Trains `model` in place as a causal LM on `texts` for `config.pretrain_steps` steps (deterministic, CPU)."""
    if config.pretrain_steps <= 0:
        return
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encoded = [[bos, *ids, eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = torch.randperm(len(encoded))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.pretrain_lr, total_steps=config.pretrain_steps, pct_start=0.1)
    model.train()
    for step in range(config.pretrain_steps):
        idx = [order[(step * config.pretrain_batch_size + k) % len(order)] for k in range(config.pretrain_batch_size)]
        batch = [encoded[i][: config.max_position_embeddings] for i in idx]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(seq)] = torch.tensor(seq)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _tiny_dir(config: TinyBackboneConfig, corpus: list[str]) -> Path:
    key = hashlib.sha256(json.dumps([asdict(config), corpus]).encode()).hexdigest()[:16]
    return cache_root() / "backbones" / f"tiny-{key}"


def resolve_tiny(config: TinyBackboneConfig | None = None) -> Path:
    """Returns the cache directory of the default tiny backbone, trained on the embedded task suite; builds it once."""
    from memmcl.tasks.corpus import embedded_corpus

    config = config or TinyBackboneConfig()
    corpus = embedded_corpus()
    path = _tiny_dir(config, corpus)
    if not (path / "config.json").exists():
        build_tiny_backbone(path, config, corpus)
    return path


def _smollm2() -> Path:
    from memmcl.experts.gguf_backbones import resolve_smollm2

    return resolve_smollm2()


# Registered backbone names -> a function that returns a local directory with model + tokenizer.
BACKBONES: dict[str, Callable[[], Path]] = {"tiny": resolve_tiny, "smollm2-135m-instruct": _smollm2}


def resolve_backbone(name_or_path: str) -> str:
    """Returns a local directory for a registered name or an existing path; any other string is returned as is."""
    if name_or_path in BACKBONES:
        return str(BACKBONES[name_or_path]())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BackboneError(f"{path}: expected a directory with a model (config.json) and a tokenizer, got a file")
        if not (path / "config.json").exists():
            raise BackboneError(f"{path}: no config.json; expected a directory written by `save_pretrained`")
        return str(path)
    # A hub name is `name` or `org/name`; anything else is a path that should have existed.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise BackboneError(
            f"{name_or_path}: no such directory; expected a local model directory or one of {sorted(BACKBONES)}"
        )
    return name_or_path


def load_tokenizer(name_or_path: str, padding_side: Literal["left", "right"] = "left"):
    """Returns the tokenizer of a backbone with a pad token set and the given padding side.

    Scoring and training both pad on the left so that every sequence's answer ends at the last position and only
    those last positions need the LM head.
    """
    from transformers import AutoTokenizer

    source = resolve_backbone(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:  # transformers raises OSError/ValueError/KeyError depending on what is missing
        raise BackboneError(f"{source}: cannot build a tokenizer ({type(err).__name__}: {err})") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BackboneError(f"{source}: the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_backbone(name_or_path: str, dtype: Dtype = "float32", padding_side: Literal["left", "right"] = "left"):
    """Returns `(model, tokenizer)`: the causal LM and tokenizer for a registered name, local directory or hub name."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path, padding_side)
    source = resolve_backbone(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto" if dtype == "auto" else _DTYPES[dtype])
    except Exception as err:
        raise BackboneError(f"{source}: cannot load a causal LM ({type(err).__name__}: {err})") from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
