"""Write the tiny reference checkpoint `weights/tiny/` and its golden outputs.

Run with the dev venv (needs transformers + torch, which nnx-caption itself does not):

    .venv/bin/python weights/make_tiny.py [--out DIR]

Everything is seeded, single-threaded and written without timestamps, so two runs give
byte-identical files. The package's fast tests load this checkpoint and compare against
`golden.npz` without importing torch.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import zipfile
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2TokenizerFast,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessorPil,
)

from nnx_caption.config import tiny

EOT = "<|endoftext|>"
# SEED and INIT_STD were picked by searching seeds 0-159 x std 0.2/0.3/0.4 (EOS is 1 token of
# 336, so random weights rarely emit it) for a setting where generation is non-trivial on the
# golden pixel values: greedy row 1 emits EOS at step 4 while row 0 runs to max_length (so both
# the padded-after-EOS and the max-length paths are in one batch), beam search returns an
# EOS-terminated hypothesis for image 1 next to unfinished ones and differs from greedy on
# image 0, and every greedy step's top-2 logit gap is > 0.2 (so float32 noise in a
# re-implementation cannot flip an argmax; the returned beam scores differ by > 0.01).
# `check_generation` re-asserts the EOS part on every run.
SEED = 38
INIT_STD = 0.4  # 20x the HF default (0.02), so logits are far from uniform
GREEDY_MAX_LENGTH = 12
TEXTS = [
    "a red circle above a blue square",
    "two green triangles",
    "three small yellow stars next to a black square",
    "a purple hexagon!",  # word not in the corpus: exercises byte-level fallback
    "un café rouge",  # non-ASCII: multi-byte characters
]


def caption_corpus() -> list[str]:
    """A small synthetic corpus of shape captions: colours x shapes x positions x counts."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    shapes = ["circle", "square", "triangle", "star"]
    counts = {"a": "", "two": "s", "three": "s", "four": "s"}
    positions = ["above", "below", "left of", "right of", "next to"]
    corpus = []
    for (count, plural), colour, shape in itertools.product(counts.items(), colours, shapes):
        corpus.append(f"{count} {colour} {shape}{plural}")
        corpus.append(f"{count} small {colour} {shape}{plural}")
    for c1, s1, pos, c2, s2 in itertools.product(colours, shapes, positions, colours[:3], shapes):
        corpus.append(f"a {c1} {s1} {pos} a {c2} {s2}")
    return corpus


