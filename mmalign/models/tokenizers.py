"""Local tokenizers built without a hub download.

`clip_tokenizer` writes a CLIP byte-level BPE restricted to the merges a given word list needs,
taken from the full OpenAI CLIP BPE that ships inside the `open_clip_torch` wheel. For every word
of the list it yields exactly the tokens the full CLIP tokenizer yields (same merge order, fewer
merges); other text falls back to smaller pieces, down to single bytes. The result is a
`transformers.CLIPTokenizer` with `vocab.json` + `merges.txt`, the format every diffusers
pipeline loads.

`byte_level_bpe` trains a small byte-level BPE on a corpus (the tiny VLM tokenizers), and
`t5_tokenizer` one with T5's specials that appends `</s>` (the tiny T5 / UMT5 text encoders).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> dict[int, str]:
    """CLIP's reversible byte → unicode mapping, in CLIP's vocabulary order (256 symbols)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


@lru_cache(maxsize=1)
def _full_merges() -> tuple[tuple[str, str], ...]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("open_clip_torch is required to build the local CLIP tokenizer")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])  # type: ignore[misc]


def _merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one word (already byte-mapped), in the order applied."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return used


def clip_tokenizer(
    words: Iterable[str], directory: str | Path | None = None, model_max_length: int = 77
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer covering `words`: its `vocab.json` and `merges.txt` are written into
    `directory` (kept), or into a temporary folder that is removed once the tokenizer is loaded."""
    merges = _full_merges()
    ranks = {pair: i for i, pair in enumerate(merges)}
    byte_of = _byte_alphabet()
    alphabet = list(byte_of.values())
    needed: set[tuple[str, str]] = set()
    for word in {w.lower() for w in words}:
        needed.update(_merges_used("".join(byte_of[b] for b in word.encode("utf-8")), ranks))
    kept = sorted(needed, key=ranks.__getitem__)
    vocab_list = alphabet + [s + "</w>" for s in alphabet] + ["".join(p) for p in kept] + [_BOS, _EOS]
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="mmalign-tok-") as scratch:
            return _write_clip_tokenizer(Path(scratch), vocab_list, kept, model_max_length)
    return _write_clip_tokenizer(Path(directory), vocab_list, kept, model_max_length)


def _write_clip_tokenizer(
    directory: Path, vocab: list[str], merges: list[tuple[str, str]], model_max_length: int
) -> CLIPTokenizer:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=model_max_length
    )


def byte_level_bpe(
    corpus: Iterable[str], special_tokens: list[str], vocab_size: int, add_prefix_space: bool, repeats: int
) -> Tokenizer:
    """A byte-level BPE trained on `corpus` (each text seen `repeats` times), `special_tokens` first in the vocabulary.

    Any text encodes (the 256 byte symbols are always in the vocabulary); merges follow the corpus.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator([text for text in corpus for _ in range(repeats)], trainer)
    return bpe


def t5_tokenizer(captions: Iterable[str], max_tokens: int, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `captions` with T5's specials (`<pad>` = 0, `</s>` = 1, `<unk>` = 2)."""
    bpe = byte_level_bpe(captions, ["<pad>", "</s>", "<unk>"], vocab_size, add_prefix_space=True, repeats=10)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_tokens
    )
    tokenizer._tokenizer.post_processor = _append_eos(tokenizer)
    return tokenizer


def _append_eos(tokenizer: PreTrainedTokenizerFast) -> TemplateProcessing:
    return TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tokenizer.eos_token_id)])
