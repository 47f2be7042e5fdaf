"""The train step against PyTorch: HF's loss (label smoothing, token-normalised), gradients,
and AdamW with linear warmup/decay, no decay on biases and LayerNorm, clipping."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from parity.test_families import BERT, TROCR_SMALL
from reference import CONFIGS, build_hf_model

import nnx_caption as nc
from nnx_caption.layers import Execution
from nnx_caption.safetensors_io import SafetensorsReader
from nnx_caption.train import TrainConfig, Trainer, cross_entropy, decays
from nnx_caption.weight_table import WeightMap


def hf_loss(logits, labels, mask, smoothing):
    """HF run_image_captioning_flax.py's loss_fn, in torch."""
    vocab = logits.shape[-1]
    confidence = 1.0 - smoothing
    low = (1.0 - confidence) / (vocab - 1)
    constant = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    soft = torch.full(logits.shape, low).scatter(-1, labels[..., None], confidence)
    loss = -(soft * torch.log_softmax(logits, -1)).sum(-1) - constant
    return (loss * mask).sum() / mask.sum()


def batch(enc, dec, n=4, t=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, dec["vocab_size"], (n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    mask[1, 3:] = 0
    mask[3, 5:] = 0
    ids = np.concatenate([np.full((n, 1), dec["bos_token_id"]), labels[:, :-1]], 1)
    return dict(
        pixel_values=rng.standard_normal(
            (n, enc["image_size"], enc["image_size"], 3), dtype=np.float32
        ),
        decoder_input_ids=ids.astype(np.int32),
        labels=labels,
        decoder_attention_mask=mask,
    )


def no_dropout(enc, dec):
    enc = dict(enc, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if dec.get("model_type") == "trocr":
        return enc, dict(dec, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    if dec.get("model_type") == "bert":
        return enc, dict(dec, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return enc, dict(dec, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_equals_hf_script(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5, 40)).astype(np.float32) * 3
    labels = rng.integers(0, 40, (3, 5))
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    total, count = cross_entropy(logits, labels, mask, smoothing)
    want = hf_loss(
        torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(mask), smoothing
    )
    np.testing.assert_allclose(total / count, want.item(), rtol=1e-5)


@pytest.mark.parametrize(
    "accumulate, per_image, encoder, decoder",
    [(1, 1, "vit", None), (2, 1, "vit", None), (2, 2, "vit", None), (1, 1, "deit", None),
     (1, 1, "deit", TROCR_SMALL), (1, 1, "vit", dict(BERT, bos_token_id=2, eos_token_id=3))],
    ids=["plain", "accumulate", "grouped", "deit", "deit_trocr", "vit_bert"],
)  # fmt: skip
def test_adamw_steps_equal_torch(tmp_path, accumulate, per_image, encoder, decoder):
    """per_image 2: two images with two captions each, each image encoded once (and split
    over the micro-batches with its captions); torch sees each image repeated per caption."""
    enc, dec = CONFIGS["proj_gelu"]
    enc, dec = no_dropout(dict(enc, model_type=encoder), decoder or dec)
    ref = build_hf_model(enc, dec, scale=2.0)
    ref.save_pretrained(tmp_path)
    model = nc.from_pretrained(tmp_path)
    cfg = TrainConfig(
        learning_rate=1e-3,
        weight_decay=0.1,
        warmup_steps=2,
        total_steps=6,
        max_grad_norm=0.5,
        label_smoothing_factor=0.1,
        gradient_accumulation_steps=accumulate,
    )
    trainer = Trainer(model, cfg)

    # The same optimisation in torch: AdamW on decayed / non-decayed groups, clipping, the
    # linear warmup-then-decay schedule, loss normalised by the batch's real tokens.
    names = {n for n, _ in ref.named_parameters() if "pooler" not in n}
    params = dict(ref.named_parameters())

    def no_decay(n):
        n = n.lower()
        return n.endswith("bias") or "layernorm" in n or "layer_norm" in n or ".ln_" in n

    decayed = [params[n] for n in sorted(names) if not no_decay(n)]
    plain = [params[n] for n in sorted(names) if no_decay(n)]
    opt = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
        lr=1e-3,
        eps=1e-8,
    )
    lrs = [1e-3 * min(s / 2, (6 - s) / 4) for s in range(6)]
    ref.train()
    for step in range(4):
        b = batch(enc, dec, seed=step)
        b["pixel_values"] = b["pixel_values"][: len(b["labels"]) // per_image]
        got = trainer.train_step(b)
        pixels = np.repeat(b["pixel_values"], per_image, axis=0)
        for g in opt.param_groups:
            g["lr"] = lrs[step]
        opt.zero_grad()
        out = ref(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            decoder_input_ids=torch.from_numpy(b["decoder_input_ids"]).long(),
            decoder_attention_mask=torch.from_numpy(b["decoder_attention_mask"]).long(),
        )
        loss = hf_loss(
            out.logits,
            torch.from_numpy(b["labels"]).long(),
            torch.from_numpy(b["decoder_attention_mask"]).float(),
            0.1,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_([params[n] for n in names], 0.5)
        opt.step()
        np.testing.assert_allclose(float(got["loss"]), loss.item(), rtol=1e-5)
    nc.save_pretrained(trainer.model, tmp_path / "after")
    back = nc.from_pretrained(tmp_path / "after")
    ref.save_pretrained(tmp_path / "ref_after")  # saved names are the HF layout's
    with SafetensorsReader(tmp_path / "ref_after" / "model.safetensors") as reader:
        ref_state = {k: reader.read(k) for k in reader.entries}
    ours = WeightMap(back.config)
    for path, var in nnx.to_flat_state(nnx.state(back, nnx.Param)):
        name = ".".join(map(str, path))
        hf_name, t = ours.to_hf(name)
        np.testing.assert_allclose(
            t.to_hf(np.asarray(var[...])), ref_state[hf_name], atol=2e-5, err_msg=hf_name
        )


def test_decay_mask_and_frozen_parts(tmp_path):
    """No weight decay for biases and norm parameters, read from the metadata they are created
    with (not from their names); a frozen prefix does not move."""
    enc, dec = no_dropout(*CONFIGS["proj_gelu"])
    build_hf_model(enc, dec).save_pretrained(tmp_path)
    model = nc.from_pretrained(tmp_path)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    no_decay = {name for name, var in flat.items() if not decays(var)}
    # Exactly what HF's script's decay_mask_fn exempts: biases and LayerNorm scales.
    want = {n for n in flat if n.endswith(".bias") or n.split(".")[-2].startswith("ln")}
    assert no_decay == want, no_decay ^ want
    before = jax.tree.map(np.asarray, nnx.state(model.encoder, nnx.Param))
    wte_before = np.asarray(model.decoder.wte[...])  # the trainer owns (donates) the arrays
    trainer = Trainer(model, TrainConfig(learning_rate=1e-2, total_steps=4, freeze=("encoder",)))
    trainer.train_step(batch(enc, dec))
    after = nnx.state(trainer.model.encoder, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))
    assert not np.allclose(np.asarray(trainer.model.decoder.wte[...]), wte_before)


@pytest.mark.parametrize(
    "name,execution",
    [
        ("proj_gelu", Execution(remat=True)),
        ("proj_gelu", Execution(scan=True)),
        (
            "proj_gelu",
            Execution(scan=True, remat=True, remat_policy="dots_with_no_batch_dims_saveable"),
        ),
        ("attention_scaling_flags", Execution(scan=True)),
    ],
    ids=["remat", "scan", "scan_remat_dots", "scan_inverse_layer_idx"],
)
def test_execution_options_give_the_same_gradients(unrolled, execution, name):
    """Remat and scan change what is stored and compiled, not what is computed: with dropout
    on, gradients are equal to the unrolled loop's (Adam would amplify float noise on
    near-zero gradients, so they are compared before the optimizer). attention_scaling_flags
    has scale_attn_by_inverse_layer_idx: each layer's scale comes from the layer index, which
    scan passes in, so those blocks scan too. (The Trainer's compiled step with scan and
    remat is held to the unrolled one in tests/sharding/test_sharded_train.py.)"""
    path, b, want = unrolled(name)
    got = _gradients_and_logits(path, b, execution)
    scale = max(np.abs(g).max() for g in jax.tree.leaves(want[0]))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6 * scale), got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)


def _gradients_and_logits(path, b: dict, execution: Execution):
    """(dropout-on gradients of the mean loss, logits) of the checkpoint run as `execution`."""

    def loss(model):
        logits = model(
            b["pixel_values"],
            b["decoder_input_ids"],
            b["decoder_attention_mask"],
            rngs=nnx.Rngs(dropout=3),
        )
        total, count = cross_entropy(logits, b["labels"], b["decoder_attention_mask"])
        return total / count

    model = nc.from_pretrained(path, execution=execution)
    assert model.config.execution == execution and model.decoder.execution == execution
    grads = jax.tree.map(np.asarray, nnx.jit(nnx.grad(loss))(model))
    return grads, model(b["pixel_values"], b["decoder_input_ids"])


@pytest.fixture(scope="module")
def unrolled(tmp_path_factory):
    """name -> (checkpoint, batch, the unrolled run's results), each computed once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            enc, dec = CONFIGS[name]
            path = tmp_path_factory.mktemp(name)
            build_hf_model(enc, dec, scale=2.0).save_pretrained(path)
            b = batch(enc, dec)
            cache[name] = path, b, _gradients_and_logits(path, b, Execution())
        return cache[name]

    return get


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        Execution(remat=True, remat_policy="keep_everything")
