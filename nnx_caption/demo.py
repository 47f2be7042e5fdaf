"""`make demo`: the main job on the built-in shapes dataset, end to end on a laptop CPU.

Generates the shapes images (imagefolder layout), trains a caption tokenizer on them, builds
a small ViT + GPT-2 from scratch, trains it with `nnx-caption train` (the same code path as
any other run), evaluates on held-out images, and writes a captioned gallery of the test set.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import replace

import jax
from flax import nnx

from nnx_caption import train_args
from nnx_caption.config import CaptionConfig, GenerationConfig, tiny
from nnx_caption.data import load_split, make_shapes, train_caption_tokenizer
from nnx_caption.loop import run
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.predict import predict
from nnx_caption.processing import ImageProcessor, Tokenizer
from nnx_caption.saving import save_pretrained

IMAGE_SIZE = 32


def demo_config(tok: Tokenizer) -> CaptionConfig:
    """The tiny preset (config.tiny) made wider (96), with 4x4 patches, the shapes tokenizer's
    vocabulary, no dropout and its end-of-text token as every special token: it learns the
    shapes grammar in a few minutes on two CPU cores."""
    base, eos = tiny(), tok.eos_token_id
    encoder = replace(base.encoder, hidden_size=96, intermediate_size=384, patch_size=4)
    decoder = replace(
        base.decoder,
        vocab_size=tok.vocab_size,
        n_positions=32,
        n_embd=96,
        **dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), 0.0),
        **dict.fromkeys(("bos_token_id", "eos_token_id"), eos),
    )
    return replace(
        base,
        encoder=encoder,
        decoder=decoder,
        generation=GenerationConfig(max_length=16, num_beams=1),
        **dict.fromkeys(("decoder_start_token_id", "pad_token_id", "eos_token_id"), eos),
    )


# What `make demo` asks of `nnx-caption train`, besides where things are: printed as a command
# line, to be run again or changed.
TRAIN_FLAGS = """
    --do_train --do_eval --do_predict --predict_with_generate --overwrite_output_dir
    --image_column file_name --caption_column text --max_target_length 16
    --per_device_train_batch_size 32 --per_device_eval_batch_size 50
    --learning_rate 2e-3 --weight_decay 0.01 --warmup_steps 100
    --logging_steps 50 --save_steps 400 --save_total_limit 2 --num_beams 1
"""


def run_demo(out: str = "out/demo", steps: int = 3000, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    data_dir = os.path.join(out, "data")
    splits = make_shapes(
        data_dir, n_train=4000, n_validation=200, n_test=200, seed=seed, image_size=IMAGE_SIZE
    )
    print(f"shapes dataset: {data_dir} (train 4000, validation 200, test 200 images)")

    init = os.path.join(out, "init")
    os.makedirs(init, exist_ok=True)
    captions = [e.caption for e in load_split(splits["train"], "file_name", "text").examples]
    train_caption_tokenizer(captions, init)
    tok = Tokenizer.from_pretrained(init)
    ImageProcessor(size=IMAGE_SIZE).save_pretrained(init)
    config = demo_config(tok)
    save_pretrained(VisionEncoderDecoder(config, rngs=nnx.Rngs(seed)), init)
    print(f"model from scratch: {init} ({_count(config)} parameters, vocab {tok.vocab_size})")

    run_dir = os.path.join(out, "run")
    argv = ["--model_name_or_path", init, "--output_dir", run_dir]
    for split in ("train", "validation", "test"):
        argv += [f"--{split}_file", splits[split]]
    argv += ["--max_steps", str(steps), "--seed", str(seed), *TRAIN_FLAGS.split()]
    print(f"training: {shlex.join(['nnx-caption', 'train', *argv])}")
    results = run(train_args.parse(argv))

    # The test split's table, so that the gallery shows each image's reference caption.
    gallery = predict(
        run_dir,
        [os.path.join(splits["test"], "metadata.jsonl")],
        os.path.join(run_dir, "gallery"),
        image_column="file_name",
        caption_column="text",
        attention_maps=True,
        batch_size=50,
        progress=False,
    )
    test = results["test"]
    summary = {
        "minutes": (time.perf_counter() - t0) / 60,
        "test_exact_match": test["test_exact_match"],
        **{
            k: test[f"test_{k}"]
            for k in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "rougeL")
            if f"test_{k}" in test
        },
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(
        "\n".join(
            [
                "",
                f"done in {summary['minutes']:.1f} min. Held-out test images:",
                *(f"  {k:>16}: {v:.3f}" for k, v in summary.items() if k != "minutes"),
                "",
                f"  gallery     {gallery['gallery_file']} (hover a word: where the decoder looked)",
                f"  plots       {os.path.join(run_dir, '*.png')} (loss, learning rate, ...)",
                f"  metrics     {os.path.join(run_dir, 'test_results.json')}",
                f"  captions    {os.path.join(run_dir, 'generated_test.json')}",
                f"  model (HF layout, loads in transformers)  {run_dir}",
            ]
        )
    )
    return summary


def _count(config: CaptionConfig) -> str:
    model = nnx.eval_shape(lambda: VisionEncoderDecoder(config, rngs=nnx.Rngs(0)))
    n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return f"{n / 1e6:.2f}M"


__all__ = ["demo_config", "run_demo"]
