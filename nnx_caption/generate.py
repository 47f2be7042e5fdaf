"""Greedy, sampling and beam search, each one jit-compiled `lax.while_loop`.

Semantics are those of transformers 5.x PyTorch `generate()` for encoder-decoders: the same
tokens, the same beam scores. The encoder runs once per image; each layer's cross-attention
K/V are projected once per image and shared by all rows (beams, returned sequences) of that
image; the self-attention cache is preallocated to max_length; nothing returns to the host
until the search is done. Shapes use the legend in layers.py, with T = max_length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from nnx_caption.config import CaptionConfig
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.sharding import batch_sharding, place, scalar, to_host

NEG = -1.0e9  # transformers' "never pick this" score offset in beam search
EARLY_STOPPING = {False: 0, True: 1, "never": 2}


@dataclass(frozen=True)
class Search:
    """What shapes the compiled search: one compile per distinct value (and batch size)."""

    max_length: int  # T: counts the start token
    num_beams: int  # K
    no_repeat_ngram_size: int
    num_return_sequences: int
    do_sample: bool
    output_cross_attentions: bool
    start: int  # decoder_start_token_id
    eos: int
    pad: int


@struct.dataclass
class Knobs:
    """Settings passed as traced values, so that changing them does not recompile."""

    min_length: jax.Array  # () int32: no EOS while the sequence (start token counted) is shorter
    length_penalty: jax.Array  # () float32: a score is log-probability / length ** it
    early_stopping: jax.Array  # () int32: EARLY_STOPPING's code of True, False or "never"
    temperature: jax.Array  # () float32: sampling divides the logits by it
    top_k: jax.Array  # () int32: sampling keeps the top_k likeliest tokens (0: all)
    top_p: jax.Array  # () float32: ... and the fewest whose probabilities sum to top_p (1: all)


class Settings(NamedTuple):
    search: Search
    knobs: Knobs


def search_settings(
    config: CaptionConfig,
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
    output_cross_attentions: bool = False,
) -> Settings:
    """generate()'s arguments, those left None taken from the checkpoint's generation config
    (generation_config.json) as transformers does, and checked: a ValueError names the bad one.
    `max_length` counts the start token; `max_new_tokens` wins over it."""
    gen = config.generation

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
        output_cross_attentions=bool(output_cross_attentions),
        start=config.decoder_start_token_id,
        eos=config.eos_token_id,
        pad=config.pad_token_id,
    )
    early_stopping = pick(early_stopping, gen.early_stopping)
    temperature = float(pick(temperature, gen.temperature))
    top_p = float(pick(top_p, gen.top_p))
    _validate(search, config.decoder.max_positions, early_stopping, temperature, top_p)
    knobs = Knobs(
        min_length=jnp.int32(pick(min_length, gen.min_length)),
        length_penalty=jnp.float32(pick(length_penalty, gen.length_penalty)),
        early_stopping=jnp.int32(EARLY_STOPPING[early_stopping]),
        temperature=jnp.float32(temperature),
        top_k=jnp.int32(pick(top_k, gen.top_k) or 0),
        top_p=jnp.float32(top_p),
    )
    return Settings(search, knobs)


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


class GenerateOutput(NamedTuple):
    sequences: np.ndarray  # (B * num_return_sequences, T) int32, start token first
    scores: np.ndarray  # (B * num_return_sequences,) float32: sequences_scores
    # With output_cross_attentions: (B * num_return_sequences, max_length - 1, L, H, S) float32,
    # the cross-attention weights of each generated token's step (zeros after its row's end).
    cross_attentions: np.ndarray | None = None


def generate(
    model: VisionEncoderDecoder,
    pixel_values: jax.Array,
    *,
    seed: int = 0,
    mesh=None,
    **arguments: Any,
) -> GenerateOutput:
    """Captions a batch of (B, height, width, C) normalised images.

    `arguments` are search_settings' (max_length, max_new_tokens, min_length, num_beams,
    length_penalty, early_stopping, no_repeat_ngram_size, num_return_sequences, do_sample,
    temperature, top_k, top_p), those not given taken from the checkpoint's generation config,
    and output_cross_attentions (default False), which also returns `cross_attentions`.
    Beam search returns transformers' `sequences_scores`; greedy and sampling return the same
    quantity for their one hypothesis (summed log-probabilities / length ** length_penalty).
    `seed` seeds sampling. With a `mesh`, images are split over its batch axes
    (sharding.batch_sharding): a host array is the whole batch, each process putting its
    shards; a jax.Array already split that way is taken as it is (e.g. one that Trainer.put
    assembled from each process's rows).
    """
    search, knobs = search_settings(model.config, **arguments)
    graphdef, state = nnx.split(model)
    pixels = pixel_values
    key = jax.random.key(seed)
    if mesh is None:
        pixels = jnp.asarray(pixels)
        tokens, scores, length, weights = _search(graphdef, state, pixels, key, knobs, search)
    else:
        with jax.set_mesh(mesh):
            split = batch_sharding(mesh)
            placed = isinstance(pixels, jax.Array) and pixels.sharding.is_equivalent_to(split, 4)
            if not placed:  # (a placed one: Trainer.put's, assembled from each process's rows)
                pixels = place(np.asarray(pixels), split)  # also across hosts
            tokens, scores, length, weights = _search(graphdef, state, pixels, key, knobs, search)
    tokens, scores = to_host(tokens), to_host(scores)  # gathered from every process
    weights = None if weights is None else to_host(weights)
    return GenerateOutput(tokens[:, : int(scalar(length))], scores, weights)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _search(graphdef, state, pixels, key, knobs: Knobs, s: Search):
    """(sequences (N, T), scores (N,), the longest row's length (start token counted),
    cross-attention weights (N, T - 1, L, H, S) or None)."""
    model = nnx.merge(graphdef, state)
    image = model.encode(pixels)  # (B, S, E)
    cross_kv = model.decoder.cross_kv(image)  # one per image, shared by that image's rows
    search = _sample if s.num_beams == 1 else _beam
    tokens, scores, lengths = search(model, cross_kv, image.shape[0], key, knobs, s)  # (N,)s
    length = 1 + jnp.max(lengths)  # each row ends at its EOS or at max_length
    if not s.output_cross_attentions:
        return tokens, scores, length, None
    # The returned sequences read once more, as in training: position t's query is the step
    # that chose token t + 1, whatever beam it was on then, so a beam's weights follow its
    # ancestry. Causal attention makes each position's weights those of the search's step.
    weights = model.decoder.cross_attention_weights(tokens[:, :-1], cross_kv=cross_kv)
    ended = jnp.arange(s.max_length - 1)[None, :] >= lengths[:, None]  # (N, T - 1)
    return tokens, scores, length, jnp.where(ended[:, :, None, None, None], 0.0, weights)


# Logits processors: the transformers ones our arguments enable, in their order -------------


def _process(
    scores: jax.Array, tokens: jax.Array, cur_len: jax.Array, knobs: Knobs, s: Search
) -> jax.Array:
    """scores (N, V) for the token at position cur_len; tokens (N, T) hold positions < cur_len."""
    # MinLengthLogitsProcessor: no EOS while the sequence (start token counted) is too short.
    early = cur_len < knobs.min_length
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
    )  # (N, n - 1)
    windows = tokens[:, starts[:, None] + jnp.arange(n)]  # (N, windows, n)
    match = jnp.all(windows[:, :, : n - 1] == prefix[:, None, :], axis=-1)
    match &= (starts + n <= cur_len)[None, :]  # the whole window lies in the generated prefix
    banned = jnp.zeros((rows, vocab), bool)
    return banned.at[jnp.arange(rows)[:, None], windows[:, :, n - 1]].max(match)


def _warp(scores: jax.Array, knobs: Knobs) -> jax.Array:
    """Temperature, top-k and top-p warpers on scores (N, V), as transformers applies them
    when sampling (top_k 0 and top_p 1 switch theirs off)."""
    scores = scores / knobs.temperature
    rows, vocab = scores.shape
    top_k, top_p = knobs.top_k, knobs.top_p
    order = jnp.argsort(scores, axis=-1)  # ascending, as TopPLogitsWarper sorts
    ascending = jnp.take_along_axis(scores, order, axis=-1)
    kth = ascending[:, jnp.clip(vocab - top_k, 0, vocab - 1)][:, None]  # (N, 1)
    scores = jnp.where((top_k > 0) & (scores < kth), -jnp.inf, scores)
    ascending = jnp.where((top_k > 0) & (ascending < kth), -jnp.inf, ascending)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = (cumulative <= 1 - top_p).at[:, -1].set(False)  # keep at least one
    remove = jnp.zeros_like(remove).at[jnp.arange(rows)[:, None], order].set(remove)
    return jnp.where((top_p < 1) & remove, -jnp.inf, scores)


def _step(model, tokens, cur_len, cache, cross_kv):
    """Logits (N, V) float32 for position cur_len, feeding the token at cur_len - 1 of
    tokens (N, T); returns them with the updated cache."""
    last = jax.lax.dynamic_slice_in_dim(tokens, cur_len - 1, 1, axis=1)  # (N, 1)
    logits, cache = model.decoder(last, cross_kv=cross_kv, cache=cache, start=cur_len - 1)
    return logits[:, 0].astype(jnp.float32), cache


# Greedy and sampling ------------------------------------------------------------------------


@struct.dataclass
class SampleState:
    """The greedy / sampling loop's carry; rows are image-major (row = image * n + k)."""

    tokens: jax.Array  # (N, T) int32: the start token, the tokens so far, pad after
    cur_len: jax.Array  # () int32: the position generated next
    unfinished: jax.Array  # (N,) bool: the row has not produced EOS yet
    logprob: jax.Array  # (N,) float32: summed log-probabilities of its generated tokens
    length: jax.Array  # (N,) int32: its generated tokens, EOS included
    cache: Any  # per layer, self-attention keys and values, each (N, H, T, D)
    key: jax.Array  # PRNG key of the sampling, split once per step


def _sample(model, cross_kv, images: int, key, knobs: Knobs, s: Search):
    rows = images * s.num_return_sequences
    tokens = jnp.full((rows, s.max_length), s.pad, jnp.int32).at[:, 0].set(s.start)
    state = SampleState(
        tokens=tokens,
        cur_len=jnp.int32(1),
        unfinished=jnp.ones(rows, bool),
        logprob=jnp.zeros(rows, jnp.float32),
        length=jnp.zeros(rows, jnp.int32),
        cache=model.decoder.init_cache(rows, s.max_length),
        key=key,
    )

    def step(st: SampleState) -> SampleState:
        logits, cache = _step(model, st.tokens, st.cur_len, st.cache, cross_kv)  # (N, V)
        scores = _process(logits, st.tokens, st.cur_len, knobs, s)
        key, sub = jax.random.split(st.key)
        if s.do_sample:
            next_token = jax.random.categorical(sub, _warp(scores, knobs), axis=-1)
        else:
            next_token = jnp.argmax(scores, axis=-1)
        live = st.unfinished
        next_token = jnp.where(live, next_token, s.pad).astype(jnp.int32)  # (N,)
        token_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), next_token[:, None], 1)
        return SampleState(
            tokens=st.tokens.at[:, st.cur_len].set(next_token),
            cur_len=st.cur_len + 1,
            unfinished=live & (next_token != s.eos),
            logprob=st.logprob + jnp.where(live, token_logprob[:, 0], 0.0),
            length=st.length + live,
            cache=cache,
            key=key,
        )

    def going(st: SampleState) -> jax.Array:
        return (st.cur_len < s.max_length) & jnp.any(st.unfinished)

    st = jax.lax.while_loop(going, step, state)
    scores = st.logprob / st.length.astype(jnp.float32) ** knobs.length_penalty
    return st.tokens, scores, st.length


