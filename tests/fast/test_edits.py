"""Edited architectures on weights/tiny: strict loading with declared new parameters, neutral
edits equal to the checkpoint (transformers' golden tokens), generate following the edit,
saving (HF refused, NNX exact), roles from metadata, scan, and FLOPs counted by XLA."""

from __future__ import annotations

import dataclasses
import logging
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_caption as nc
from nnx_caption import flops
from nnx_caption.config import tiny, vit_gpt2_base
from nnx_caption.edits import class_spec, load_class
from nnx_caption.layers import Execution
from nnx_caption.lora import add_lora
from nnx_caption.train import TrainConfig, Trainer, decays

GATED = "examples/gated_cross_attention.py:GatedCaptioner"
GATES = (r"decoder\.blocks\.\d+\.gated\..*",)


class ScaledImage(nc.VisionEncoderDecoder):
    """One new parameter: a gain on the image states the decoder reads (1 leaves it neutral)."""

    def __init__(self, config, *, dtype=None, param_dtype=jnp.float32, rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_gain = nnx.Param(jnp.ones((), param_dtype))

    def encode(self, pixel_values, rngs=None):
        return super().encode(pixel_values, rngs) * self.image_gain[...]


@pytest.fixture(scope="module")
def golden(tiny_dir):
    return np.load(tiny_dir / "golden.npz")


@pytest.fixture(scope="module")
def gated_cls():
    return load_class(GATED)


def logits_of(model, golden):
    return model(
        jnp.asarray(golden["pixel_values"]),
        jnp.asarray(golden["decoder_input_ids"]),
        jnp.asarray(golden["decoder_attention_mask"]),
    )


def test_a_missing_new_parameter_is_named_with_the_way_out(tiny_dir):
    with pytest.raises(nc.CheckpointError, match=r"image_gain \(no HF name\).*new_params"):
        nc.from_pretrained(tiny_dir, model_cls=ScaledImage)
    with pytest.raises(nc.CheckpointError, match="matches no parameter"):
        nc.from_pretrained(tiny_dir, model_cls=ScaledImage, new_params=("image_scale",))


@pytest.mark.parametrize("edit", ["scaled_image", "gated"])
def test_a_neutral_edit_loads_the_checkpoint_exactly(tiny_dir, golden, gated_cls, edit, caplog):
    cls, new = (ScaledImage, ("image_gain",)) if edit == "scaled_image" else (gated_cls, GATES)
    with caplog.at_level(logging.INFO, logger="nnx_caption"):
        model = nc.from_pretrained(tiny_dir, model_cls=cls, new_params=new)
    report = caplog.records[-1].getMessage()
    assert "loaded 84 tensors" in report and "ignored 2: encoder.pooler" in report
    stock = nc.from_pretrained(tiny_dir)
    np.testing.assert_array_equal(logits_of(model, golden), logits_of(stock, golden))
    # transformers' own greedy tokens for this checkpoint (golden.npz), through the edit.
    out = nc.generate(model, jnp.asarray(golden["pixel_values"]), max_length=12, num_beams=1)
    np.testing.assert_array_equal(out.sequences, golden["greedy_sequences"])


def greedy_without_cache(model, pixels, length: int) -> np.ndarray:
    """The reference search: every step re-runs the full forward pass on the whole prefix (a
    fixed-length buffer, so it compiles once: causal attention keeps later slots out)."""
    cfg = model.config
    tokens = np.full((len(pixels), length), cfg.pad_token_id, np.int32)
    tokens[:, 0] = cfg.decoder_start_token_id
    forward = nnx.jit(lambda m, ids: m(pixels, ids))
    done = np.zeros(len(pixels), bool)
    for t in range(1, length):
        nxt = np.asarray(jnp.argmax(forward(model, jnp.asarray(tokens))[:, t - 1], -1))
        tokens[:, t] = np.where(done, cfg.pad_token_id, nxt)
        done |= nxt == cfg.eos_token_id
        if done.all():
            return tokens[:, : t + 1]
    return tokens


@pytest.mark.parametrize("edit", ["scaled_image", "gated"])
def test_generate_follows_the_edit(tiny_dir, golden, gated_cls, edit):
    """With the edit active, generate (cached, jit-compiled) gives the tokens that re-running
    the edited model's forward gives, and they are not the unedited model's logits."""
    if edit == "scaled_image":
        model = nc.from_pretrained(tiny_dir, model_cls=ScaledImage, new_params=("image_gain",))
        model.image_gain[...] = jnp.float32(-2.0)
    else:
        model = nc.from_pretrained(tiny_dir, model_cls=gated_cls, new_params=GATES, seed=1)
        for block in model.decoder.blocks:
            block.gated.gate[...] = jnp.float32(3.0)
    pixels = jnp.asarray(golden["pixel_values"])
    stock = nc.from_pretrained(tiny_dir)
    assert np.abs(np.asarray(logits_of(model, golden) - logits_of(stock, golden))).max() > 1e-2
    out = nc.generate(model, pixels, max_length=12, num_beams=1)
    want = greedy_without_cache(model, pixels, 12)
    np.testing.assert_array_equal(out.sequences[:, : want.shape[1]], want)


def test_hf_save_refuses_and_nnx_layout_round_trips(tiny_dir, golden, gated_cls, tmp_path):
    model = nc.from_pretrained(tiny_dir, model_cls=gated_cls, new_params=GATES, seed=2)
    for block in model.decoder.blocks:
        block.gated.gate[...] = jnp.float32(0.5)
    with pytest.raises(nc.CheckpointError, match=r"18 parameter\(s\) have no Hugging Face name.*"):
        nc.save_pretrained(model, tmp_path / "hf", layout="hf")
    assert not (tmp_path / "hf").exists()  # refused before anything was written
    nc.save_pretrained(model, tmp_path / "nnx", layout="nnx")
    back = nc.from_pretrained(tmp_path / "nnx", model_cls=gated_cls)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(back, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    np.testing.assert_array_equal(logits_of(back, golden), logits_of(model, golden))
    # Loaded as the stock model, the file names the class it was saved from, by the file's
    # absolute path: a spec that works from any folder.
    spec = f"{os.path.abspath(GATED.split(':')[0])}:GatedCaptioner"
    with pytest.raises(nc.CheckpointError, match=f"saved from {re.escape(spec)}"):
        nc.from_pretrained(tmp_path / "nnx")
    assert class_spec(gated_cls) == spec


EDIT_FILE = """
import jax.numpy as jnp
from flax import nnx
import nnx_caption as nc

class AdapterCaptioner(nc.VisionEncoderDecoder):
    def __init__(self, config, *, dtype=None, param_dtype=jnp.float32, rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_gain = nnx.Param(jnp.full((), 1.5, param_dtype))

    def encode(self, pixel_values, rngs=None):
        return super().encode(pixel_values, rngs) * self.image_gain[...]
"""


def test_an_nnx_checkpoint_of_an_edit_loads_from_another_folder(
    tiny_dir, golden, tmp_path, monkeypatch
):
    """A researcher's edit in their folder, named relatively there, saved in NNX layout: from
    another folder the checkpoint says which --model_class to pass, and that spec loads it."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    (work / "encoder_adapter.py").write_text(EDIT_FILE)
    monkeypatch.chdir(work)
    cls = load_class("encoder_adapter.py:AdapterCaptioner")
    model = nc.from_pretrained(tiny_dir, model_cls=cls, new_params=(r"image_gain",))
    nc.save_pretrained(model, tmp_path / "saved", layout="nnx")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(nc.CheckpointError, match=r"saved from (\S+): pass") as refused:
        nc.from_pretrained(tmp_path / "saved")
    spec = re.search(r"saved from (\S+): pass", str(refused.value)).group(1)
    assert spec == f"{work / 'encoder_adapter.py'}:AdapterCaptioner"
    back = nc.from_pretrained(tmp_path / "saved", model_cls=load_class(spec))
    assert float(back.image_gain[...]) == 1.5
    np.testing.assert_array_equal(logits_of(back, golden), logits_of(model, golden))


def test_roles_come_from_metadata(tiny_dir, gated_cls):
    model = nc.from_pretrained(tiny_dir, model_cls=gated_cls, new_params=GATES)
    block = model.decoder.blocks[0]
    assert not decays(block.gated.gate) and not decays(block.gated.ln.scale)
    assert decays(block.gated.attn.q.kernel) and not decays(block.gated.attn.q.bias)
    # The edit's cross-attention projections are LoRA targets like the stock ones (tagged on
    # the Dense layers): 2 x 6 encoder + 2 x (7 stock + 3 gated) decoder projections.
    assert add_lora(model, rank=2) == 2 * 6 + 2 * 10


def batch_for(config, n=4, t=6, seed=0):
    rng = np.random.default_rng(seed)
    size = config.encoder.image_size
    labels = rng.integers(0, config.decoder.vocab_size, (n, t)).astype(np.int32)
    start = np.full((n, 1), config.decoder_start_token_id, np.int32)
    return dict(
        pixel_values=rng.standard_normal((n, size, size, 3), dtype=np.float32),
        decoder_input_ids=np.concatenate([start, labels[:, :-1]], 1),
        decoder_attention_mask=np.ones((n, t), np.int32),
        labels=labels,
    )


@pytest.mark.parametrize("mode", ["trainable", "lora"])
def test_what_trains_is_chosen_by_path(tiny_dir, gated_cls, mode):
    """--trainable trains exactly what it matches; with LoRA, declared-new parameters train
    beside the adapters and the rest stays frozen."""
    model = nc.from_pretrained(tiny_dir, model_cls=gated_cls, new_params=GATES)
    if mode == "lora":
        add_lora(model, rank=2)
        cfg = TrainConfig(learning_rate=1e-2, total_steps=4, lora=True, new_params=GATES)
    else:
        cfg = TrainConfig(learning_rate=1e-2, total_steps=4, trainable=GATES)
    flat = lambda m: {  # noqa: E731
        ".".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
    }
    before = flat(model)
    trainer = Trainer(model, cfg)
    for seed in range(2):  # the first step opens the gates, the second moves their attention
        trainer.train_step(batch_for(model.config, seed=seed))
    after = flat(trainer.model)
    moved = {name for name, value in before.items() if not np.array_equal(value, after[name])}
    assert {"decoder.blocks.0.gated.gate", "decoder.blocks.1.gated.attn.q.kernel"} <= moved
    others = {n for n in moved if ".gated." not in n}
    if mode == "lora":
        assert others and all(".lora." in n for n in others), others
    else:
        assert not others, others


def test_scan_over_edited_blocks_equals_unrolled(tiny_dir, golden, gated_cls):
    """The gated blocks carry no per-layer constant either: they scan like the stock ones."""
    kw = dict(model_cls=gated_cls, new_params=GATES, seed=3)
    unrolled = nc.from_pretrained(tiny_dir, **kw)
    scanned = nc.from_pretrained(tiny_dir, execution=Execution(scan=True, remat=True), **kw)
    for m in (unrolled, scanned):
        for block in m.decoder.blocks:
            block.gated.gate[...] = jnp.float32(1.0)
    # Scan fuses differently: float noise, which this checkpoint's large weights (std 0.4)
    # amplify to ~1e-4 on logits of ~5, as for the stock model.
    np.testing.assert_allclose(
        logits_of(scanned, golden), logits_of(unrolled, golden), atol=1e-3, rtol=0
    )
    out = nc.generate(scanned, jnp.asarray(golden["pixel_values"]), max_length=12)
    ref = nc.generate(unrolled, jnp.asarray(golden["pixel_values"]), max_length=12)
    np.testing.assert_array_equal(out.sequences, ref.sequences)


@pytest.mark.parametrize(
    "execution",
    [Execution(), Execution(scan=True), Execution(remat=True), Execution(scan=True, remat=True)],
    ids=["unrolled", "scan", "remat", "scan+remat"],
)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_an_edited_block_keeps_its_cross_attention_maps(
    tiny_dir, golden, gated_cls, execution, num_beams
):
    """GatedBlock overrides __call__ and knows nothing of maps: they come from what its `cross`
    module records, so while the gates are closed they equal the stock model's, however the
    blocks run (scan and remat would lose or refuse a value sown inside them)."""
    kw = dict(execution=execution)
    edited = nc.from_pretrained(tiny_dir, model_cls=gated_cls, new_params=GATES, **kw)
    stock = nc.from_pretrained(tiny_dir, **kw)
    pixels = jnp.asarray(golden["pixel_values"])
    search = dict(max_length=8, num_beams=num_beams, output_cross_attentions=True)
    ref = nc.generate(stock, pixels, **search)
    out = nc.generate(edited, pixels, **search)
    np.testing.assert_array_equal(out.sequences, ref.sequences)
    layers, heads = stock.config.decoder.n_layer, stock.config.decoder.n_head
    assert ref.cross_attentions.shape[2:4] == (layers, heads)
    np.testing.assert_allclose(out.cross_attentions, ref.cross_attentions, atol=1e-6, rtol=0)
    # The edit's own cross-attention records too, but the maps are the `cross` module's.
    assert not np.allclose(out.cross_attentions, 0)


@pytest.mark.parametrize(
    "preset,tolerance", [(vit_gpt2_base, 0.01), (tiny, 0.10)], ids=["vit_gpt2_base", "tiny"]
)
def test_xla_flop_count_agrees_with_the_analytic_one(preset, tolerance):
    """XLA counts everything (norms, softmax, activations too), the analytic count only the
    matmuls: at ViT-B/16 + GPT-2 they agree within 1% (0.5% measured), at the tiny preset,
    where elementwise work weighs more, within 10% (8% measured)."""
    config = preset()
    model = nnx.eval_shape(lambda: nc.VisionEncoderDecoder(config, rngs=nnx.Rngs(0)))
    batch = batch_for(config, n=8, t=20)
    counted = flops.xla_train_step(model, TrainConfig(), batch)
    analytic = flops.train_step(config, 8, 20)
    assert abs(counted / analytic - 1) < tolerance, counted / analytic
    scan_config = dataclasses.replace(config, execution=Execution(scan=True, remat=True))
    scanned = nnx.eval_shape(lambda: nc.VisionEncoderDecoder(scan_config, rngs=nnx.Rngs(0)))
    assert flops.xla_train_step(scanned, TrainConfig(), batch) == counted  # counted unrolled


def test_xla_flop_count_sees_the_edit(tiny_dir, gated_cls):
    config = nc.from_pretrained(tiny_dir).config
    batch = batch_for(config, n=8, t=12)
    stock = nnx.eval_shape(lambda: nc.VisionEncoderDecoder(config, rngs=nnx.Rngs(0)))
    gated = nnx.eval_shape(lambda: gated_cls(config, rngs=nnx.Rngs(0)))
    ratio = flops.xla_train_step(gated, TrainConfig(), batch) / flops.xla_train_step(
        stock, TrainConfig(), batch
    )
    # A second cross-attention per block: more than the stock step, less than twice it.
    assert 1.05 < ratio < 2.0, ratio


def test_an_edited_trocr_block_loads_generates_scans_and_round_trips(tmp_path):
    """The hooks on another decoder family: a TrOCR block subclass (block_cls) with a new
    parameter read in its image_kv, in a decoder_cls subclass. Neutral at 1 it gives the
    checkpoint's logits and tokens, unrolled or scanned; changed, it saves in the NNX layout
    (HF's has no name for it) and loads back exactly."""
    from nnx_caption.config import TrOCRConfig
    from nnx_caption.trocr import TrOCR, TrOCRBlock

    class GatedValues(TrOCRBlock):
        def __init__(self, cfg, *, dtype, param_dtype, rngs):
            super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.gate = nnx.Param(jnp.ones((), param_dtype))

        def image_kv(self, image):
            k, v = super().image_kv(image)
            return k, v * self.gate[...]

    class GatedTrOCR(TrOCR):
        block_cls = GatedValues

    class Gated(nc.VisionEncoderDecoder):
        decoder_cls = GatedTrOCR

    base = tiny()
    decoder = TrOCRConfig(
        vocab_size=base.decoder.vocab_size, d_model=48, decoder_layers=2,
        decoder_attention_heads=4, decoder_ffn_dim=64, max_position_embeddings=32, pad_token_id=0,
        use_learned_position_embeddings=False,
    )  # fmt: skip
    config = dataclasses.replace(base, decoder=decoder)
    nc.save_pretrained(nc.VisionEncoderDecoder(config, rngs=nnx.Rngs(0)), tmp_path / "base")
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.standard_normal((2, 32, 32, 3), np.float32))
    ids = jnp.asarray(rng.integers(1, 512, (2, 6)), jnp.int32)
    original = nc.from_pretrained(tmp_path / "base")
    new = (r"decoder\.blocks\.\d+\.gate",)
    for execution in (Execution(), Execution(scan=True, remat=True)):
        edited = nc.from_pretrained(
            tmp_path / "base", model_cls=Gated, new_params=new, execution=execution
        )
        np.testing.assert_allclose(edited(pixels, ids), original(pixels, ids), atol=1e-5)
        np.testing.assert_array_equal(
            nc.generate(edited, pixels, max_length=8).sequences,
            nc.generate(original, pixels, max_length=8).sequences,
        )
    edited.decoder.blocks[1].gate[...] = jnp.asarray(3.0)
    changed = edited(pixels, ids)
    assert np.abs(np.asarray(changed - original(pixels, ids))).max() > 1e-4
    with pytest.raises(nc.CheckpointError, match="gate"):
        nc.save_pretrained(edited, tmp_path / "hf")
    nc.save_pretrained(edited, tmp_path / "nnx", layout="nnx")
    back = nc.from_pretrained(tmp_path / "nnx", model_cls=Gated, execution=execution)
    np.testing.assert_array_equal(back(pixels, ids), changed)
