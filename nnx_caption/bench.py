"""`nnx-caption bench`: step time, MFU and memory of training and decoding, for any
configuration, on whatever backend jax runs.

It times the code that `train` and `generate` run (Trainer.train_step, nc.generate), not a
copy. Every timed call blocks on its result; the first call, which compiles, is timed apart.
FLOPs are model FLOPs: training's from XLA's cost analysis of the unrolled step without remat
(flops.xla_train_step), with the analytic count beside it; decoding's analytic, since XLA
counts a while loop's body once. MFU = FLOPs per step / step time / the devices' peak. The peak
comes from PEAKS, keyed by the exact device_kind jax reports, or on CPU from a matmul timed
here; an unknown accelerator reports no peak and no MFU rather than a guess.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from nnx_caption import config as config_lib
from nnx_caption import flops, processes
from nnx_caption.config import ConfigError
from nnx_caption.data import process_rows
from nnx_caption.distributed import DistributedArgs
from nnx_caption.errors import UsageError
from nnx_caption.flags import CaptionsPerImage, ModelArgs, add_flags, from_namespace
from nnx_caption.generate import generate
from nnx_caption.loading import init_model
from nnx_caption.options import at_least, flag, one_of
from nnx_caption.train import TrainConfig, Trainer

# Dense peak FLOP/s of one chip, (bfloat16, float32), by the device_kind jax reports. float32
# is what XLA's default precision makes of a float32 matmul there (FP32_POLICY).
PEAKS: dict[str, tuple[float, float]] = {
    "NVIDIA A100-SXM4-40GB": (312e12, 156e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 156e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 156e12),
    "NVIDIA A100 80GB PCIe": (312e12, 156e12),
    "NVIDIA H100 80GB HBM3": (989e12, 494e12),  # SXM
    "NVIDIA H100 PCIe": (756e12, 378e12),
    "NVIDIA H200": (989e12, 494e12),
    "NVIDIA B200": (2250e12, 1100e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),  # v5e
    "TPU v5": (459e12, 459e12),  # v5p
    "TPU v5p": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),  # v6e (Trillium)
}
FP32_POLICY = {
    "gpu": "float32 matmuls at XLA's default precision run on TF32 tensor cores",
    "tpu": "float32 matmuls at XLA's default precision run as one bfloat16 MXU pass",
    "cpu": "float32 matmuls in float32 (the measured peak is float32's)",
}
PRESETS = ("tiny", "vit_gpt2_base")


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
    """This machine's measured matmul FLOP/s in jax (n x n @ n x n, best of `repeats`), on the
    default device: the peak that MFU is taken against on CPU."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def chip_peak(dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for `dtype` matmuls, where it comes from). On CPU, the
    matmul peak measured here: simulated devices share the host's cores, so it is the host's."""
    device = jax.devices()[0]
    kind = device.device_kind
    if device.platform == "cpu":
        return matmul_peak(dtype), f"measured {dtype} matmul peak of this host ({kind})"
    if kind not in PEAKS:
        return None, f"unknown device_kind {kind!r}: add its peaks to nnx_caption.bench.PEAKS"
    bf16, fp32 = PEAKS[kind]
    if dtype in ("bfloat16", "float16"):
        return bf16, f"{kind} vendor dense {dtype} peak"
    return fp32, f"{kind} vendor dense float32 peak; {FP32_POLICY[device.platform]}"


def peak_flops(dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of all devices together, where it comes from): the host's on CPU."""
    peak, source = chip_peak(dtype)
    if peak is None or jax.devices()[0].platform == "cpu":
        return peak, source
    return peak * jax.device_count(), f"{source} x {jax.device_count()} devices"


def software() -> dict[str, str]:
    names = ("jax", "jaxlib", "flax", "optax", "nnx-caption")
    versions = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {"python": platform.python_version(), **versions}