# Beam search (transformers' vectorised _beam_search) ---------------------------------------


@struct.dataclass
class BeamState:
    """The beam search loop's carry: per image, K running beams and the K best finished."""

    running: jax.Array  # (B, K, T) int32: the running beams, best first
    running_scores: jax.Array  # (B, K) float32: their summed log-probabilities
    sequences: jax.Array  # (B, K, T) int32: the best finished beams, best first
    scores: jax.Array  # (B, K) float32: their length-penalised scores (NEG: an empty slot)
    lengths: jax.Array  # (B, K) int32: their generated tokens, EOS included
    finished: jax.Array  # (B, K) bool: the slot holds a finished beam
    improvable: jax.Array  # (B, 1) bool: a running beam may still beat the worst finished one
    go_on: jax.Array  # () bool: some image's search is not done
    cur_len: jax.Array  # () int32: the position generated next
    cache: Any  # per layer, self-attention keys and values, each (B * K, H, T, D); None at first
    key: jax.Array  # PRNG key of beam sampling, split once per step


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (B, beams, ...) at idx (B, n) along the beams -> (B, n, ...)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam(model, cross_kv, images: int, key, knobs: Knobs, s: Search):
    k, length = s.num_beams, s.max_length
    stop_early = knobs.early_stopping == 1
    # transformers fills unused positions with `pad or eos`: a pad id of 0 gives EOS.
    fill = s.pad if s.pad != 0 else s.eos
    running = jnp.full((images, k, length), fill, jnp.int32).at[:, :, 0].set(s.start)
    state = BeamState(
        running=running,
        running_scores=jnp.zeros((images, k), jnp.float32).at[:, 1:].set(NEG),
        sequences=running,
        scores=jnp.full((images, k), NEG, jnp.float32),
        lengths=jnp.zeros((images, k), jnp.int32),
        finished=jnp.zeros((images, k), bool),
        improvable=jnp.ones((images, 1), bool),
        go_on=jnp.bool_(True),
        cur_len=jnp.int32(1),
        cache=None,  # made by the first step
        key=key,
    )

    def step(st: BeamState, first: bool = False) -> BeamState:
        log_probs, cache = _beam_log_probs(model, st, cross_kv, knobs, s, first)  # (B * K, V)
        key, sub = jax.random.split(st.key)
        cand, source, token = _candidates(log_probs, st.running_scores, sub, s)  # each (B, 2K)
        cand_seqs = _gather(st.running, source).at[:, :, st.cur_len].set(token)  # (B, 2K, T)
        hits = (token == s.eos) | (st.cur_len + 1 >= length)  # candidates that finish now
        running, running_scores, parent = _keep_running(cand_seqs, cand, hits, source, k)
        cache = jax.tree.map(lambda x: x[parent], cache)  # reorder the self-attention cache
        sequences, scores, lengths, finished = _add_finished(st, cand_seqs, cand, hits, knobs, k)
        cur_len = st.cur_len + 1
        improvable = st.improvable & _can_improve(
            running_scores, scores, finished, cur_len, knobs, length
        )
        go_on = jnp.any(improvable) & ~(jnp.all(finished) & stop_early) & ~jnp.all(hits)
        return BeamState(
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

    st = step(state, first=True)  # the loop's first step (max_length >= 2), on fewer rows
    st = jax.lax.while_loop(lambda st: st.go_on & (st.cur_len < length), step, st)
    n = s.num_return_sequences
    sequences = st.sequences[:, :n].reshape(images * n, length)
    return sequences, st.scores[:, :n].reshape(-1), st.lengths[:, :n].reshape(-1)


def _beam_log_probs(model, st: BeamState, cross_kv, knobs: Knobs, s: Search, first: bool):
    """Processed (and, sampling, warped) log-probabilities (B * K, V) of every running beam's
    next token, with the updated cache."""
    images, k, length = st.running.shape
    flat = st.running.reshape(images * k, length)  # (B * K, T)
    if first:
        # Every beam of an image still holds only the start token: run one row per image
        # and give its logits and cache to the image's beams (a quarter of the step at K=4).
        cache = model.decoder.init_cache(images, length)
        logits, cache = _step(model, flat[::k], st.cur_len, cache, cross_kv)  # (B, V)
        logits = jnp.repeat(logits, k, axis=0)
        cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
    else:
        logits, cache = _step(model, flat, st.cur_len, st.cache, cross_kv)
    log_probs = _process(jax.nn.log_softmax(logits, axis=-1), flat, st.cur_len, knobs, s)
    return (_warp(log_probs, knobs) if s.do_sample else log_probs), cache


def _candidates(
    log_probs: jax.Array, running_scores: jax.Array, key: jax.Array, s: Search
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The 2K best continuations of each image's beams (max(2, 1 + EOS ids) * K, with one EOS
    id): (summed scores, source beam, token), each (B, 2K), best first."""
    images, k = running_scores.shape
    vocab = log_probs.shape[-1]
    scores = log_probs.reshape(images, k, vocab) + running_scores[:, :, None]
    scores = scores.reshape(images, k * vocab)
    if s.do_sample:  # sampling without replacement: Gumbel top-k, then by score
        noisy = scores + jax.random.gumbel(key, scores.shape)
        idx = jax.lax.top_k(noisy, 2 * k)[1]
        cand = jnp.take_along_axis(scores, idx, axis=1)
        order = jnp.argsort(-cand, axis=1, stable=True)
        cand, idx = jnp.take_along_axis(cand, order, 1), jnp.take_along_axis(idx, order, 1)
    else:
        cand, idx = jax.lax.top_k(scores, 2 * k)
    return cand, idx // vocab, (idx % vocab).astype(jnp.int32)


def _keep_running(
    cand_seqs: jax.Array, cand: jax.Array, hits: jax.Array, source: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best K candidates that did not just finish keep running: (beams (B, K, T), their
    scores (B, K), each one's parent row in the flat (B * K) cache)."""
    images = cand.shape[0]
    run_scores = cand + hits.astype(jnp.float32) * NEG
    chosen = jax.lax.top_k(run_scores, k)[1]  # (B, K)
    parent = (_gather(source, chosen) + jnp.arange(images)[:, None] * k).reshape(-1)
    return _gather(cand_seqs, chosen), _gather(run_scores, chosen), parent


def _add_finished(
    st: BeamState, cand_seqs: jax.Array, cand: jax.Array, hits: jax.Array, knobs: Knobs, k: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Candidates among the top K that just finished join the finished beams when they rank
    among the K best (BeamHypotheses.add): (sequences, scores, lengths, finished)."""
    done = hits & (jnp.arange(cand.shape[1]) < k)[None, :]  # (B, 2K)
    final = cand / (st.cur_len.astype(jnp.float32) ** knobs.length_penalty)
    full = jnp.all(st.finished, axis=-1, keepdims=True) & (knobs.early_stopping == 1)
    final = final + full.astype(jnp.float32) * NEG
    final = final + (~st.improvable).astype(jnp.float32) * NEG
    final = final + (~done).astype(jnp.float32) * NEG
    best = jax.lax.top_k(jnp.concatenate([st.scores, final], axis=1), k)[1]  # (B, K)

    def merge(old: jax.Array, new: jax.Array) -> jax.Array:
        return _gather(jnp.concatenate([old, new], axis=1), best)

    return (
        merge(st.sequences, cand_seqs),
        merge(st.scores, final),
        merge(st.lengths, jnp.where(done, st.cur_len, 0)),
        merge(st.finished, done),
    )


def _can_improve(
    running_scores: jax.Array,
    scores: jax.Array,
    finished: jax.Array,
    cur_len: jax.Array,
    knobs: Knobs,
    length: int,
) -> jax.Array:
    """(B, 1): can the best running beam still beat the worst finished one?
    (transformers' _check_early_stop_heuristic)"""
    penalty = knobs.length_penalty
    never = knobs.early_stopping == 2
    best_len = jnp.where(never & (penalty > 0), length - 1, cur_len - 1)
    best_running = running_scores[:, :1] / best_len.astype(jnp.float32) ** penalty
    worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
    return jnp.any(best_running > worst, axis=-1, keepdims=True)


__all__ = ["GenerateOutput", "Settings", "generate", "search_settings"]
