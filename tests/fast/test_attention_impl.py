"""Execution(attention=...) on weights/tiny: jax.nn.dot_product_attention's "xla" kernel gives
our einsum attention's logits at every real position and the same greedy and beam tokens (the
encoder, the decoder with its padding, cross-attention; unrolled and scanned; a train step);
"cudnn" on a CPU is a clear error; "auto" on a CPU is einsum."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_caption as nc
from nnx_caption.cli import main as cli
from nnx_caption.config import tiny
from nnx_caption.layers import Execution
from nnx_caption.loading import init_model
from nnx_caption.train import TrainConfig, loss_and_grads


@pytest.fixture(scope="module")
def golden(tiny_dir):
    return np.load(tiny_dir / "golden.npz")


@pytest.fixture
def fused_calls(monkeypatch) -> list[str]:
    """The implementation of every jax.nn.dot_product_attention call traced from now on."""
    calls: list[str] = []
    real = jax.nn.dot_product_attention

    def counted(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return real(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", counted)
    return calls


def _model(tiny_dir, attention: str, scan: bool = False, weights: str = "checkpoint"):
    """weights/tiny (weights of std 0.4: float noise grows to ~5e-5 on its logits, as between
    transformers and us), or the tiny preset's random init (std 0.02, as transformers inits)."""
    execution = Execution(scan=scan, attention=attention)
    if weights == "checkpoint":
        return nc.from_pretrained(tiny_dir, execution=execution)
    return init_model(dataclasses.replace(tiny(), execution=execution), seed=5)


def _logits(model, golden, mask):
    pixels, ids = jnp.asarray(golden["pixel_values"]), jnp.asarray(golden["decoder_input_ids"])
    return np.asarray(model(pixels, ids, jnp.asarray(mask)))


PADDINGS = {
    "golden": None,  # the golden batch: its second caption padded at the end
    "inside": np.array([[1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]),  # a pad mid-sequence
}


@pytest.mark.parametrize("weights,atol", [("random", 1e-5), ("checkpoint", 1e-4)])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("padding", list(PADDINGS))
def test_xla_kernel_gives_einsum_logits_at_every_real_position(
    tiny_dir, golden, fused_calls, scan, padding, weights, atol
):
    mask = golden["decoder_attention_mask"] if PADDINGS[padding] is None else PADDINGS[padding]
    ref = _logits(_model(tiny_dir, "einsum", scan, weights), golden, mask)
    assert fused_calls == []  # einsum is ours
    out = _logits(_model(tiny_dir, "xla", scan, weights), golden, mask)
    config = nc.from_pretrained(tiny_dir).config
    # The encoder's, the decoder's self- and cross-attention, each traced once per layer
    # (under scan, once for all layers).
    layers = 1 if scan else config.encoder.num_hidden_layers
    layers += 2 * (1 if scan else config.decoder.n_layer)
    assert fused_calls == ["xla"] * layers
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=atol, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_xla_kernel_generates_einsums_tokens(tiny_dir, golden, fused_calls, num_beams):
    pixels = jnp.asarray(golden["pixel_values"])
    search = dict(max_length=12, num_beams=num_beams, num_return_sequences=num_beams)
    ref = nc.generate(_model(tiny_dir, "einsum"), pixels, **search)
    out = nc.generate(_model(tiny_dir, "xla"), pixels, **search)
    assert "xla" in fused_calls  # the image's encoder and cross-attention; steps use a cache
    np.testing.assert_array_equal(out.sequences, ref.sequences)
    np.testing.assert_allclose(out.scores, ref.scores, atol=1e-5, rtol=0)
    want = golden["greedy_sequences"] if num_beams == 1 else None
    if want is not None:
        np.testing.assert_array_equal(out.sequences, want)  # and transformers' tokens


def test_xla_kernel_trains_as_einsum(tiny_dir, golden, fused_calls):
    """A train step's loss and gradients (attention dropout on: the decoder falls back, the
    encoder, without it, runs fused)."""
    pixels, ids = jnp.asarray(golden["pixel_values"]), jnp.asarray(golden["decoder_input_ids"])
    mask = jnp.asarray(golden["decoder_attention_mask"])
    batch = dict(
        pixel_values=pixels, decoder_input_ids=ids, labels=ids, decoder_attention_mask=mask
    )
    results = []
    for attention in ("einsum", "xla"):
        model = _model(tiny_dir, attention, weights="random")
        results.append(loss_and_grads(model, batch, jax.random.key(0), TrainConfig()))
    assert fused_calls and set(fused_calls) == {"xla"}
    (ref_total, ref_count, ref_grads), (total, count, grads) = results
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    assert count == ref_count
    flat = nnx.to_flat_state(ref_grads)
    for (path, a), (_, b) in zip(flat, nnx.to_flat_state(grads), strict=True):
        np.testing.assert_allclose(b[...], a[...], atol=1e-6, rtol=1e-4, err_msg=str(path))


def test_cudnn_on_a_cpu_is_a_clear_error(tiny_dir, golden, tmp_path, capsys):
    model = _model(tiny_dir, "cudnn")
    with pytest.raises(ValueError, match="cudnn' cannot run: it needs an NVIDIA GPU"):
        model(jnp.asarray(golden["pixel_values"]), jnp.asarray(golden["decoder_input_ids"]))
    image = tmp_path / "noise.npy"
    np.save(image, golden["pixel_values"][0])
    code = cli(["predict", str(tiny_dir), str(tmp_path), "--output_dir", str(tmp_path / "out"),
                "--attention_impl", "cudnn"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--attention_impl cudnn: it needs an NVIDIA GPU, and jax runs on cpu" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_auto_on_a_cpu_is_einsum(tiny_dir, golden, fused_calls):
    mask = golden["decoder_attention_mask"]
    ref = _logits(_model(tiny_dir, "einsum"), golden, mask)
    out = _logits(_model(tiny_dir, "auto"), golden, mask)
    assert fused_calls == []
    np.testing.assert_array_equal(out, ref)


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="attention 'flash' is not one of einsum, xla, cudnn"):
        Execution(attention="flash")