def timed(fn: Callable[[], object], steps: int, warmup: int) -> tuple[dict, list]:
    """The first call (compile + run), `warmup` untimed calls, then `steps` timed ones:
    (times, every call's output). `fn` must block on its result, or the times measure
    dispatch only."""
    start = time.perf_counter()
    outputs = [fn()]
    first = time.perf_counter() - start
    outputs += [fn() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        outputs.append(fn())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return dict(
        compile_s=max(first - median, 0.0),
        first_call_s=first,
        step_time_s=median,
        step_time_spread_s=max(times) - min(times),
        step_times_s=times,
    ), outputs


def peak_memory() -> tuple[int, str]:
    """(bytes, what they are): the largest device's peak allocation, or on CPU (whose devices
    are host memory) the process's peak resident set."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return max(s["peak_bytes_in_use"] for s in stats), "peak_bytes_in_use of the fullest device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


@dataclasses.dataclass(frozen=True)
class BenchArgs(ModelArgs, TrainConfig, CaptionsPerImage, DistributedArgs):
    """What to time, and how. The flags of `bench` are these, the model's (ModelArgs) and the
    train step's (TrainConfig: accumulation, clipping, freezing, label smoothing; LoRA is
    ModelArgs' --lora_rank), each spelled, defaulted and checked as for `train`: the step
    timed is the one `train` runs with the same flags."""

    preset: str | None = flag(
        None, f"random weights of a built-in configuration: {' | '.join(PRESETS)}", one_of(*PRESETS)
    )
    what: str = flag("both", "train | decode | both", one_of("train", "decode", "both"))
    per_device_batch_size: int = flag(
        8,
        "captions (train: per micro-batch, as --per_device_train_batch_size) or images "
        "(decode) per device",
        at_least(1),
    )
    target_length: int = flag(32, "caption tokens per training example", at_least(1))
    image_size: int | None = flag(None, "image side in pixels (--preset only)", at_least(1))
    num_beams: int = flag(1, "beams of the decoding search (1: greedy)", at_least(1))
    max_length: int = flag(
        16, "decoded length, counting the start token (EOS suppressed)", at_least(2)
    )
    steps: int = flag(10, "timed calls per workload (the median is reported)", at_least(1))
    warmup: int = flag(2, "untimed calls after the compiling one", at_least(0))
    output_dir: str = flag("out/bench", "where bench.json is written")
    profile: str | None = flag(None, "write a jax profiler trace of a few calls to this folder")


def build_model(a: BenchArgs, mesh):
    """The model under test: a checkpoint, or a preset's configuration with random weights
    (nothing downloaded), built as `a` says (dtype, scan, remat, class, mesh)."""
    if a.model_name_or_path:
        model = a.load(a.source(), mesh, seed=a.seed)
        if a.image_size not in (None, model.config.encoder.image_size):
            raise ConfigError(
                f"--image_size {a.image_size}: {a.model_name_or_path} was trained at "
                f"{model.config.encoder.image_size} (its position embeddings fix it); "
                "--image_size applies to --preset"
            )
        return model
    config = getattr(config_lib, a.preset)()
    encoder = config.encoder
    if a.image_size is not None:
        encoder = dataclasses.replace(encoder, image_size=a.image_size)
    config = dataclasses.replace(config, encoder=encoder, execution=a.execution())
    config.validate()
    model = init_model(config, a.compute_dtype(), mesh=mesh, model_cls=a.model_cls(), seed=a.seed)
    return a.add_adapters(model, a.seed)


def train_batch(config, batch: int, length: int, per_image: int, seed: int = 0) -> dict:
    """A training batch as the captioning data builds it: targets behind the start token, a
    quarter of every other row padded so the mask matters; `per_image` captions per image."""
    rng = np.random.default_rng(seed)
    vocab, size = config.decoder.vocab_size, config.encoder.image_size
    labels = rng.integers(0, vocab, (batch, length), dtype=np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[::2, length - length // 4 :] = 0
    start = np.full((batch, 1), config.decoder_start_token_id, np.int32)
    channels = config.encoder.num_channels
    return dict(
        pixel_values=rng.standard_normal((batch // per_image, size, size, channels), np.float32),
        decoder_input_ids=np.concatenate([start, labels[:, :-1]], axis=1),
        labels=labels,
        decoder_attention_mask=mask,
    )


def _profiled(fn: Callable[[], object], directory: str | None, calls: int = 3) -> None:
    """A jax profiler trace (TensorBoard / Perfetto) of a few calls after the timed ones."""
    if directory:
        with jax.profiler.trace(directory):
            for _ in range(calls):
                fn()


def bench_train(model, a: BenchArgs, mesh, batch: dict | None = None) -> dict:
    """Times Trainer.train_step on `batch` (default: a random one as `a` shapes it), placed
    on the devices once so that the step is timed, not the copy. The step is `train`'s with
    the same flags (train_config)."""
    cfg = train_config(a)
    if batch is None:
        micro_batches = a.gradient_accumulation_steps
        size = a.per_device_batch_size * jax.device_count() * micro_batches
        batch = train_batch(model.config, size, a.target_length, a.captions_per_image, a.seed)
    rows, length = batch["labels"].shape
    images = len(batch["pixel_values"])
    counted = flops.xla_train_step(model, cfg, batch)
    analytic = flops.train_step(model.config, rows, length, images)
    trainer = Trainer(model, cfg, mesh)
    process = (jax.process_index(), jax.process_count())  # each process puts its own rows
    placed = trainer.put({k: v[process_rows(len(v), process)] for k, v in batch.items()})

    def step() -> float:
        return float(jax.block_until_ready(trainer.train_step(placed)["loss"]))

    times, losses = timed(step, a.steps, a.warmup)
    _profiled(step, a.profile)
    return dict(
        what="train",
        examples_per_s=rows / times["step_time_s"],
        tokens_per_s=rows * length / times["step_time_s"],
        flops_per_step=counted,
        analytic_flops_per_step=analytic,
        global_batch=rows,
        images_per_step=images,
        target_length=length,
        losses=losses[:3],
        **times,
    )


def train_config(a: BenchArgs) -> TrainConfig:
    """The train step's config as `train` derives it from the same flags (loop._setup); the
    schedule's length does not change the step's cost."""
    return TrainConfig.of(a, total_steps=10**6, lora=bool(a.lora_rank), new_params=a.new_params)


def bench_decode(model, a: BenchArgs, mesh, pixels: np.ndarray | None = None) -> dict:
    """Times nc.generate on `pixels` (default: random images, as many as `a` says), EOS
    suppressed (min_length = max_length) so that every search decodes the full length."""
    if pixels is None:
        images = a.per_device_batch_size * jax.device_count()
        size, channels = model.config.encoder.image_size, model.config.encoder.num_channels
        rng = np.random.default_rng(a.seed)
        pixels = rng.standard_normal((images, size, size, channels), np.float32)
    images, pixels = len(pixels), jnp.asarray(pixels)
    knobs = dict(max_length=a.max_length, min_length=a.max_length, num_beams=a.num_beams)

    def search():
        return generate(model, pixels, mesh=mesh, **knobs)  # host arrays: it has blocked

    times, outputs = timed(search, a.steps, a.warmup)
    _profiled(search, a.profile)
    work = flops.generate(model.config, images, a.num_beams, a.max_length)
    return dict(
        what="decode",
        examples_per_s=images / times["step_time_s"],
        tokens_per_s=images * (a.max_length - 1) / times["step_time_s"],
        flops_per_step=work,
        analytic_flops_per_step=work,
        images=images,
        global_batch=images,
        num_beams=a.num_beams,
        max_length=a.max_length,
        sequences=outputs[-1].sequences,  # for the peer benchmarks; run() drops it
        **times,
    )


def run(a: BenchArgs, command: str = "") -> list[dict]:
    """Measures the workloads `a.what` names (decoding first, so that its peak memory is its
    own); writes bench.json in a.output_dir and returns its list."""
    mesh = a.mesh()
    model = build_model(a, mesh)
    device = jax.devices()[0]
    peak, peak_source = peak_flops(a.dtype)
    common = dict(
        backend=device.platform,
        device_kind=device.device_kind,
        devices=jax.device_count(),
        processes=jax.process_count(),
        peak_tflops=peak and peak / 1e12,
        peak_source=peak_source,
        model=a.model_name_or_path or f"preset {a.preset} (random weights)",
        model_class=a.model_class or "VisionEncoderDecoder",
        dtype=a.dtype,
        scan_layers=a.scan_layers,
        gradient_checkpointing=a.gradient_checkpointing,
        remat_policy=a.remat_policy,
        attention_impl=a.attention_impl,
        train_step={
            k: v
            for k, v in dataclasses.asdict(train_config(a)).items()
            if k not in ("total_steps", "new_params")
        },  # fmt: skip
        lora_rank=a.lora_rank,
        mesh=dict(mesh.shape) if mesh is not None else None,
        software=software(),
        command=command,
    )
    runs = {"train": [bench_train], "decode": [bench_decode]}
    results = []
    for bench in runs.get(a.what, [bench_decode, bench_train]):
        r = bench(model, a, mesh)
        r.pop("sequences", None)  # the peer benchmarks compare them; bench.json has no use
        r["tflops"] = r["flops_per_step"] / r["step_time_s"] / 1e12
        r["examples_per_s_per_device"] = r["examples_per_s"] / jax.device_count()
        r["mfu"] = peak and r["flops_per_step"] / r["step_time_s"] / peak
        r["peak_memory_bytes"], r["peak_memory_source"] = peak_memory()
        results.append({**r, **common})
    if processes.is_main():  # every process measured its part; process 0 writes
        os.makedirs(a.output_dir, exist_ok=True)
        with open(os.path.join(a.output_dir, "bench.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| what | device | compile s | step ms (spread) | examples/s | tokens/s | TFLOP/s "
        "| MFU | peak memory GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {r['what']} | {r['devices']} x {r['device_kind']} | {r['compile_s']:.1f} | "
            f"{1e3 * r['step_time_s']:.1f} ({1e3 * r['step_time_spread_s']:.1f}) | "
            f"{r['examples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops']:.3f} | {mfu} | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Every BenchArgs flag, spelled as `train` spells its flags."""
    add_flags(parser, BenchArgs)


def args_from_namespace(ns: argparse.Namespace) -> BenchArgs:
    """BenchArgs from parsed flags, checked; a bad combination is a UsageError saying which."""
    a = from_namespace(BenchArgs, ns)
    if bool(a.model_name_or_path) == bool(a.preset):
        raise UsageError("give one of --model_name_or_path and --preset")
    a.check()  # every flag's own check
    a.check_batch(a.per_device_batch_size, "per_device_batch_size")
    return a
