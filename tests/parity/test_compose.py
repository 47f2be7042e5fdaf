"""Composing a captioner from a pretrained ViT or DeiT and a pretrained GPT-2, against transformers'
VisionEncoderDecoderModel.from_encoder_decoder_pretrained: the same tensors, the loaded parts
bit-identical to the sources, the new ones initialised as transformers does, and the saved
checkpoint's logits in transformers equal to ours."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import CONFIGS, make_inputs, torch_forward
from safetensors.numpy import load_file, save_file

import nnx_caption as nc
from nnx_caption.cli import main as cli

# A tiny ViT and GPT-2 (3 layers: c_proj's init std then differs from the others' by sqrt(6)).
ENC = CONFIGS["proj_gelu"][0]
DEC = dict(CONFIGS["proj_gelu"][1], n_layer=3)  # bos 1, eos 2


def make_sources(tmp_path, encoder_cls: str, decoder_cls: str, n_embd: int):
    """A random ViT and GPT-2 as their own HF checkpoints. The GPT-2 file also holds the
    legacy causal-mask buffers that the original `gpt2` repo stores (unprefixed there)."""
    import transformers

    torch.manual_seed(0)
    config_cls = (
        transformers.DeiTConfig if encoder_cls.startswith("DeiT") else transformers.ViTConfig
    )
    vit = getattr(transformers, encoder_cls)(config_cls(**ENC, num_labels=3))
    vit.save_pretrained(tmp_path / "vit")
    gpt2 = getattr(transformers, decoder_cls)(transformers.GPT2Config(**dict(DEC, n_embd=n_embd)))
    gpt2.save_pretrained(tmp_path / "gpt2")
    file = tmp_path / "gpt2" / "model.safetensors"
    tensors = load_file(file)
    prefix = "transformer." if decoder_cls == "GPT2LMHeadModel" else ""
    n = DEC["n_positions"]
    for i in range(DEC["n_layer"]):
        tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.float32))[None, None]
        tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    return tmp_path / "vit", tmp_path / "gpt2"


def hf_compose(vit, gpt2):
    from transformers import AutoConfig, VisionEncoderDecoderModel

    # transformers 5 reads decoder_config.is_decoder, which GPT2Config no longer defines: pass
    # the decoder config with the flags the method would set.
    decoder_config = AutoConfig.from_pretrained(gpt2)
    decoder_config.is_decoder = decoder_config.add_cross_attention = True
    return VisionEncoderDecoderModel.from_encoder_decoder_pretrained(
        str(vit), str(gpt2), decoder_config=decoder_config
    )


def source_tensor(name: str, vit_tensors: dict, gpt2_tensors: dict) -> np.ndarray | None:
    """The source tensor a composed HF name came from, or None for a new one."""
    if name.startswith("encoder."):
        key = name.removeprefix("encoder.")
        keys = (key, "vit." + key, "deit." + key)
        return next((vit_tensors[k] for k in keys if k in vit_tensors), None)
    key = name.removeprefix("decoder.")
    return gpt2_tensors.get(key, gpt2_tensors.get(key.removeprefix("transformer.")))


def is_new(name: str) -> bool:
    return "crossattention" in name or "ln_cross_attn" in name or name.startswith("enc_to_dec")


# Every encoder layout with every decoder layout, each width case twice.
LAYOUTS = [
    ("ViTModel", "GPT2LMHeadModel", 48),
    ("ViTModel", "GPT2Model", 32),
    ("ViTForImageClassification", "GPT2LMHeadModel", 32),
    ("ViTForImageClassification", "GPT2Model", 48),
    ("DeiTModel", "GPT2LMHeadModel", 48),  # DeiT: TrOCR-small's encoder
    ("DeiTForImageClassificationWithTeacher", "GPT2Model", 32),
]


@pytest.mark.parametrize("encoder_cls,decoder_cls,n_embd", LAYOUTS)
def test_compose_matches_transformers(tmp_path, encoder_cls, decoder_cls, n_embd):
    from transformers import VisionEncoderDecoderModel

    vit, gpt2 = make_sources(tmp_path, encoder_cls, decoder_cls, n_embd)
    model = nc.from_encoder_decoder_pretrained(vit, gpt2, seed=3)
    cfg = model.config
    assert (cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id) == (1, 2, 2)
    assert (model.enc_to_dec_proj is not None) == (n_embd != ENC["hidden_size"])
    nc.save_pretrained(model, tmp_path / "ours")
    ref = hf_compose(vit, gpt2)
    ref.save_pretrained(tmp_path / "ref")

    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs = load_file(tmp_path / "ref" / "model.safetensors")
    assert set(ours) == set(theirs)
    vit_t, gpt2_t = load_file(vit / "model.safetensors"), load_file(gpt2 / "model.safetensors")
    n_layer = DEC["n_layer"]
    for name, value in ours.items():
        if "pooler" in name:  # unused by the captioner; transformers initialises it afresh
            continue
        src = source_tensor(name, vit_t, gpt2_t)
        if not is_new(name):
            assert src is not None, name
            np.testing.assert_array_equal(value, src, err_msg=name)
            np.testing.assert_array_equal(value, theirs[name], err_msg=name)
            continue
        assert src is None, name
        want = theirs[name]
        if name.endswith("bias") or "ln_cross_attn" in name:  # zeros, and unit LayerNorm scale
            np.testing.assert_array_equal(value, want, err_msg=name)
            continue
        # normal(0, initializer_range), c_proj at initializer_range / sqrt(2 * n_layer): the
        # same law as transformers' draw (not the same numbers: another generator).
        std = 0.02 / np.sqrt(2 * n_layer) if ".c_proj." in name else 0.02
        assert abs(value.std() - std) < 0.15 * std, (name, value.std(), std)
        assert abs(want.std() - std) < 0.15 * std, (name, want.std(), std)
        assert abs(value.mean()) < 4 * std / np.sqrt(value.size), name

    back = VisionEncoderDecoderModel.from_pretrained(
        tmp_path / "ours", attn_implementation="eager"
    ).eval()
    enc = dict(ENC)
    dec = dict(DEC, n_embd=n_embd)
    pixels, ids, mask = make_inputs(enc, dec)
    want = torch_forward(back, pixels, ids, mask).logits
    got = model(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    # A different seed draws other new weights; the loaded parts stay the sources'.
    other = nc.from_encoder_decoder_pretrained(vit, gpt2, seed=4)
    q = lambda m: np.asarray(m.decoder.blocks[0].cross.q.kernel[...])  # noqa: E731
    assert not np.array_equal(q(other), q(model))
    np.testing.assert_array_equal(
        np.asarray(other.decoder.wte[...]), np.asarray(model.decoder.wte[...])
    )


def test_compose_refuses_wrong_parts(tmp_path):
    vit, gpt2 = make_sources(tmp_path, "ViTModel", "GPT2Model", 48)
    with pytest.raises(nc.ConfigError, match="decoder must be a 'gpt2'"):
        nc.from_encoder_decoder_pretrained(vit, vit)
    with pytest.raises(nc.ConfigError, match="encoder must be a 'vit'"):
        nc.from_encoder_decoder_pretrained(gpt2, gpt2)
    # A stray tensor in the ViT file is named, not skipped.
    tensors = load_file(vit / "model.safetensors")
    tensors["head.weight"] = np.zeros((3, 32), np.float32)
    save_file(tensors, vit / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(nc.CheckpointError, match="unexpected tensor 'head.weight'"):
        nc.from_encoder_decoder_pretrained(vit, gpt2)


def test_compose_cli_then_train(tmp_path, tiny_dir, capsys):
    """HF's workflow: compose (tokenizer and processor files travel), then train on it."""
    import shutil

    from nnx_caption.data import make_shapes

    vit, gpt2 = make_sources(tmp_path, "ViTForImageClassification", "GPT2LMHeadModel", 48)
    out = tmp_path / "composed"
    assert (
        cli(["compose", "--encoder", str(vit), "--decoder", str(gpt2), "--output_dir", str(out)])
        == 0
    )
    err = capsys.readouterr().err
    assert "no tokenizer files" in err and "no preprocessor_config.json" in err
    assert nc.from_pretrained(out).config.pad_token_id == 2

    # With the sources' tokenizer and processor (the tiny checkpoint's: 336 tokens, 32-pixel
    # images; the GPT-2 remade with room for them), the composed folder is ready for `train`.
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_dir / name, gpt2 / name)
    shutil.copy(tiny_dir / "preprocessor_config.json", vit / "preprocessor_config.json")
    import transformers

    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**dict(DEC, vocab_size=512, bos_token_id=0, eos_token_id=0))
    ).save_pretrained(gpt2)
    out2 = tmp_path / "composed2"
    args = ["compose", "--encoder", str(vit), "--decoder", str(gpt2), "--output-dir", str(out2)]
    assert cli(args) == 0
    assert "warning" not in capsys.readouterr().err
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "preprocessor_config.json"):
        assert (out2 / name).exists(), name
    assert cli(args) == 2  # never over an existing folder
    assert "not empty" in capsys.readouterr().err

    splits = make_shapes(str(tmp_path / "data"), n_train=32, n_validation=8, n_test=8)
    run = tmp_path / "run"
    flags = ["train", "--model_name_or_path", str(out2), "--output_dir", str(run), "--do_train"]
    flags += ["--train_file", splits["train"], "--image_column", "file_name"]
    flags += ["--caption_column", "text", "--max_steps", "2", "--max_target_length", "12"]
    flags += ["--per_device_train_batch_size", "8"]
    assert cli(flags) == 0
    trained = nc.from_pretrained(run)
    composed = nc.from_pretrained(out2)
    moved = (
        trained.decoder.blocks[0].cross.q.kernel[...]
        - composed.decoder.blocks[0].cross.q.kernel[...]
    )
    assert float(jnp.abs(moved).max()) > 0


