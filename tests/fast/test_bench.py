"""`nnx-caption bench` on the tiny preset: it writes bench.json for training and decoding, its
training FLOPs are XLA's count of the unrolled step (scanned or not), an edited model counts
its extra layer, and MFU is FLOPs / time / peak."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from nnx_caption import bench, train_args
from nnx_caption.cli import main as cli
from nnx_caption.config import tiny
from nnx_caption.hf import init_model
from nnx_caption.train import TrainConfig, Trainer, loss_and_grads

ROOT = pathlib.Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "gated_cross_attention.py"
TINY = ROOT / "weights" / "tiny"
KEYS = {
    "what",
    "backend",
    "device_kind",
    "devices",
    "compile_s",
    "step_time_s",
    "step_time_spread_s",
    "examples_per_s",
    "tokens_per_s",
    "flops_per_step",
    "analytic_flops_per_step",
    "tflops",
    "peak_tflops",
    "mfu",
    "peak_memory_bytes",
}


def _train(**kwargs) -> dict:
    args = bench.BenchArgs(preset="tiny", what="train", steps=1, warmup=0, **kwargs)
    return bench.run(args)[0]


def _unrolled_count(batch: dict) -> float:
    """XLA's FLOPs of the stock tiny model's forward + backward, blocks unrolled, no remat."""
    graphdef, state = nnx.split(init_model(tiny()))
    cfg = TrainConfig()

    def grads(state, batch):
        return loss_and_grads(nnx.merge(graphdef, state), batch, jax.random.key(0), cfg)

    return float(jax.jit(grads).lower(state, batch).cost_analysis()["flops"])


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> tuple[list[dict], str]:
    """The CLI on the stock tiny preset, training and decoding: (bench.json, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--preset", "tiny", "--steps", "2", "--warmup", "0", "--num-beams", "2"]
    printed = io.StringIO()  # module scope: capsys is per test
    with contextlib.redirect_stdout(printed):
        assert cli([*argv, "--output_dir", str(out)]) == 0
    return json.loads((out / "bench.json").read_text()), printed.getvalue()


def test_bench_writes_bench_json_for_train_and_decode(stock):
    results, printed = stock
    assert [r["what"] for r in results] == ["decode", "train"]
    for r in results:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["backend"] == "cpu" and r["devices"] == jax.device_count()
        assert r["step_time_s"] > 0 and r["peak_memory_bytes"] > 0
        # MFU is FLOPs / time / peak, the peak measured on this CPU.
        assert r["mfu"] == pytest.approx(
            r["flops_per_step"] / r["step_time_s"] / (r["peak_tflops"] * 1e12)
        )
        assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["step_time_s"] / 1e12)
    decode, train = results
    images = 8 * jax.device_count()  # the default per-device batch
    assert decode["num_beams"] == 2 and decode["images"] == images
    assert decode["examples_per_s"] == pytest.approx(images / decode["step_time_s"])
    assert train["tokens_per_s"] == pytest.approx(images * 32 / train["step_time_s"])
    assert "| decode |" in printed and "| train |" in printed and "bench.json" in printed


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_train_flops_are_xla_count_of_the_unrolled_step(stock, scan):
    result = _train(scan_layers=True) if scan else stock[0][1]
    host = bench.train_batch(tiny(), 8 * jax.device_count(), 32, 1)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
    assert result["flops_per_step"] == _unrolled_count(batch)
    # The analytic count (matmuls only) lies close beside it.
    assert result["analytic_flops_per_step"] == pytest.approx(result["flops_per_step"], rel=0.15)


def test_an_edited_model_counts_its_extra_layer(stock):
    edited = _train(model_class=f"{EXAMPLE}:GatedCaptioner")
    assert edited["flops_per_step"] > stock[0][1]["flops_per_step"]
    assert edited["model_class"].endswith("GatedCaptioner")


