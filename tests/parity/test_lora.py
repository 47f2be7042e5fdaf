"""LoRA adapters: only they train, the model starts unchanged, and the merged export is a
plain HF checkpoint whose logits (in transformers) equal the adapted model's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parity.test_families import BERT, TROCR_SMALL
from reference import CONFIGS, build_hf_model, make_inputs, random_train_batches, torch_forward

import nnx_caption as nc
from nnx_caption.lora import add_lora, merge_lora
from nnx_caption.train import TrainConfig, Trainer

# (encoder, decoder, adapters): encoder q, k, v, o, fc, proj; GPT-2 qkv, o, cross q, kv, o,
# fc, proj; TrOCR and BERT q, k, v, o, cross q, k, v, o, fc, proj; 2 layers each.
PAIRINGS = {
    "vit_gpt2": (*CONFIGS["proj_gelu"], 2 * 6 + 2 * 7),
    "deit_trocr": (dict(CONFIGS["proj_gelu"][0], model_type="deit"), TROCR_SMALL, 2 * 6 + 2 * 10),
    "vit_bert": (CONFIGS["proj_gelu"][0], dict(BERT, bos_token_id=2, eos_token_id=3), 32),
}


@pytest.mark.parametrize("pairing", list(PAIRINGS))
def test_lora_trains_adapters_only_and_merges_into_hf_weights(tmp_path, pairing):
    enc, dec, adapters = PAIRINGS[pairing]
    build_hf_model(enc, dec, scale=2.0).save_pretrained(tmp_path / "base")
    model = nc.from_pretrained(tmp_path / "base")
    pixels, ids, mask = (jnp.asarray(a) for a in make_inputs(enc, dec))
    before = model(pixels, ids, mask)
    frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert add_lora(model, rank=4) == adapters
    np.testing.assert_allclose(model(pixels, ids, mask), before, atol=1e-6)  # B starts at 0

    trainer = Trainer(model, TrainConfig(learning_rate=1e-2, total_steps=5, lora=True))
    for batch in random_train_batches(dec["vocab_size"], steps=3, batch=4, length=5):
        trainer.train_step(batch)
    trained = trainer.model
    after = trained(pixels, ids, mask)
    assert np.abs(np.asarray(after - before)).max() > 1e-3
    # Base weights did not move; only the adapters did.
    for (path, old), new in zip(
        nnx.to_flat_state(frozen),
        [
            v
            for p, v in nnx.to_flat_state(nnx.state(trained, nnx.Param))
            if "lora" not in map(str, p)
        ],
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(new[...]), old[...], err_msg=str(path))

    merge_lora(trained)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(trained))
    np.testing.assert_allclose(trained(pixels, ids, mask), after, atol=1e-5)
    nc.save_pretrained(trained, tmp_path / "merged")
    from transformers import VisionEncoderDecoderModel

    ref = VisionEncoderDecoderModel.from_pretrained(tmp_path / "merged").eval()
    want = torch_forward(ref, *(np.asarray(a) for a in (pixels, ids, mask))).logits
    np.testing.assert_allclose(np.asarray(after), want, atol=1e-4)