# Other decoder families, as single-model checkpoints: (transformers class, its config).
OTHER_DECODERS = {
    "TrOCRForCausalLM": dict(
        model_type="trocr", vocab_size=90, d_model=48, decoder_layers=2,
        decoder_attention_heads=4, decoder_ffn_dim=40, max_position_embeddings=24,
    ),
    "BertLMHeadModel": dict(
        model_type="bert", vocab_size=80, hidden_size=40, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=56, max_position_embeddings=24,
    ),
    "BertModel": dict(
        model_type="bert", vocab_size=80, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=56, max_position_embeddings=24,
    ),
}  # fmt: skip


@pytest.mark.parametrize("decoder_cls", list(OTHER_DECODERS))
def test_compose_with_other_decoders_matches_transformers(tmp_path, decoder_cls):
    """A DeiT with a TrOCRForCausalLM (whose blocks already cross-attend), a BertLMHeadModel
    and a bare BertModel (no head: it is new): the same tensors as transformers' composition,
    the loaded ones the sources', and transformers' logits for the saved checkpoint."""
    import transformers
    from transformers import AutoConfig, VisionEncoderDecoderModel

    torch.manual_seed(0)
    transformers.DeiTModel(transformers.DeiTConfig(**ENC)).save_pretrained(tmp_path / "deit")
    spec = dict(OTHER_DECODERS[decoder_cls])
    config = AutoConfig.for_model(spec.pop("model_type"), is_decoder=True, **spec)
    getattr(transformers, decoder_cls)(config).save_pretrained(tmp_path / "decoder")
    tokens = dict(decoder_start_token_id=2, eos_token_id=3)
    model = nc.from_encoder_decoder_pretrained(tmp_path / "deit", tmp_path / "decoder", **tokens)
    nc.save_pretrained(model, tmp_path / "ours")
    ref = hf_compose(tmp_path / "deit", tmp_path / "decoder")
    ref.save_pretrained(tmp_path / "ref")

    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs = load_file(tmp_path / "ref" / "model.safetensors")
    assert set(ours) == set(theirs)
    sources = {
        "encoder." + k: v for k, v in load_file(tmp_path / "deit" / "model.safetensors").items()
    }
    prefix = {"BertModel": "decoder.bert."}.get(decoder_cls, "decoder.")
    decoder_file = load_file(tmp_path / "decoder" / "model.safetensors")
    sources |= {prefix + k: v for k, v in decoder_file.items() if not k.startswith("pooler.")}
    new = [name for name in ours if name not in sources and "pooler" not in name]
    for name, value in ours.items():
        if "pooler" in name:  # unused by the captioner; exported as zeros
            continue
        if name in sources:
            np.testing.assert_array_equal(value, sources[name], err_msg=name)
            np.testing.assert_array_equal(value, theirs[name], err_msg=name)
        elif "LayerNorm" in name or name.endswith("bias"):  # ones / zeros, as transformers'
            np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    if decoder_cls == "TrOCRForCausalLM":  # its blocks hold cross-attention: only the width
        assert sorted({n.split(".")[0] for n in new}) == ["enc_to_dec_proj"], new
    else:
        assert any("crossattention" in n for n in new), new
        assert ("decoder.cls.predictions.bias" in new) == (decoder_cls == "BertModel"), new

    back = VisionEncoderDecoderModel.from_pretrained(
        tmp_path / "ours", attn_implementation="eager"
    ).eval()
    dec = dict(vocab_size=spec["vocab_size"])
    pixels, ids, mask = make_inputs(ENC, dec)
    want = torch_forward(back, pixels, ids, mask).logits
    got = model(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