def test_bad_flags_are_usage_errors(capsys):
    assert cli(["bench", "--preset", "tiny", "--model_name_or_path", "x"]) == 2
    assert "one of --model_name_or_path and --preset" in capsys.readouterr().err
    assert cli(["bench", "--preset", "small"]) == 2
    assert "--preset 'small'" in capsys.readouterr().err
    assert cli(["bench", "--preset", "tiny", "--remat_policy", "all"]) == 2
    assert "--remat_policy" in capsys.readouterr().err
    assert cli(["bench", "--model_name_or_path", str(TINY), "--image_size", "64"]) == 2
    err = capsys.readouterr().err
    assert "--image_size 64" in err and "trained at 32" in err


STEP_FLAGS = [
    "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.05", "--freeze", "encoder",
    "--lora_rank", "2", "--label_smoothing_factor", "0.1", "--learning_rate", "5e-2",
    "--seed", "3",
]  # fmt: skip


def test_bench_times_the_step_train_runs_with_the_same_flags(tmp_path):
    """Accumulation, clipping, freezing, LoRA and label smoothing change the step; bench takes
    them as `train` does, and the step it times gives the losses that train's config gives on
    bench's model and batch (and other losses without them)."""
    bench_flags = ["--preset", "tiny", "--what", "train", "--per_device_batch_size", "2"]
    bench_flags += ["--steps", "2", "--warmup", "0", *STEP_FLAGS]
    assert cli(["bench", *bench_flags, "--output_dir", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "bench.json").read_text())
    assert result["global_batch"] == 2 * jax.device_count() * 2  # 2 micro-batches
    step = result["train_step"]
    assert (step["gradient_accumulation_steps"], step["max_grad_norm"]) == (2, 0.05)
    assert (step["freeze"], step["lora"], step["label_smoothing_factor"]) == (
        ["encoder"],
        True,
        0.1,
    )

    parser = argparse.ArgumentParser()
    bench.build_parser(parser)
    a = bench.args_from_namespace(parser.parse_args(bench_flags))
    flags = ["--model_name_or_path", str(TINY), "--output_dir", str(tmp_path / "run")]
    as_train = train_args.parse([*flags, "--do_train", *STEP_FLAGS])
    derived = dict(total_steps=10**6, lora=True, new_params=())

    def losses(config: TrainConfig) -> list[float]:
        model = bench.build_model(a, None)  # the preset's weights, LoRA added, from the seed
        size = a.per_device_batch_size * jax.device_count() * 2
        batch = bench.train_batch(model.config, size, a.target_length, 1, a.seed)
        trainer = Trainer(model, config)
        return [float(trainer.train_step(batch)["loss"]) for _ in range(3)]

    np.testing.assert_allclose(
        result["losses"], losses(TrainConfig.of(as_train, **derived)), rtol=1e-5
    )
    plain = dataclasses.replace(TrainConfig.of(as_train, **derived), label_smoothing_factor=0.0)
    assert not np.allclose(result["losses"], losses(plain), rtol=1e-3)


def _family_config(decoder: str):
    """tiny() with a TrOCR or BERT decoder of its vocabulary and ids."""
    from nnx_caption.config import BertConfig, TrOCRConfig

    base = tiny()
    v = base.decoder.vocab_size
    decoders = {
        "trocr": TrOCRConfig(vocab_size=v, d_model=48, decoder_layers=2, decoder_attention_heads=4,
                             decoder_ffn_dim=64, max_position_embeddings=32, pad_token_id=0,
                             tie_word_embeddings=False),
        "bert": BertConfig(vocab_size=v, hidden_size=48, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=32),
    }  # fmt: skip
    return dataclasses.replace(base, decoder=decoders[decoder])


@pytest.mark.parametrize("decoder", ["trocr", "bert"])
def test_bench_runs_every_decoder_family(tmp_path, decoder):
    import nnx_caption as nc

    nc.save_pretrained(nc.VisionEncoderDecoder(_family_config(decoder), rngs=nnx.Rngs(0)), tmp_path)
    out = tmp_path / "out"
    argv = ["bench", "--model_name_or_path", str(tmp_path), "--what", "both", "--steps", "1",
            "--warmup", "0", "--target_length", "8", "--output_dir", str(out)]  # fmt: skip
    assert cli(argv) == 0
    results = json.loads((out / "bench.json").read_text())
    assert sorted(r["what"] for r in results) == ["decode", "train"]
    assert all(r["flops_per_step"] > 0 and r["examples_per_s"] > 0 for r in results)
