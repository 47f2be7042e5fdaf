"""BERT decoder with Hugging Face BertLMHeadModel semantics (is_decoder, add_cross_attention),
as kha-white/manga-ocr-base uses it.

Embeddings are word + absolute position + token type 0, then LayerNorm. Blocks are post-LN,
TrOCR's (self-attention, cross-attention, MLP, each followed by its LayerNorm). The head is
the MLM head: dense, activation, LayerNorm, then the output projection (the word embeddings
when tied) plus a bias. Decoding is GPT-2's path (gpt2.py). Shapes use the legend in
layers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_caption.config import BertConfig
from nnx_caption.execution import Execution
from nnx_caption.gpt2 import GPT2, embedding_table, output_projection
from nnx_caption.layers import ACTIVATIONS, Dense, LayerNorm, dropout
from nnx_caption.trocr import TrOCRBlock


class BertBlock(TrOCRBlock):
    def __init__(self, cfg: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.build(
            cfg,
            eps=cfg.layer_norm_eps,
            activation=cfg.hidden_act,
            dropout_rate=cfg.hidden_dropout_prob,
            attention_dropout=cfg.attention_probs_dropout_prob,
            activation_dropout=0.0,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )


class Bert(GPT2):
    """GPT-2's decoding path with BERT's embeddings, blocks and MLM head."""

    block_cls = BertBlock

    def __init__(
        self,
        cfg: BertConfig,
        *,
        execution: Execution | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        e = cfg.hidden_size
        self.cfg = cfg

        def table(rows: int, axes: tuple) -> nnx.Param:
            return embedding_table(cfg, rows, axes, param_dtype, rngs)

        self.wte = table(cfg.vocab_size, ("vocab", "embed"))  # word_embeddings
        self.wpe = table(cfg.max_position_embeddings, (None, "embed"))
        self.token_type = table(cfg.type_vocab_size, (None, "embed"))
        self.ln_embedding = LayerNorm(e, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.blocks = nnx.List([self.block_cls(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
        self.head_dense = Dense(e, e, ("embed", "mlp"), init_std=cfg.init_std, **kw)  # transform
        self.head_ln = LayerNorm(e, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.lm_head = output_projection(cfg, **kw)
        self.head_bias = nnx.Param(
            jnp.zeros((cfg.vocab_size,), param_dtype), axes=("vocab",), weight_decay=False
        )
        self.dtype = dtype
        self.execution = execution or Execution()

    def embed(self, ids: jax.Array, start: jax.Array | int, rngs: nnx.Rngs | None) -> jax.Array:
        """ids (N, T) at positions start.. -> (N, T, E): word + position + token type 0,
        normalised."""
        positions = start + jnp.arange(ids.shape[1])
        x = jnp.take(self.wte[...], ids, axis=0) + jnp.take(self.wpe[...], positions, axis=0)
        x = self.ln_embedding(x + self.token_type[...][0])
        return dropout(x.astype(self.compute_dtype), self.cfg.hidden_dropout_prob, rngs)

    def head(self, x: jax.Array) -> jax.Array:
        """The MLM head: dense, activation, LayerNorm, projection + bias -> (N, T, V)."""
        x = self.head_ln(ACTIVATIONS[self.cfg.hidden_act](self.head_dense(x)))
        return self.project_out(x) + self.head_bias[...]
