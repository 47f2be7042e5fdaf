"""`nnx-caption train` on a DeiT + TrOCR captioner (trocr-small's families) on the shapes
data: it trains, evaluates and exports a checkpoint that transformers loads with our logits;
`predict` captions with it."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from shapes_runs import cli, train_args
from transformers import VisionEncoderDecoderModel

import nnx_caption as nc


def test_a_deit_trocr_captioner_trains_exports_and_predicts(setup, tmp_path):
    init = tmp_path / "init"
    config = nc.from_pretrained(setup["init"]).config  # the shapes tokenizer's vocabulary, ids
    decoder = nc.TrOCRConfig(
        vocab_size=config.decoder.vocab_size, d_model=24, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=48, max_position_embeddings=20,
        activation_function="relu", scale_embedding=True, tie_word_embeddings=False,
        cross_attention_hidden_size=config.encoder.hidden_size,
        pad_token_id=config.pad_token_id, bos_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
    )  # fmt: skip
    encoder = nc.DeiTConfig(**dataclasses.asdict(config.encoder))
    config = dataclasses.replace(config, encoder=encoder, decoder=decoder)
    nc.save_pretrained(nc.VisionEncoderDecoder(config, rngs=nnx.Rngs(0)), init)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (init / name).write_bytes((setup["init"] / name).read_bytes())

    out = tmp_path / "run"
    args = train_args(dict(setup, init=init), out)
    args[args.index("--max_steps") + 1] = "8"
    validation = ["--validation_file", setup["splits"]["validation"], "--do_eval"]
    done = cli(*args, *validation, "--predict_with_generate")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert losses[-1] < losses[0], losses
    assert len(json.loads((out / "generated_eval.json").read_text())) == 32

    ours = nc.from_pretrained(out)
    assert type(ours.decoder).__name__ == "TrOCR" and type(ours.encoder).__name__ == "DeiT"
    back = VisionEncoderDecoderModel.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back.decoder).__name__ == "TrOCRForCausalLM"
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 32, 32, 3), dtype=np.float32)
    ids = rng.integers(0, decoder.vocab_size, (2, 6))
    with torch.no_grad():
        want = back(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            decoder_input_ids=torch.from_numpy(ids),
        ).logits.numpy()
    got = ours(jnp.asarray(pixels), jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    done = cli(
        "predict", str(out), setup["splits"]["validation"], "--output-dir", str(tmp_path / "p")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((tmp_path / "p" / "predictions.jsonl").read_text().splitlines()) == 32
