"""How close the two searches issue 3 targets are to this machine's limits.

    .venv/bin/python benchmarks/decode_floor.py [--repeats 10]

Greedy at batch 1 multiplies one row by every decoder weight per step, so it is bound by how
fast the weights stream from memory. Beam 4 at batch 8 multiplies 32 rows, so it is bound by how
fast XLA runs 32-row matmuls. This measures, in one process:
- read bandwidth: jnp.sum over an array the size of the decoder's per-step weights (or the
  one-row matmuls below, where they read faster);
- the 12 GPT-2 blocks' matmuls (c_attn, c_proj, cross q, cross c_proj, MLP) at 1 and 32 rows,
  with the kernels stored (in, out) as nnx-caption and HF's GPT-2 store them, and (out, in);
  and the tied LM head's matmul at 32 rows;
- nnx-caption's encoder + cross-attention K/V, its whole search (max_length 16, EOS
  suppressed, as benchmarks/decode.py) and transformers' generate() (PyTorch, CPU) on the same
  images, for greedy at batch 1 and beam 4 at batch 8.
Each search's floor is encoder + K/V + 15 steps of its bound: for greedy, the weights and LM
head read at the bandwidth; for beam 4, the blocks' and LM head's matmuls at 32 rows as XLA
runs them, every other op of a step (attention, cache reorder, top-k) counted as free.
Results: the "Decode floor" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from common import (
    ensure_checkpoint,
    machine,
    machine_line,
    peak_flops,
    timed,
    update_results_md,
)

STEPS = 15  # max_length 16 counts the start token


def median_seconds(fn, repeats: int) -> float:
    """Median of `repeats` calls after a warm-up one, waiting for jax's results."""
    import jax

    return timed(lambda: jax.block_until_ready(fn()), repeats)[1]


def block_matmul_seconds(cfg, repeats: int) -> tuple[dict, int]:
    """One decode step's matmuls through the GPT-2 blocks (random kernels of the config's
    shapes), at 1 and 32 rows, kernels stored (in, out) and (out, in); and their bytes."""
    import jax
    import jax.numpy as jnp

    e, inner = cfg.n_embd, cfg.inner_size
    shapes = [(e, 3 * e), (e, e), (e, e), (e, e), (e, inner), (inner, e)]
    rng = np.random.default_rng(0)
    in_out = [
        [jnp.asarray(0.02 * rng.standard_normal(s, np.float32)) for s in shapes]
        for _ in range(cfg.n_layer)
    ]
    out_in = [[w.T.copy() for w in layer] for layer in in_out]

    def blocks(x, kernels, transposed):
        mm = (lambda a, w: a @ w.T) if transposed else (lambda a, w: a @ w)
        for qkv, o, cross_q, cross_o, fc, proj in kernels:
            x = x + mm(mm(x, qkv)[:, :e], o)
            x = x + mm(mm(x, cross_q), cross_o)
            x = x + mm(jnp.tanh(mm(x, fc)), proj)
        return x

    seconds = {}
    for rows in (1, 32):
        x = jnp.full((rows, e), 0.01, jnp.float32)
        for name, kernels, transposed in (
            ("(in, out)", in_out, False),
            ("(out, in)", out_in, True),
        ):
            run = jax.jit(lambda x, k, t=transposed: blocks(x, k, t))
            seconds[rows, name] = median_seconds(lambda: run(x, kernels), repeats)
    return seconds, sum(w.nbytes for layer in in_out for w in layer)