def make_tokenizer(vocab_size: int = 336) -> GPT2TokenizerFast:
    """Train a GPT-2 style byte-level BPE; `<|endoftext|>` is the last id and bos/eos/unk/pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # leave room for <|endoftext|>
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(caption_corpus(), trainer=trainer)
    # Rebuild the model with <|endoftext|> appended at the end of the vocab, as in GPT-2
    # (50256 there), so that pad == eos != 0 and vocab.json contains it.
    bpe = json.loads(tok.to_str())["model"]
    vocab = dict(bpe["vocab"])
    vocab[EOT] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([EOT])
    return GPT2TokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT
    )


def make_model(vocab_size: int, eot_id: int) -> VisionEncoderDecoderModel:
    """The sizes of nnx_caption.config.tiny() (the one place they are written): ViT encoder
    (d=32) + GPT-2 decoder (d=48), widths that differ so `enc_to_dec_proj` exists."""
    sizes = tiny().to_hf()
    encoder = ViTConfig(**{**sizes["encoder"], "initializer_range": INIT_STD})
    ids = dict(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=None)
    decoder = GPT2Config(
        **{**sizes["decoder"], **ids, "vocab_size": vocab_size, "initializer_range": INIT_STD}
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    # As nlpconnect/vit-gpt2-image-captioning: start with bos, pad with eos.
    config.decoder_start_token_id = eot_id
    config.pad_token_id = eot_id
    config.eos_token_id = eot_id
    torch.manual_seed(SEED)
    model = VisionEncoderDecoderModel._from_config(config, attn_implementation="eager")
    # HF init leaves biases at 0 and LayerNorm scales at 1; randomise them too, so a converter
    # that drops a bias or swaps two LayerNorms cannot pass the golden test by accident.
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=gen))
            for name, param in module.named_parameters(recurse=False):
                if name == "bias":
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    model.generation_config.max_length = 16
    model.generation_config.num_beams = 1
    return model.eval()


def draw_sample() -> Image.Image:
    """A 48x40 (w x h) RGB picture: non-square, so resizing to 32x32 changes the aspect ratio."""
    img = Image.new("RGB", (48, 40), (235, 235, 220))
    draw = ImageDraw.Draw(img)
    draw.ellipse((4, 4, 22, 22), fill=(220, 30, 30))  # red circle, top left
    draw.rectangle((26, 18, 44, 36), fill=(30, 60, 200))  # blue square, bottom right
    draw.polygon([(6, 36), (14, 24), (22, 36)], fill=(40, 170, 60))  # green triangle
    return img


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez, but with fixed zip timestamps so the file is byte-reproducible."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            zf.writestr(
                zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue()
            )


def check_generation(greedy: np.ndarray, beams: np.ndarray, eot_id: int, max_length: int) -> None:
    """Fail loudly if the golden generation became trivial (e.g. after a transformers change)."""
    stops_early = [bool((row[1:] == eot_id).any()) for row in greedy]
    assert any(stops_early) and not all(stops_early), f"greedy not mixed: {greedy}"
    assert greedy.shape[1] == max_length, greedy.shape
    assert any((row[1:] == eot_id).any() for row in beams), f"no beam hit EOS: {beams}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tiny")
    out: Path = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # identical float reductions from run to run / machine to machine

    tokenizer = make_tokenizer()
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    assert eot_id == len(tokenizer) - 1 == tokenizer.pad_token_id == tokenizer.bos_token_id
    tokenizer.save_pretrained(out)
    tokenizer.backend_tokenizer.model.save(str(out))  # also vocab.json + merges.txt, GPT-2 style

    model = make_model(len(tokenizer), eot_id)
    model.save_pretrained(out, safe_serialization=True)

    processor = ViTImageProcessorPil(
        do_resize=True,
        size={"height": 32, "width": 32},
        resample=Image.Resampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(out)
    sample = draw_sample()
    sample.save(out / "sample.png")
    sample_pixels = processor(sample, return_tensors="np")["pixel_values"]  # (1, 3, 32, 32)

    # Fixed inputs. Our package is NHWC; transformers wants NCHW.
    rng = np.random.default_rng(SEED)
    pixel_values = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(0, len(tokenizer), size=(2, 6))
    decoder_input_ids = np.concatenate([np.full((2, 1), eot_id), ids], axis=1).astype(np.int32)
    decoder_attention_mask = np.ones((2, 7), np.int32)
    decoder_attention_mask[1, -2:] = 0  # second row right-padded

    pv = torch.from_numpy(pixel_values).permute(0, 3, 1, 2).contiguous()
    special = {"pad_token_id": eot_id, "eos_token_id": eot_id, "decoder_start_token_id": eot_id}
    with torch.no_grad():
        outputs = model(
            pixel_values=pv,
            decoder_input_ids=torch.from_numpy(decoder_input_ids).long(),
            decoder_attention_mask=torch.from_numpy(decoder_attention_mask).long(),
        )
        greedy = model.generate(
            pv, max_length=GREEDY_MAX_LENGTH, num_beams=1, do_sample=False, **special
        )
        beam = model.generate(
            pv,
            max_length=GREEDY_MAX_LENGTH,
            num_beams=3,
            num_return_sequences=2,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            length_penalty=1.0,
            early_stopping=False,
            **special,
        )
    greedy_np = greedy.numpy().astype(np.int32)
    beam_np = beam.sequences.numpy().astype(np.int32)
    check_generation(greedy_np, beam_np, eot_id, GREEDY_MAX_LENGTH)

    text_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    lengths = np.array([len(t) for t in text_ids], np.int32)
    padded = np.full((len(TEXTS), lengths.max()), eot_id, np.int32)
    for i, row in enumerate(text_ids):
        padded[i, : len(row)] = row

    versions = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }
    save_npz(
        out / "golden.npz",
        {
            "pixel_values": pixel_values,
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
            "logits": outputs.logits.numpy().astype(np.float32),
            "encoder_hidden": outputs.encoder_last_hidden_state.numpy().astype(np.float32),
            "greedy_sequences": greedy_np,
            "greedy_max_length": np.array(GREEDY_MAX_LENGTH, np.int32),
            "beam_sequences": beam_np,
            "beam_scores": beam.sequences_scores.numpy().astype(np.float32),
            "beam_num_beams": np.array(3, np.int32),
            "beam_num_return_sequences": np.array(2, np.int32),
            "sample_pixel_values": sample_pixels.transpose(0, 2, 3, 1).astype(np.float32),
            "texts": np.array(TEXTS),
            "text_ids": padded,
            "text_lengths": lengths,
            "transformers_version": np.array(transformers.__version__),
            "torch_version": np.array(torch.__version__),
        },
    )
    golden_info = {
        "versions": versions,
        "seed": SEED,
        "init_std": INIT_STD,
        "eos_token_id": eot_id,
        "bos_token_id": eot_id,
        "pad_token_id": eot_id,
        "vocab_size": len(tokenizer),
        "greedy": {"max_length": GREEDY_MAX_LENGTH, "num_beams": 1},
        "beam": {
            "max_length": GREEDY_MAX_LENGTH,
            "num_beams": 3,
            "num_return_sequences": 2,
            "length_penalty": 1.0,
            "early_stopping": False,
        },
    }
    (out / "golden.json").write_text(json.dumps(golden_info, indent=2) + "\n")
    print(f"wrote {out}: vocab {len(tokenizer)}, <|endoftext|> = {eot_id}")
    print(f"greedy:\n{greedy_np}\nbeams:\n{beam_np}\nbeam scores: {beam.sequences_scores.numpy()}")


if __name__ == "__main__":
    main()
