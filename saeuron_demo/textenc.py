"""A real (tiny) CLIP tokenizer and text encoder for the demo vocabulary.

The tokenizer is an ordinary `transformers.CLIPTokenizer` built from a generated `vocab.json` and
`merges.txt`: the base vocabulary holds every byte character with and without the end-of-word
marker (as CLIP's does, so any text tokenizes), and the merges build each demo word into a single
token. Special tokens follow SD1 (bos <|startoftext|>, eos = pad = unk = <|endoftext|>, length 77),
so ComfyUI's SD1 tokenizer/CLIP classes can load the folder.
"""

from __future__ import annotations

import json
import os
import tempfile

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .dataset import OBJECTS, STYLES

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MAX_LENGTH = 77

EXTRA_WORDS: list[str] = [
    "a", "an", "in", "style", "the", "of", "with", "and", "on",
    "picture", "image", "photo", "painting", "shape", "pattern", "background",
]


def vocabulary_words() -> list[str]:
    """Every word that must be a single token (multi-word style names are split)."""
    words: list[str] = []
    for w in EXTRA_WORDS + OBJECTS + [p for s in STYLES for p in s.split()]:
        if w not in words:
            words.append(w)
    return words


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word (lowest-rank pair first) with the end-of-word marker."""
    parts = list(word[:-1]) + [word[-1] + EOW]
    while len(parts) > 1:
        rank, x, y = min((ranks.get(pair, 1 << 30), *pair) for pair in zip(parts, parts[1:]))
        if rank == 1 << 30:
            break
        out: list[str] = []
        i = 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == x and parts[i + 1] == y:
                out.append(x + y)
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Base byte vocabulary plus merges that turn each word into one token.

    Merges are appended greedily (merge the first two pieces a word still has); an appended
    merge has the highest rank so far and cannot change how already-finished words split.
    """
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + EOW for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for w in words:
            parts = _bpe(w, ranks)
            if len(parts) > 1:
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab_list.append(pair[0] + pair[1])
                changed = True
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def write_tokenizer(folder: str, words: list[str] | None = None) -> CLIPTokenizer:
    """Write vocab.json/merges.txt plus the transformers tokenizer files into folder; return it loaded.

    vocab.json/merges.txt are kept next to tokenizer.json so that slow and fast CLIPTokenizer
    loaders (whatever transformers version ComfyUI runs) can read the folder.
    """
    os.makedirs(folder, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words or vocabulary_words())
    vpath, mpath = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vpath, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(mpath, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    tok = CLIPTokenizer(
        vpath, mpath, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=MAX_LENGTH
    )
    tok.save_pretrained(folder)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, f, indent=2)
    return tok


def build_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    """The demo CLIPTokenizer (files generated in a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        return write_tokenizer(tmp, words)


def load_tokenizer(folder: str) -> CLIPTokenizer:
    """Load a tokenizer folder written by write_tokenizer."""
    return CLIPTokenizer.from_pretrained(folder)


def text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """Tiny CLIP text-encoder config (hidden 64, 2 layers, 4 heads)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        projection_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    """Freshly initialised tiny CLIPTextModel for the tokenizer."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(text_config(tokenizer))


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]):
    """Padded (B, 77) input ids, SD-style."""
    return tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def encode(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str]):
    """(B, 77, 64) last hidden states, as SD1 feeds its UNet."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids).last_hidden_state
