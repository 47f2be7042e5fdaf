"""generate() against transformers' PyTorch generate(): identical tokens, equal beam scores."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import build_eos_model

import nnx_caption as nc
from nnx_caption.generate import _search, _warp, search_settings

BOOSTS = {"short": 1.5, "long": 1.0}  # EOS likely early / EOS rarer: beams end at many steps


@pytest.fixture(scope="module", params=list(BOOSTS))
def pair(request, tmp_path_factory):
    """(transformers model, our model, pixels NHWC) for one EOS setting."""
    ref = build_eos_model(BOOSTS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    pixels = np.random.default_rng(1).standard_normal((4, 32, 32, 3), dtype=np.float32)
    return ref, nc.from_pretrained(path), pixels


def reference(ref, pixels, **kw):
    with torch.no_grad():
        out = ref.generate(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
            **kw,
        )
    scores = getattr(out, "sequences_scores", None)
    return out.sequences.numpy(), None if scores is None else scores.numpy()


def check(pair, **kw):
    ref, model, pixels = pair
    want_seq, want_scores = reference(ref, pixels, **kw)
    got = nc.generate(model, jnp.asarray(pixels), **kw)
    np.testing.assert_array_equal(got.sequences, want_seq, err_msg=str(kw))
    if want_scores is not None:
        np.testing.assert_allclose(got.scores, want_scores, atol=1e-4, err_msg=str(kw))
    return got


GRID = list(itertools.product([2, 4, 8], [0.5, 1.0, 2.0], [True, False, "never"]))


@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping"), GRID)
def test_beam_grid(pair, num_beams, length_penalty, early_stopping):
    check(
        pair,
        max_length=12,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_beams // 2,
    )


def test_greedy(pair):
    got = check(pair, max_length=12, num_beams=1)
    assert got.sequences.shape[0] == 4


def test_the_grid_exercises_eos(pair):
    """The checkpoints are such that sequences end at different steps, some at max_length."""
    ref, _, pixels = pair
    seqs, _ = reference(ref, pixels, max_length=12, num_beams=4, num_return_sequences=4)
    ends = [int(np.argmax(row[1:] == 2)) + 1 if 2 in row[1:] else None for row in seqs]
    assert len(set(ends)) >= 2 and any(e is not None for e in ends), ends


@pytest.mark.parametrize("num_beams", [1, 4])
def test_min_length(pair, num_beams):
    check(pair, max_length=12, min_length=7, num_beams=num_beams)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_no_repeat_ngram_size(pair, num_beams):
    for n in (1, 2, 3):
        check(pair, max_length=12, no_repeat_ngram_size=n, num_beams=num_beams)


def test_num_return_sequences_and_max_new_tokens(pair):
    got = check(pair, max_new_tokens=7, num_beams=4, num_return_sequences=3)
    assert got.sequences.shape[0] == 12 and got.sequences.shape[1] <= 8


@pytest.mark.parametrize("num_beams", [1, 3])
def test_max_length_reached_without_eos(pair, num_beams):
    got = check(pair, max_length=10, min_length=10, num_beams=num_beams)
    assert got.sequences.shape[1] == 10 and not (got.sequences[:, 1:] == 2).any()


def test_batch_rows_are_independent(pair):
    _, model, pixels = pair
    batch = nc.generate(model, jnp.asarray(pixels), max_length=12, num_beams=4)
    for i in range(len(pixels)):
        one = nc.generate(model, jnp.asarray(pixels[i : i + 1]), max_length=12, num_beams=4)
        row = batch.sequences[i, : one.sequences.shape[1]]
        np.testing.assert_array_equal(row, one.sequences[0])
        np.testing.assert_allclose(batch.scores[i], one.scores[0], atol=1e-5)


def test_defaults_come_from_generation_config(tmp_path):
    ref = build_eos_model(0.6, pad_token_id=5)
    ref.generation_config.update(
        num_beams=3, max_length=9, length_penalty=2.0, no_repeat_ngram_size=2
    )
    ref.save_pretrained(tmp_path)
    model = nc.from_pretrained(tmp_path)
    pixels = np.random.default_rng(2).standard_normal((2, 32, 32, 3), dtype=np.float32)
    with torch.no_grad():
        want = ref.generate(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(nc.generate(model, jnp.asarray(pixels)).sequences, want.numpy())


def test_cached_decode_equals_uncached_forward(pair):
    """Token-by-token logits through the KV cache equal the full causal forward pass."""
    _, model, pixels = pair
    ids = np.random.default_rng(3).integers(0, 60, (4, 9)).astype(np.int32)
    full = model(jnp.asarray(pixels), jnp.asarray(ids))
    dec = model.decoder
    cross_kv = dec.cross_kv(model.encode(jnp.asarray(pixels)))
    cache = dec.init_cache(4, 12)
    for t in range(ids.shape[1]):
        step, cache = dec(jnp.asarray(ids[:, t : t + 1]), cross_kv=cross_kv, cache=cache, start=t)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5, err_msg=f"step {t}")


def test_cross_kv_shared_by_beams(pair):
    """Rows of one image read one K/V: logits of image-major rows equal per-row copies."""
    _, model, pixels = pair
    dec = model.decoder
    image = model.encode(jnp.asarray(pixels[:2]))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 60, (6, 5)), jnp.int32)
    shared, _ = dec(ids, cross_kv=dec.cross_kv(image), cache=dec.init_cache(6, 5))
    copied, _ = dec(ids, jnp.repeat(image, 3, axis=0))
    np.testing.assert_allclose(shared, copied, atol=1e-5)


def test_compiles_once_per_shape(pair):
    _, model, pixels = pair
    px = jnp.asarray(pixels[:3])
    _search.clear_cache()
    nc.generate(model, px, max_length=11, num_beams=4)
    before = _search._cache_size()
    assert before == 1
    for lp, es, minimum in ((0.5, True, 0), (2.0, "never", 5), (1.0, False, 3)):
        nc.generate(
            model,
            px,
            max_length=11,
            num_beams=4,
            length_penalty=lp,
            early_stopping=es,
            min_length=minimum,
        )
    assert _search._cache_size() == before
    nc.generate(model, px, max_length=11, num_beams=2)
    assert _search._cache_size() == before + 1


def test_sampling_is_reproducible_and_warpers_match_transformers(pair):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    _, model, pixels = pair
    px = jnp.asarray(pixels)
    kw = dict(max_length=12, do_sample=True, top_k=20, top_p=0.9, temperature=1.3)
    a = nc.generate(model, px, seed=0, **kw)
    np.testing.assert_array_equal(a.sequences, nc.generate(model, px, seed=0, **kw).sequences)
    samples = {nc.generate(model, px, seed=s, **kw).sequences.tobytes() for s in range(1, 6)}
    assert len(samples) > 1
    greedy = nc.generate(model, px, max_length=12, num_beams=1)
    top1 = nc.generate(model, px, max_length=12, do_sample=True, top_k=1, seed=7)
    np.testing.assert_array_equal(top1.sequences, greedy.sequences)
    many = nc.generate(model, px, seed=0, num_return_sequences=3, **kw)
    assert many.sequences.shape[0] == 12

    scores = np.random.default_rng(5).standard_normal((6, 60)).astype(np.float32) * 3
    for temperature, top_k, top_p in (
        (1.0, 0, 1.0),
        (0.7, 5, 1.0),
        (1.3, 0, 0.8),
        (1.0, 10, 0.5),
        (2.0, 59, 0.95),
    ):
        want = torch.from_numpy(scores)
        want = TemperatureLogitsWarper(temperature)(None, want)
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1:
            want = TopPLogitsWarper(top_p)(None, want)
        settings = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        knobs = search_settings(model.config, **settings).knobs
        got = _warp(jnp.asarray(scores), knobs)
        np.testing.assert_allclose(
            got, want.numpy(), rtol=1e-6, err_msg=f"{temperature} {top_k} {top_p}"
        )


def test_beam_sampling_is_reproducible(pair):
    _, model, pixels = pair
    kw = dict(max_length=10, num_beams=3, do_sample=True, top_k=0, seed=3)
    a = nc.generate(model, jnp.asarray(pixels), **kw)
    b = nc.generate(model, jnp.asarray(pixels), **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert np.all(np.diff(a.scores.reshape(4, -1), axis=1) <= 0)


def test_bad_arguments_are_refused(pair):
    _, model, pixels = pair
    px = jnp.asarray(pixels)
    for kw, needle in (
        (dict(max_length=1), "max_length"),
        (dict(max_length=99), "n_positions"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
    ):
        with pytest.raises(ValueError, match=needle):
            nc.generate(model, px, **kw)


def _lengths(sequences: np.ndarray, eos: int) -> np.ndarray:
    """Generated tokens of each row, its EOS included (the rest is padding)."""
    generated = sequences[:, 1:]
    hit = generated == eos
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, generated.shape[1])


def test_greedy_cross_attentions_are_transformers(pair):
    """out.cross_attentions: each generated token's cross-attention weights, every layer and
    head, equal to transformers' generate(output_attentions=True); zeros after a row ends."""
    ref, model, pixels = pair
    max_length = 12
    with torch.no_grad():
        want = ref.generate(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            max_length=max_length,
            num_beams=1,
            do_sample=False,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    got = nc.generate(
        model, jnp.asarray(pixels), max_length=max_length, num_beams=1, output_cross_attentions=True
    )
    np.testing.assert_array_equal(got.sequences, want.sequences.numpy())
    cfg = model.config
    image_tokens = cfg.encoder.grid_size**2 + 1
    rows, layers, heads = len(pixels), cfg.decoder.n_layer, cfg.decoder.n_head
    assert got.cross_attentions.shape == (rows, max_length - 1, layers, heads, image_tokens)
    assert got.cross_attentions.dtype == np.float32
    # transformers: per step, per layer (rows, heads, 1, image tokens).
    steps = np.stack(
        [np.stack([w[:, :, -1].numpy() for w in step]) for step in want.cross_attentions]
    )
    steps = steps.transpose(2, 0, 1, 3, 4)  # (rows, steps, layers, heads, image tokens)
    lengths = _lengths(got.sequences, cfg.eos_token_id)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(got.cross_attentions[row, :n], steps[row, :n], atol=1e-5)
        assert not got.cross_attentions[row, n:].any()
    np.testing.assert_allclose(got.cross_attentions[:, :1].sum(-1), 1.0, rtol=1e-5)


def test_beam_cross_attentions_follow_the_returned_beams(pair):
    """For beam search: the weights of the returned sequences, equal to transformers' forward
    pass of those sequences (each beam's own ancestry, not the beam slot's)."""
    ref, model, pixels = pair
    max_length, beams = 12, 4
    got = nc.generate(
        model,
        jnp.asarray(pixels),
        max_length=max_length,
        num_beams=beams,
        num_return_sequences=2,
        output_cross_attentions=True,
    )
    want_seq, _ = reference(
        ref, pixels, max_length=max_length, num_beams=beams, num_return_sequences=2
    )
    np.testing.assert_array_equal(got.sequences, want_seq)
    t = got.sequences.shape[1]
    with torch.no_grad():
        forward = ref(
            pixel_values=torch.from_numpy(np.repeat(pixels, 2, axis=0)).permute(0, 3, 1, 2),
            decoder_input_ids=torch.from_numpy(got.sequences[:, :-1].astype(np.int64)),
            output_attentions=True,
        )
    want = np.stack([w.numpy() for w in forward.cross_attentions], axis=1)  # (N, L, H, T-1, S)
    want = want.transpose(0, 3, 1, 2, 4)  # (N, T - 1, L, H, S)
    lengths = _lengths(got.sequences, model.config.eos_token_id)
    for row, n in enumerate(lengths):
        assert n <= t - 1
        np.testing.assert_allclose(got.cross_attentions[row, :n], want[row, :n], atol=1e-5)
        assert not got.cross_attentions[row, n:].any()
