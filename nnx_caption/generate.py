"""Greedy, sampling and beam search, each one jit-compiled `lax.while_loop`.

Semantics are those of transformers 5.x PyTorch `generate()` for encoder-decoders: the same
tokens, the same beam scores. The encoder runs once per image; each layer's cross-attention
K/V are projected once per image and shared by all rows (beams, returned sequences) of that
image; the self-attention cache is preallocated to max_length; nothing returns to the host
until the search is done.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.sharding import place, scalar, to_host

NEG = -1.0e9  # transformers' "never pick this" score offset in beam search


@dataclass(frozen=True)
class Search:
    """What shapes the compiled search: one compile per distinct value (and batch size)."""

    max_length: int
    num_beams: int
    no_repeat_ngram_size: int
    num_return_sequences: int
    do_sample: bool
    start: int
    eos: int
    pad: int


EARLY_STOPPING = {False: 0, True: 1, "never": 2}


def _knobs(
    min_length: int,
    length_penalty: float,
    early_stopping: bool | str,
    temperature: float,
    top_k: int,
    top_p: float,
) -> dict[str, jax.Array]:
    """Settings passed as traced values, so that changing them does not recompile."""
    return dict(
        min_length=jnp.int32(min_length),
        length_penalty=jnp.float32(length_penalty),
        early_stopping=jnp.int32(EARLY_STOPPING[early_stopping]),
        temperature=jnp.float32(temperature),
        top_k=jnp.int32(top_k),
        top_p=jnp.float32(top_p),
    )


class GenerateOutput(NamedTuple):
    sequences: np.ndarray  # (B * num_return_sequences, L) int32, start token first
    scores: np.ndarray  # (B * num_return_sequences,) float32: sequences_scores


def generate(
    model: VisionEncoderDecoder,
    pixel_values: jax.Array,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    min_length: int | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    no_repeat_ngram_size: int | None = None,
    num_return_sequences: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    mesh=None,
) -> GenerateOutput:
    """Captions a batch of (B, H, W, C) normalised images.

    Arguments left None take the checkpoint's generation config (generation_config.json), as
    transformers does; `max_length` counts the start token, `max_new_tokens` wins over it.
    Beam search returns transformers' `sequences_scores`; greedy and sampling return the same
    quantity for their one hypothesis (summed log-probabilities / length ** length_penalty).
    With a `mesh`, images are split over its batch axes (data, fsdp).
    """
    cfg = model.config
    gen = cfg.generation

    def pick(value, default):
        return default if value is None else value

    if max_new_tokens is None and max_length is None:
        max_new_tokens = gen.max_new_tokens
    if max_new_tokens is not None:
        max_length = 1 + max_new_tokens  # the start token is the whole prompt
    search = Search(
        max_length=pick(max_length, gen.max_length),
        num_beams=pick(num_beams, gen.num_beams),
        no_repeat_ngram_size=pick(no_repeat_ngram_size, gen.no_repeat_ngram_size),
        num_return_sequences=pick(num_return_sequences, gen.num_return_sequences),
        do_sample=bool(pick(do_sample, gen.do_sample)),
        start=cfg.decoder_start_token_id,
        eos=cfg.eos_token_id,
        pad=cfg.pad_token_id,
    )
    early_stopping = pick(early_stopping, gen.early_stopping)
    temperature = float(pick(temperature, gen.temperature))
    top_p = float(pick(top_p, gen.top_p))
    _validate(search, cfg.decoder.n_positions, early_stopping, temperature, top_p)
    knobs = _knobs(
        pick(min_length, gen.min_length),
        float(pick(length_penalty, gen.length_penalty)),
        early_stopping,
        temperature,
        int(pick(top_k, gen.top_k) or 0),
        top_p,
    )
    graphdef, state = nnx.split(model)
    pixels = jnp.asarray(pixel_values)
    key = jax.random.key(seed)
    if mesh is None:
        tokens, scores, length = _search(graphdef, state, pixels, key, knobs, search)
    else:
        from jax.sharding import NamedSharding, PartitionSpec

        with jax.set_mesh(mesh):
            batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
            pixels = place(np.asarray(pixels), batch)  # also across hosts
            tokens, scores, length = _search(graphdef, state, pixels, key, knobs, search)
    tokens, scores = to_host(tokens), to_host(scores)  # gathered from every process
    return GenerateOutput(tokens[:, : int(scalar(length))], scores)


def _validate(
    s: Search, n_positions: int, early_stopping, temperature: float, top_p: float
) -> None:
    if s.max_length < 2:
        raise ValueError(f"max_length={s.max_length}: it counts the start token, so use >= 2")
    if s.max_length > n_positions:
        raise ValueError(
            f"max_length={s.max_length} exceeds the decoder's n_positions={n_positions}"
        )
    if s.num_beams < 1 or s.num_return_sequences < 1:
        raise ValueError("num_beams and num_return_sequences must be >= 1")
    if s.num_return_sequences > s.num_beams and not s.do_sample:
        raise ValueError(
            f"num_return_sequences={s.num_return_sequences} needs num_beams >= it "
            "(or do_sample=True), as in transformers"
        )
    if early_stopping not in EARLY_STOPPING:
        raise ValueError(f"early_stopping must be True, False or 'never', not {early_stopping!r}")
    if s.do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@functools.partial(jax.jit, static_argnums=(0, 5))
def _search(graphdef, state, pixels, key, knobs, s: Search):
    model = nnx.merge(graphdef, state)
    image = model.encode(pixels)
    cross_kv = model.decoder.cross_kv(image)  # one per image, shared by that image's rows
    search = _sample if s.num_beams == 1 else _beam
    return search(model, cross_kv, image.shape[0], key, knobs, s)


# Logits processors: the transformers ones our arguments enable, in their order -------------


def _process(
    scores: jax.Array, tokens: jax.Array, cur_len: jax.Array, knobs: dict, s: Search
) -> jax.Array:
    """scores (N, V) for the token at position cur_len; tokens (N, L) hold positions < cur_len."""
    # MinLengthLogitsProcessor: no EOS while the sequence (start token counted) is too short.
    early = cur_len < knobs["min_length"]
    scores = scores.at[:, s.eos].set(jnp.where(early, -jnp.inf, scores[:, s.eos]))
    if s.no_repeat_ngram_size > 0:
        banned = _banned_ngrams(tokens, cur_len, s.no_repeat_ngram_size, scores.shape[1])
        scores = jnp.where(banned, -jnp.inf, scores)
    return scores


def _banned_ngrams(tokens: jax.Array, cur_len: jax.Array, n: int, vocab: int) -> jax.Array:
    """(N, V) mask of tokens that would repeat an n-gram already in tokens[:, :cur_len]
    (NoRepeatNGramLogitsProcessor)."""
    rows, length = tokens.shape
    starts = jnp.arange(length - n + 1)  # n-gram windows tokens[i : i + n]
    prefix = (
        jax.lax.dynamic_slice_in_dim(tokens, cur_len - (n - 1), n - 1, axis=1)
        if n > 1
        else tokens[:, :0]
    )
    windows = tokens[:, starts[:, None] + jnp.arange(n)]  # (N, W, n)
    match = jnp.all(windows[:, :, : n - 1] == prefix[:, None, :], axis=-1)
    match &= (starts + n <= cur_len)[None, :]  # the whole window lies in the generated prefix
    banned = jnp.zeros((rows, vocab), bool)
    return banned.at[jnp.arange(rows)[:, None], windows[:, :, n - 1]].max(match)


def _warp(scores: jax.Array, knobs: dict) -> jax.Array:
    """Temperature, top-k and top-p warpers, as transformers applies them when sampling
    (top_k 0 and top_p 1 switch theirs off)."""
    scores = scores / knobs["temperature"]
    rows, vocab = scores.shape
    top_k, top_p = knobs["top_k"], knobs["top_p"]
    order = jnp.argsort(scores, axis=-1)  # ascending, as TopPLogitsWarper sorts
    ascending = jnp.take_along_axis(scores, order, axis=-1)
    kth = ascending[:, jnp.clip(vocab - top_k, 0, vocab - 1)][:, None]
    scores = jnp.where((top_k > 0) & (scores < kth), -jnp.inf, scores)
    ascending = jnp.where((top_k > 0) & (ascending < kth), -jnp.inf, ascending)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = (cumulative <= 1 - top_p).at[:, -1].set(False)  # keep at least one
    remove = jnp.zeros_like(remove).at[jnp.arange(rows)[:, None], order].set(remove)
    return jnp.where((top_p < 1) & remove, -jnp.inf, scores)


def _step(model, tokens, cur_len, cache, cross_kv):
    """Logits (N, V) float32 for position cur_len, feeding the token at cur_len - 1."""
    last = jax.lax.dynamic_slice_in_dim(tokens, cur_len - 1, 1, axis=1)
    logits, cache = model.decoder(last, cross_kv=cross_kv, cache=cache, start=cur_len - 1)
    return logits[:, 0].astype(jnp.float32), cache


# Greedy and sampling ------------------------------------------------------------------------


def _sample(model, cross_kv, images: int, key, knobs: dict, s: Search):
    rows = images * s.num_return_sequences  # image-major: row = image * n + k
    tokens = jnp.full((rows, s.max_length), s.pad, jnp.int32).at[:, 0].set(s.start)
    carry = dict(
        tokens=tokens,
        cur_len=jnp.int32(1),
        unfinished=jnp.ones(rows, bool),
        logprob=jnp.zeros(rows, jnp.float32),
        length=jnp.zeros(rows, jnp.int32),
        cache=model.decoder.init_cache(rows, s.max_length),
        key=key,
    )

    def cond(c):
        return (c["cur_len"] < s.max_length) & jnp.any(c["unfinished"])

    def body(c):
        logits, cache = _step(model, c["tokens"], c["cur_len"], c["cache"], cross_kv)
        scores = _process(logits, c["tokens"], c["cur_len"], knobs, s)
        key, sub = jax.random.split(c["key"])
        if s.do_sample:
            next_token = jax.random.categorical(sub, _warp(scores, knobs), axis=-1)
        else:
            next_token = jnp.argmax(scores, axis=-1)
        next_token = jnp.where(c["unfinished"], next_token, s.pad).astype(jnp.int32)
        token_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), next_token[:, None], 1)
        live = c["unfinished"]
        return dict(
            tokens=c["tokens"].at[:, c["cur_len"]].set(next_token),
            cur_len=c["cur_len"] + 1,
            unfinished=live & (next_token != s.eos),
            logprob=c["logprob"] + jnp.where(live, token_logprob[:, 0], 0.0),
            length=c["length"] + live,
            cache=cache,
            key=key,
        )

    c = jax.lax.while_loop(cond, body, carry)
    scores = c["logprob"] / c["length"].astype(jnp.float32) ** knobs["length_penalty"]
    return c["tokens"], scores, c["cur_len"]


# Beam search (transformers' vectorised _beam_search) ---------------------------------------


def _beam(model, cross_kv, batch: int, key, knobs: dict, s: Search):
    k, length = s.num_beams, s.max_length
    penalty, stop_early = knobs["length_penalty"], knobs["early_stopping"] == 1
    never = knobs["early_stopping"] == 2
    keep = 2 * k  # candidates kept per step: max(2, 1 + n_eos) * num_beams with one EOS id
    # transformers fills unused positions with `pad or eos`: a pad id of 0 gives EOS.
    fill = s.pad if s.pad != 0 else s.eos
    running = jnp.full((batch, k, length), fill, jnp.int32).at[:, :, 0].set(s.start)
    carry = dict(
        running=running,
        running_scores=jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(NEG),
        sequences=running,
        scores=jnp.full((batch, k), NEG, jnp.float32),
        lengths=jnp.zeros((batch, k), jnp.int32),  # generated tokens of each finished beam
        finished=jnp.zeros((batch, k), bool),
        improvable=jnp.ones((batch, 1), bool),
        go_on=jnp.bool_(True),
        cur_len=jnp.int32(1),
        cache=None,  # made by the first step
        key=key,
    )
    top_k_mask = jnp.arange(keep) < k

    def gather(x, idx):  # x (B, beams, ...), idx (B, n) -> (B, n, ...)
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def body(c, first=False):
        cur_len = c["cur_len"]
        flat = c["running"].reshape(batch * k, length)
        if first:
            # Every beam of an image still holds only the start token: run one row per image
            # and give its logits and cache to the image's beams (a quarter of the step at k=4).
            cache = model.decoder.init_cache(batch, length)
            logits, cache = _step(model, flat[::k], cur_len, cache, cross_kv)
            logits = jnp.repeat(logits, k, axis=0)
            cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
        else:
            logits, cache = _step(model, flat, cur_len, c["cache"], cross_kv)
        log_probs = _process(jax.nn.log_softmax(logits, axis=-1), flat, cur_len, knobs, s)
        key, sub = jax.random.split(c["key"])
        if s.do_sample:
            log_probs = _warp(log_probs, knobs)
        vocab = log_probs.shape[-1]
        acc = (log_probs.reshape(batch, k, vocab) + c["running_scores"][:, :, None]).reshape(
            batch, k * vocab
        )
        if s.do_sample:  # sampling without replacement: Gumbel top-k, then by score
            noisy = acc + jax.random.gumbel(sub, acc.shape)
            idx = jax.lax.top_k(noisy, keep)[1]
            cand = jnp.take_along_axis(acc, idx, axis=1)
            order = jnp.argsort(-cand, axis=1, stable=True)
            cand, idx = jnp.take_along_axis(cand, order, 1), jnp.take_along_axis(idx, order, 1)
        else:
            cand, idx = jax.lax.top_k(acc, keep)
        source, token = idx // vocab, (idx % vocab).astype(jnp.int32)
        cand_seqs = gather(c["running"], source).at[:, :, cur_len].set(token)
        hits = (token == s.eos) | (cur_len + 1 >= length)

        # The best num_beams candidates that did not just finish keep running.
        run_scores = cand + hits.astype(jnp.float32) * NEG
        chosen = jax.lax.top_k(run_scores, k)[1]
        running, running_scores = gather(cand_seqs, chosen), gather(run_scores, chosen)
        parent = (gather(source, chosen) + jnp.arange(batch)[:, None] * k).reshape(-1)
        cache = jax.tree.map(lambda x: x[parent], cache)  # reorder the self-attention cache

        # Candidates among the top num_beams that finished join the finished beams if better.
        done = hits & top_k_mask[None, :]
        final = cand / (cur_len.astype(jnp.float32) ** penalty)
        full = jnp.all(c["finished"], axis=-1, keepdims=True) & stop_early
        final = final + full.astype(jnp.float32) * NEG
        final = final + (~c["improvable"]).astype(jnp.float32) * NEG
        final = final + (~done).astype(jnp.float32) * NEG
        merged_scores = jnp.concatenate([c["scores"], final], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        sequences = gather(jnp.concatenate([c["sequences"], cand_seqs], axis=1), best)
        scores = gather(merged_scores, best)
        lengths = gather(jnp.concatenate([c["lengths"], jnp.where(done, cur_len, 0)], axis=1), best)
        finished = gather(jnp.concatenate([c["finished"], done], axis=1), best)

        # Can a running beam still beat the worst finished one? (_check_early_stop_heuristic)
        cur_len = cur_len + 1
        best_len = jnp.where(never & (penalty > 0), length - 1, cur_len - 1)
        best_running = running_scores[:, :1] / best_len.astype(jnp.float32) ** penalty
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        improvable = c["improvable"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
        go_on = jnp.any(improvable) & ~(jnp.all(finished) & stop_early) & ~jnp.all(hits)
        return dict(
            running=running,
            running_scores=running_scores,
            sequences=sequences,
            scores=scores,
            lengths=lengths,
            finished=finished,
            improvable=improvable,
            go_on=go_on,
            cur_len=cur_len,
            cache=cache,
            key=key,
        )

    carry = body(carry, first=True)  # the loop's first step (max_length >= 2), on fewer rows
    c = jax.lax.while_loop(lambda c: c["go_on"] & (c["cur_len"] < length), body, carry)
    n = s.num_return_sequences
    sequences = c["sequences"][:, :n].reshape(batch * n, length)
    out_len = 1 + jnp.max(c["lengths"][:, :n])
    return sequences, c["scores"][:, :n].reshape(-1), out_len


__all__ = ["GenerateOutput", "generate"]
