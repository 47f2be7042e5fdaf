"""Targets: captions encoded as labels and decoder inputs, exactly as Hugging Face's
run_image_captioning_flax.py encodes them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nnx_caption.processing import Tokenizer


def shift_tokens_right(
    labels: np.ndarray, pad_token_id: int, decoder_start_token_id: int
) -> np.ndarray:
    """transformers' VisionEncoderDecoder shift_tokens_right, in numpy."""
    shifted = np.zeros_like(labels)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return np.where(shifted == -100, pad_token_id, shifted)


def encode_targets(
    tokenizer: Tokenizer,
    captions: Sequence[str],
    max_target_length: int,
    decoder_start_token_id: int,
    pad_token_id: int,
) -> dict[str, np.ndarray]:
    """labels, decoder_input_ids, decoder_attention_mask: (B, max_target_length) int32.

    As HF's script: "<caption lower-cased> <eos>", truncated (a long caption loses its EOS) and
    padded with `pad_token_id` to max_target_length; inputs are the labels shifted right.
    """
    texts = [caption.lower() + " " + tokenizer.eos_token for caption in captions]
    if not texts:
        empty = np.zeros((0, max_target_length), np.int32)
        return {"labels": empty, "decoder_input_ids": empty, "decoder_attention_mask": empty}
    encoded = tokenizer(texts, max_length=max_target_length, padding="max_length", truncation=True)
    mask = np.asarray(encoded["attention_mask"], np.int32)
    # The tokenizer pads with its own pad (or EOS) token; the model's pad id is the one used.
    labels = np.where(mask == 1, np.asarray(encoded["input_ids"], np.int32), pad_token_id)
    labels = labels.astype(np.int32)
    return {
        "labels": labels,
        "decoder_input_ids": shift_tokens_right(labels, pad_token_id, decoder_start_token_id),
        "decoder_attention_mask": mask,
    }
