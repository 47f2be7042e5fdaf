"""Run in its own process: 8 simulated CPU devices must be set before jax is imported."""

import dataclasses
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import nnx_caption as nc  # noqa: E402
from nnx_caption.config import BertConfig, DeiTConfig, TrOCRConfig  # noqa: E402
from nnx_caption.hf import path_str  # noqa: E402
from nnx_caption.sharding import batch_sharding, make_mesh  # noqa: E402


def main(tiny_dir: str, meshes: list[tuple[int, int, int]]) -> None:
    """Logits of weights/tiny's architecture, sharded on each mesh vs one device (computed
    once). The weights are our own init (std 0.02): weights/tiny's are scaled up (std 0.4) so
    that its random generations end, which amplifies float rounding (batch 2 vs 8 already
    moves its logits by 2e-4)."""
    golden = np.load(os.path.join(tiny_dir, "golden.npz"))
    config = nc.from_pretrained(tiny_dir).config
    # Our constructor draws with the config's initializer_range, 0.4 for weights/tiny.
    config = dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, initializer_range=0.02)
    )
    tiny = tempfile.mkdtemp()
    nc.save_pretrained(nc.VisionEncoderDecoder(config, rngs=nnx.Rngs(0)), tiny)
    single = nc.from_pretrained(tiny)
    # Batch 8 (the golden pair, tiled) so that every data-parallel shard gets rows.
    inputs = [
        jnp.asarray(np.concatenate([golden[k]] * 4))
        for k in ("pixel_values", "decoder_input_ids", "decoder_attention_mask")
    ]
    want = nnx.jit(lambda m, *xs: m(*xs))(single, *inputs)
    # Search over the mesh's batch axes: weights/tiny (large logit margins), 8 images.
    pixels = jnp.asarray(np.concatenate([golden["pixel_values"]] * 4))
    searches = (dict(max_length=12), dict(max_length=12, num_beams=3))
    reference = nc.from_pretrained(tiny_dir)
    want_tokens = [nc.generate(reference, pixels, **kw).sequences for kw in searches]
    results = {}
    for data, fsdp, tensor in meshes:
        mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor)
        model = nc.from_pretrained(tiny, mesh=mesh)
        specs = {
            path_str(p): str(tuple(v[...].sharding.spec))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        }
        batch = batch_sharding(mesh)  # the rules' batch split, as training and generate use
        with jax.set_mesh(mesh):
            placed = [jax.device_put(x, batch) for x in inputs]
            got = nnx.jit(lambda m, *xs: m(*xs))(model, *placed)
        tiny_model = nc.from_pretrained(tiny_dir, mesh=mesh)
        same_generation = all(
            np.array_equal(nc.generate(tiny_model, pixels, mesh=mesh, **kw).sequences, tokens)
            for kw, tokens in zip(searches, want_tokens, strict=True)
        )
        results[f"{data},{fsdp},{tensor}"] = {
            "same_generation": same_generation,
            "devices": jax.device_count(),
            "max_diff_vs_single": float(jnp.abs(got - want).max()),
            "max_abs_logit": float(jnp.abs(want).max()),
            "specs": specs,
        }
    encoder = DeiTConfig(**dataclasses.asdict(config.encoder))
    deit = dataclasses.replace(config, encoder=encoder)
    results["deit"] = other_families(deit, inputs)
    trocr = TrOCRConfig(
        vocab_size=config.decoder.vocab_size, d_model=32, decoder_layers=2,
        decoder_attention_heads=4, decoder_ffn_dim=64, max_position_embeddings=32,
        cross_attention_hidden_size=encoder.hidden_size, tie_word_embeddings=False,
        pad_token_id=config.pad_token_id,
    )  # fmt: skip
    results["deit_trocr"] = other_families(dataclasses.replace(deit, decoder=trocr), inputs)
    bert = BertConfig(
        vocab_size=config.decoder.vocab_size, hidden_size=40, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=56, max_position_embeddings=32,
        pad_token_id=config.pad_token_id,
    )  # fmt: skip
    results["vit_bert"] = other_families(dataclasses.replace(config, decoder=bert), inputs)
    print(json.dumps(results))


def other_families(config, inputs) -> dict:
    """Another pairing of families on the same inputs, sharded on (2, 2, 2) with scan and
    remat, against one device."""
    from nnx_caption.execution import Execution

    path = tempfile.mkdtemp()
    nc.save_pretrained(nc.VisionEncoderDecoder(config, rngs=nnx.Rngs(1)), path)
    want = nnx.jit(lambda m, *xs: m(*xs))(nc.from_pretrained(path), *inputs)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = nc.from_pretrained(path, mesh=mesh, execution=Execution(scan=True, remat=True))
    with jax.set_mesh(mesh):
        placed = [jax.device_put(x, batch_sharding(mesh)) for x in inputs]
        got = nnx.jit(lambda m, *xs: m(*xs))(sharded, *placed)
    specs = {
        path_str(p): str(tuple(v[...].sharding.spec))
        for p, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))
    }
    return {"max_diff_vs_single": float(jnp.abs(got - want).max()), "specs": specs}


if __name__ == "__main__":  # sharded_forward.py TINY_DIR D,F,T [D,F,T ...]
    main(sys.argv[1], [tuple(map(int, m.split(","))) for m in sys.argv[2:]])
