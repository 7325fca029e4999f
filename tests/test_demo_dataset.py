"""Fast checks of the demo data set, tokenizer, text encoder and UNet (no training)."""

from __future__ import annotations

import torch

from saeuron_demo.dataset import OBJECTS, STYLES, all_prompts, generate, make_prompt, to_model_range
from saeuron_demo.textenc import (MAX_LENGTH, build_text_encoder, build_tokenizer, encode, load_tokenizer,
                                       vocabulary_words, write_tokenizer)


def test_generate_is_deterministic_for_a_seed() -> None:
    a = generate(16, seed=3)
    b = generate(16, seed=3)
    c = generate(16, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3] == b[3]
    assert not torch.equal(a[0], c[0])


def test_shapes_and_ranges() -> None:
    imgs, objs, stys, prompts = generate(8, seed=0)
    assert imgs.shape == (8, 3, 32, 32) and imgs.dtype == torch.uint8
    assert objs.shape == stys.shape == (8,) and len(prompts) == 8
    x = to_model_range(imgs)
    assert x.min() >= -1 and x.max() <= 1
    # Images are not flat: every image has an object on a background.
    assert (imgs.float().flatten(1).std(1) > 5).all()


def test_prompts_match_labels() -> None:
    _, objs, stys, prompts = generate(32, seed=1)
    for o, s, p in zip(objs.tolist(), stys.tolist(), prompts):
        assert p == make_prompt(OBJECTS[o], STYLES[s])
        assert OBJECTS[o] in p and STYLES[s] in p
    assert make_prompt("star", "stripes") == "a star in stripes style"
    assert make_prompt("ring", "polka dots") == "a ring in polka dots style"
    assert len(all_prompts()) == len(OBJECTS) * len(STYLES) == 64


def test_explicit_labels() -> None:
    objs = list(range(8))
    stys = list(range(8))[::-1]
    _, o, s, _ = generate(8, seed=2, objects=objs, styles=stys)
    assert o.tolist() == objs and s.tolist() == stys


def test_tokenizer_one_token_per_word(tmp_path) -> None:
    write_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    for w in vocabulary_words():
        ids = tok(w)["input_ids"]
        assert ids == [tok.bos_token_id, ids[1], tok.eos_token_id], w
        assert tok.convert_ids_to_tokens(ids[1]) == w + "</w>"
    assert tok.pad_token_id == tok.eos_token_id
    assert tok("")["input_ids"] == [tok.bos_token_id, tok.eos_token_id]
    ids = tok("a heart in polka dots style", padding="max_length", max_length=MAX_LENGTH)["input_ids"]
    assert len(ids) == MAX_LENGTH and len([i for i in ids if i != tok.eos_token_id]) == 7
    # Words outside the vocabulary still tokenize (into characters) instead of failing.
    assert len(tok("zebra")["input_ids"]) > 3


def test_text_encoder_and_unet_forward() -> None:
    from saeuron_demo.model import build_unet, count_params

    tok = build_tokenizer()
    te = build_text_encoder(tok)
    ctx = encode(te, tok, ["a star in stripes style", ""])
    assert ctx.shape == (2, MAX_LENGTH, 64)

    unet = build_unet()
    assert 1_000_000 < count_params(unet) < 3_000_000
    names = dict(unet.named_modules())
    assert "up_blocks.1.attentions.1" in names and "up_blocks.1.attentions.2" in names
    assert type(unet.up_blocks[1]).__name__ == "CrossAttnUpBlock2D"
    assert all(c % 32 == 0 for c in unet.config.block_out_channels) and unet.config.norm_num_groups == 32
    seen = {}
    hook = names["up_blocks.1.attentions.1"].register_forward_hook(lambda m, i, o: seen.update(shape=o[0].shape))
    with torch.no_grad():
        out = unet(torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
    hook.remove()
    assert out.shape == (2, 3, 32, 32)
    assert seen["shape"] == (2, 64, 8, 8)
