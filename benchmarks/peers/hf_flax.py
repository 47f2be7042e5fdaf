"""Benchmark peer: Hugging Face's FlaxVisionEncoderDecoderModel (transformers 4.57.x, the last
release line that ships the Flax models) on the current jax/flax, timed on the caller's inputs.

    benchmarks/peers/setup_hf_flax.sh   # once: creates benchmarks/.venv-hf-flax
    benchmarks/.venv-hf-flax/bin/python benchmarks/peers/hf_flax.py --checkpoint DIR \\
        --inputs FILE.npz --task train|decode [--repeats 5] [--beams 4] [--max-length 16] \\
        [--dtype float32|bfloat16] [--no-dropout]

DIR is a PyTorch-format checkpoint (config.json + model.safetensors, as written by transformers'
VisionEncoderDecoderModel.save_pretrained). FILE.npz holds `pixel_values` (B, H, W, 3) float32
NHWC and, for --task train, `decoder_input_ids`, `labels` (-100 on padding) and
`decoder_attention_mask`, all (B, T) int32.

The train step and the generate step mirror HF's
examples/flax/image-captioning/run_image_captioning_flax.py: its TrainState with a dropout rng,
its loss (optax softmax cross-entropy against one-hot labels, label smoothing 0, summed over the
tokens that decoder_attention_mask keeps and divided by their count), optax.adamw with its
linear-decay schedule and weight-decay mask, `train=True`; and its `generate_step`. Where the
script used jax.pmap over all devices, this uses jax.jit on one (the state donated, as there).

--task train times the first step (compile + run) apart, then one warm-up step, then the median
of --repeats steps; --task decode does the same with generate(). Each call ends in
block_until_ready. Everything is logged to stderr; the last thing printed is ONE JSON line on
stdout: task, first_s, median_s, times_s, peak_rss_mib, losses (train) or sequences (decode),
versions.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from flax import traverse_util
from flax.training import train_state
from flax.training.common_utils import onehot
from safetensors import safe_open
from transformers import (
    FlaxPreTrainedModel,
    FlaxVisionEncoderDecoderModel,
    VisionEncoderDecoderConfig,
)
from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor

# transformers 4.57 warns on import that its Flax classes are deprecated; that is the point here.
warnings.filterwarnings("ignore", message=".*JAX classes are deprecated.*")
transformers.logging.set_verbosity_error()

Batch = dict[str, jax.Array]


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# Loading --------------------------------------------------------------------------------------


def load(checkpoint: Path, dtype: jnp.dtype) -> tuple[FlaxVisionEncoderDecoderModel, dict]:
    """The Flax model (computing in `dtype`, as the HF script's --dtype) and its fp32 params.

    `from_pretrained(checkpoint)` works too (it converts 'pt' safetensors without torch), but it
    first initialises a full random copy of the weights, which costs ~30 s and ~1.2 GiB of peak
    RSS that would be charged to this peer. `_do_init=False` skips that (only the shapes are
    traced); the conversion is then done here with transformers' own PyTorch -> Flax key
    renaming and reshaping, and the params are passed to every call."""
    config = VisionEncoderDecoderConfig.from_pretrained(checkpoint)
    model = uninitialized_model(config, dtype)
    expected = traverse_util.flatten_dict(model.params_shape_tree)
    params = {}
    # framework="flax", as transformers' own loader: numpy has no bfloat16.
    with safe_open(str(checkpoint / "model.safetensors"), framework="flax") as f:
        for name in f.keys():
            key, tensor = rename_key_and_reshape_tensor(
                tuple(name.split(".")), f.get_tensor(name), expected, model.base_model_prefix
            )
            if key not in expected:
                raise ValueError(f"checkpoint weight {name} has no place in the Flax model")
            if tensor.shape != expected[key].shape:
                raise ValueError(f"{name}: shape {tensor.shape}, Flax wants {expected[key].shape}")
            params[key] = jnp.asarray(tensor)
    missing = set(expected) - set(params)
    if missing:
        raise ValueError(f"checkpoint lacks {sorted('.'.join(k) for k in missing)}")
    return model, traverse_util.unflatten_dict(params)


def uninitialized_model(
    config: VisionEncoderDecoderConfig, dtype: jnp.dtype
) -> FlaxVisionEncoderDecoderModel:
    """FlaxVisionEncoderDecoderModel(config, dtype=dtype, _do_init=False).

    Workaround: that class's __init__ refuses `_do_init=False` outright, although nothing it runs
    needs initialised params once they are passed explicitly (encode/decode/__call__ take
    `params or self.params`). So build its module and run the base class's __init__ directly,
    with the input shapes the class's own __init__ would use."""
    model = FlaxVisionEncoderDecoderModel.__new__(FlaxVisionEncoderDecoderModel)
    size, channels = config.encoder.image_size, getattr(config.encoder, "num_channels", 3)
    FlaxPreTrainedModel.__init__(
        model,
        config,
        FlaxVisionEncoderDecoderModel.module_class(config=config, dtype=dtype),
        input_shape=((1, size, size, channels), (1, 1)),
        dtype=dtype,
        _do_init=False,
    )
    return model


def to_nchw(pixel_values: np.ndarray) -> jax.Array:
    """HF's Flax vision models take PyTorch's NCHW and transpose to NHWC inside (in the jitted
    graph), so the caller's NHWC pixels are handed over as NCHW."""
    return jnp.asarray(np.ascontiguousarray(pixel_values.transpose(0, 3, 1, 2)))


# Train (run_image_captioning_flax.py) ---------------------------------------------------------


class TrainState(train_state.TrainState):
    dropout_rng: jax.Array


def create_learning_rate_fn(
    num_train_steps: int, num_warmup_steps: int, learning_rate: float
) -> Callable[[int], jax.Array]:
    """The script's linear warmup, then linear decay to 0 at num_train_steps."""
    warmup_fn = optax.linear_schedule(0.0, learning_rate, transition_steps=num_warmup_steps)
    decay_fn = optax.linear_schedule(
        learning_rate, 0, transition_steps=num_train_steps - num_warmup_steps
    )
    return optax.join_schedules([warmup_fn, decay_fn], boundaries=[num_warmup_steps])


def decay_mask_fn(params: dict) -> dict:
    """The script's AdamW mask: decay everything but biases and LayerNorm scales."""
    flat_params = traverse_util.flatten_dict(params)
    layer_norm_candidates = ["layernorm", "layer_norm", "ln"]
    layer_norm_named_params = {
        layer[-2:]
        for layer_norm_name in layer_norm_candidates
        for layer in flat_params
        if layer_norm_name in "".join(layer).lower()
    }
    flat_mask = {
        path: (path[-1] != "bias" and path[-2:] not in layer_norm_named_params)
        for path in flat_params
    }
    return traverse_util.unflatten_dict(flat_mask)


def loss_fn(
    logits: jax.Array, labels: jax.Array, padding_mask: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """The script's label-smoothed cross-entropy: (summed loss, number of counted tokens).
    A -100 label one-hots to all zeros, and its position is masked out anyway."""
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = (1.0 - confidence) / (vocab_size - 1)
    normalizing_constant = -(
        confidence * jnp.log(confidence)
        + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20)
    )
    soft_labels = onehot(labels, vocab_size, on_value=confidence, off_value=low_confidence)
    loss = optax.softmax_cross_entropy(logits, soft_labels) - normalizing_constant
    loss = (loss * padding_mask).sum()
    return loss, padding_mask.sum()


def make_train_step(
    lr_fn: Callable[[int], jax.Array], dropout: bool
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The script's train_step; with one device its psums over "batch" are the identity."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        dropout_rng, new_dropout_rng = jax.random.split(state.dropout_rng)

        def compute_loss(params: dict) -> tuple[jax.Array, jax.Array]:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = state.apply_fn(
                **inputs, params=params, dropout_rng=dropout_rng, train=dropout
            )[0]
            return loss_fn(logits, batch["labels"], batch["decoder_attention_mask"])

        (loss, num_labels), grad = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        loss = loss / num_labels
        grad = jax.tree_util.tree_map(lambda x: x / num_labels, grad)
        new_state = state.apply_gradients(grads=grad, dropout_rng=new_dropout_rng)
        return new_state, {"loss": loss, "learning_rate": lr_fn(state.step)}

    return train_step


def run_train(
    model: FlaxVisionEncoderDecoderModel, params: dict, inputs: dict[str, np.ndarray], args
) -> dict[str, Any]:
    labels = inputs["labels"]
    mask = inputs["decoder_attention_mask"]
    if not np.array_equal(mask.astype(bool), labels != -100):
        log("warning: decoder_attention_mask differs from labels != -100; the loss uses the mask")
    batch = {
        "pixel_values": to_nchw(inputs["pixel_values"]),
        "decoder_input_ids": jnp.asarray(inputs["decoder_input_ids"], jnp.int32),
        "decoder_attention_mask": jnp.asarray(mask, jnp.int32),
        "labels": jnp.asarray(labels, jnp.int32),
    }
    lr_fn = create_learning_rate_fn(args.total_steps, 0, args.learning_rate)
    adamw = optax.adamw(
        learning_rate=lr_fn,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=args.weight_decay,
        mask=decay_mask_fn,
    )
    _, dropout_rng = jax.random.split(jax.random.PRNGKey(args.seed))  # as the script
    state = TrainState.create(
        apply_fn=model.__call__, params=params, tx=adamw, dropout_rng=dropout_rng
    )
    del params  # the state owns them now; donation frees the old copies each step
    step = jax.jit(make_train_step(lr_fn, dropout=not args.no_dropout), donate_argnums=(0,))

    losses, times = [], []
    for i in range(args.repeats + 2):  # first call, one warm-up, then the timed repeats
        start = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(jax.block_until_ready(metrics["loss"]))
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - start)
        losses.append(loss)
        log(f"train step {i}: {times[-1]:.3f} s, loss {loss:.6f}")
    return {"first_s": times[0], "times_s": times[2:], "losses": losses[:3]}


# Decode (the script's generate_step) ----------------------------------------------------------


def run_decode(
    model: FlaxVisionEncoderDecoderModel, params: dict, inputs: dict[str, np.ndarray], args
) -> dict[str, Any]:
    gen_kwargs = {
        "max_length": args.max_length,
        # EOS suppressed until max_length (FlaxMinLengthLogitsProcessor), so every run decodes
        # the full length and the work is the same for every peer.
        "min_length": args.max_length,
        "num_beams": args.beams,
    }

    def generate_step(params: dict, pixel_values: jax.Array) -> jax.Array:
        # The script set `model.params = params` first; a `_do_init=False` model takes them as
        # an argument instead (same trace). generate() runs its loop in lax.while_loop.
        return model.generate(pixel_values, params=params, **gen_kwargs).sequences

    generate = jax.jit(generate_step)
    pixel_values = to_nchw(inputs["pixel_values"])
    times = []
    for i in range(args.repeats + 2):
        start = time.perf_counter()
        sequences = jax.block_until_ready(generate(params, pixel_values))
        times.append(time.perf_counter() - start)
        log(f"generate {i}: {times[-1]:.3f} s")
    return {
        "first_s": times[0],
        "times_s": times[2:],
        "sequences": np.asarray(sequences).tolist(),
    }


# Main -----------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--task", choices=["train", "decode"], required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--max-length", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--learning-rate", type=float, default=5e-5)  # the script's defaults
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--total-steps", type=int, default=1000, help="length of the linear decay")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--no-dropout",
        action="store_true",
        help="train step with train=False: deterministic losses, comparable to a reference",
    )
    args = p.parse_args(argv)

    start = time.perf_counter()
    model, params = load(args.checkpoint, getattr(jnp, args.dtype))
    jax.block_until_ready(params)
    load_s = time.perf_counter() - start
    load_rss = peak_rss_mib()
    log(f"loaded {args.checkpoint} in {load_s:.1f} s, peak RSS {load_rss:.0f} MiB")

    with np.load(args.inputs) as npz:
        inputs = {k: npz[k] for k in npz.files}
    run = run_train if args.task == "train" else run_decode
    result = run(model, params, inputs, args)

    out = {
        "task": args.task,
        "batch": int(inputs["pixel_values"].shape[0]),
        "dtype": args.dtype,
        **({"beams": args.beams, "max_length": args.max_length} if args.task == "decode" else {}),
        **({"dropout": not args.no_dropout} if args.task == "train" else {}),
        "first_s": result["first_s"],
        "median_s": statistics.median(result["times_s"]),
        "times_s": result["times_s"],
        "load_s": load_s,
        "load_peak_rss_mib": load_rss,
        "peak_rss_mib": peak_rss_mib(),
        **{k: v for k, v in result.items() if k in ("losses", "sequences")},
        "versions": {
            "transformers": transformers.__version__,
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
        },
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