def read_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second that jnp.sum reads from an array of `nbytes`."""
    import jax
    import jax.numpy as jnp

    data = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    return nbytes / median_seconds(lambda: total(data), repeats)


def lm_head_seconds(wte, rows: int, repeats: int) -> float:
    """The tied LM head's matmul for `rows` rows, as the decoder runs it."""
    import jax
    import jax.numpy as jnp

    x = jnp.full((rows, wte.shape[1]), 0.01, jnp.float32)
    head = jax.jit(lambda x, w: jnp.einsum("te,ve->tv", x, w))
    return median_seconds(lambda: head(x, wte), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-md", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    directory = ensure_checkpoint()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import VisionEncoderDecoderModel

    import nnx_caption as nc

    model = nc.from_pretrained(directory)
    cfg = model.config.decoder
    layout, block_bytes = block_matmul_seconds(cfg, args.repeats)
    step_bytes = block_bytes + cfg.vocab_size * cfg.n_embd * 4  # + the tied LM head
    # The best read rate seen: jnp.sum's, or the one-row matmuls' if they stream faster.
    one_row = min(layout[1, name] for name in ("(in, out)", "(out, in)"))
    bandwidth = max(read_bandwidth(step_bytes, args.repeats), block_bytes / one_row)
    head_32 = lm_head_seconds(model.decoder.wte[...], 32, args.repeats)
    step_32 = layout[32, "(in, out)"] + head_32  # the matmuls of one beam 4 x batch 8 step
    step_flop = 2 * 32 * (block_bytes // 4 + cfg.vocab_size * cfg.n_embd)  # 4 bytes a weight
    peak, peak_source = peak_flops("float32")

    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, pixels):
        model = nnx.merge(graphdef, state)
        return model.decoder.cross_kv(model.encode(pixels))

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    reference = VisionEncoderDecoderModel.from_pretrained(directory).eval()
    seconds = {}  # (batch, beams) -> encoder, ours, PyTorch
    search_repeats = max(3, args.repeats // 3)
    for batch, beams in ((1, 1), (8, 4)):
        rng = np.random.default_rng(batch)
        images = rng.standard_normal((batch, 224, 224, 3), np.float32)
        pixels = jnp.asarray(images)
        kw = dict(max_length=STEPS + 1, min_length=STEPS + 1, num_beams=beams)
        torch_pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
        with torch.no_grad():
            torch_s = median_seconds(
                lambda: reference.generate(pixel_values=torch_pixels, **kw), search_repeats
            )
        seconds[batch, beams] = (
            median_seconds(lambda: encode(state, pixels), args.repeats),
            median_seconds(lambda: nc.generate(model, pixels, **kw).sequences, search_repeats),
            torch_s,
        )

    def compare(encoder_s: float, search_s: float, floor_s: float, torch_s: float) -> str:
        return (
            f"nnx-caption takes {search_s / floor_s:.2f}x the floor, {torch_s / search_s:.2f}x "
            f"faster than PyTorch; at the floor it would be {torch_s / floor_s:.2f}x faster. A "
            f"step takes {1e3 * (search_s - encoder_s) / STEPS:.1f} ms (Python dispatch included)"
        )

    encoder_s, search_s, torch_s = seconds[1, 1]
    floor_s = encoder_s + STEPS * step_bytes / bandwidth
    lines = [
        "## Decode floor",
        "",
        machine_line(machine()),
        "",
        "Command: `.venv/bin/python benchmarks/decode_floor.py`",
        "",
        "| GPT-2 blocks' matmuls, one step | rows | kernels (in, out) ms | kernels (out, in) ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for rows in (1, 32):
        lines.append(
            f"| {cfg.n_layer} blocks, {block_bytes / 2**20:.0f} MiB of fp32 weights | {rows} | "
            f"{1e3 * layout[rows, '(in, out)']:.1f} | {1e3 * layout[rows, '(out, in)']:.1f} |"
        )
    at_bandwidth = block_bytes / bandwidth
    lines += [
        "",
        f"Read bandwidth (the faster of jnp.sum over {step_bytes / 2**20:.0f} MiB and the "
        f"one-row matmuls above): {bandwidth / 1e9:.1f} GB/s, so the blocks' weights take at "
        f"least {1e3 * at_bandwidth:.1f} ms to read.",
        "",
        "| greedy, batch 1, max_length 16 | seconds |",
        "| --- | ---: |",
        f"| encoder + cross-attention K/V (measured) | {encoder_s:.3f} |",
        f"| floor: that + {STEPS} steps x {step_bytes / 2**20:.0f} MiB at the bandwidth | "
        f"{floor_s:.3f} |",
        f"| nnx-caption generate() (measured) | {search_s:.3f} |",
        f"| transformers generate(), PyTorch (measured) | {torch_s:.3f} |",
        "",
        f"{compare(encoder_s, search_s, floor_s, torch_s)} against "
        f"{1e3 * step_bytes / bandwidth:.1f} ms at full bandwidth.",
    ]
    encoder_s, search_s, torch_s = seconds[8, 4]
    floor_s = encoder_s + STEPS * step_32
    lines += [
        "",
        "| beam 4, batch 8, max_length 16 | seconds |",
        "| --- | ---: |",
        f"| encoder + cross-attention K/V, 8 images (measured) | {encoder_s:.3f} |",
        f"| floor: that + {STEPS} steps x (the blocks' matmuls at 32 rows, (in, out), + the LM "
        f"head's at 32 rows, {1e3 * head_32:.1f} ms) | {floor_s:.3f} |",
        f"| nnx-caption generate() (measured) | {search_s:.3f} |",
        f"| transformers generate(), PyTorch (measured) | {torch_s:.3f} |",
        "",
        f"{compare(encoder_s, search_s, floor_s, torch_s)} against the matmuls' "
        f"{1e3 * step_32:.1f} ms. Those 32-row matmuls run at "
        f"{step_flop / step_32 / 1e9:.0f} GFLOP/s, {100 * step_flop / step_32 / peak:.0f}% of "
        f"the {peak / 1e9:.0f} GFLOP/s peak ({peak_source}).",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_md:
        update_results_md("Decode floor", section)


if __name__ == "__main__":
    main()
