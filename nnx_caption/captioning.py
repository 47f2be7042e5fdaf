"""Captions from pixels: the one path from a batch of images to decoded captions, their beams'
scores and, when asked, each word's cross-attention over the image. `train`'s evaluation and
`predict` both caption through it (as big_vision's evaluators share one set of predict
functions), so that a setting means the same in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh

from nnx_caption import gallery
from nnx_caption.config import CaptionConfig
from nnx_caption.errors import UsageError
from nnx_caption.generate import GenerateOutput, generate, search_settings
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.processing import Tokenizer
from nnx_caption.progress import first_call


@dataclass
class Caption:
    """One image's caption, as the search returned it."""

    caption: str  # the best beam's text, stripped
    score: float  # its score (transformers' sequences_scores)
    candidates: list[tuple[str, float]]  # (text, score) of every returned beam, best first
    words: list[str] | None = None  # with attention maps: the caption's words ...
    maps: np.ndarray | None = None  # ... and their maps (words, 1 + layers, rows, columns)


class Captioner:
    """A checkpoint's search, its settings checked once (a UsageError naming the bad one,
    before any image is read), and the decoding of what it returns. Settings left None take
    the checkpoint's generation config. With `all_beams`, every beam comes back as a
    candidate; with `attention_maps`, the maps of each caption's words. The model is passed at
    each call: training updates (and donates) its weights between evaluations."""

    def __init__(
        self,
        config: CaptionConfig,
        tokenizer: Tokenizer,
        *,
        num_beams: int | None = None,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        all_beams: bool = False,
        attention_maps: bool = False,
        mesh: Mesh | None = None,
    ):
        search = dict(num_beams=num_beams, max_length=max_length, max_new_tokens=max_new_tokens)
        try:
            self.search, _ = search_settings(config, **search)
        except ValueError as err:
            raise UsageError(str(err)) from None
        self.tokenizer, self.mesh = tokenizer, mesh
        self.beams = self.search.num_beams if all_beams else 1  # rows per image in the output
        self.options = dict(
            search,
            num_return_sequences=self.beams,
            output_cross_attentions=attention_maps,
            mesh=mesh,
        )
        grid = config.encoder.grid_size
        self.grid = (grid, grid) if attention_maps else None

    def generate(
        self, model: VisionEncoderDecoder, pixels: jax.Array | np.ndarray
    ) -> GenerateOutput:
        """The search over a batch (B, H, W, C) of normalised pixels; one compile per shape."""
        return first_call("generation", generate, model, pixels, **self.options)

    def caption(self, out: GenerateOutput, image: int, maps: bool = True) -> Caption:
        """The caption of the `image`-th image of a batch's output (with its maps, when the
        search recorded them and `maps`)."""
        row, k = image * self.beams, self.beams
        texts = self.tokenizer.batch_decode(out.sequences[row : row + k], skip_special_tokens=True)
        beams = [(text.strip(), float(out.scores[row + b])) for b, text in enumerate(texts)]
        found = Caption(beams[0][0], beams[0][1], beams)
        if self.grid is not None and maps:
            found.words, found.maps = self._attention(out, row)
        return found

    def _attention(self, out: GenerateOutput, row: int) -> tuple[list[str], np.ndarray]:
        """The words of the caption in `row` and their maps (words, 1 + layers, rows, cols)."""
        ids = out.sequences[row, 1:].tolist()  # the generated tokens, the start token left out
        eos = self.tokenizer.eos_token_id
        n = ids.index(eos) if eos in ids else len(ids)  # EOS ends the caption: no word of its own
        words, shown = [], 0
        for j in range(n):  # each token's new text: a character split over tokens goes to its last
            text = self.tokenizer.decode(ids[: j + 1])
            partial = text.endswith("\ufffd") and j < n - 1
            words.append("" if partial else text[shown:])
            shown = shown if partial else len(text)
        weights = out.cross_attentions[row, :n]  # (words, layers, heads, image tokens)
        rows, cols = self.grid
        if weights.shape[-1] != 1 + rows * cols:
            raise UsageError(
                f"--attention_maps: the encoder makes {weights.shape[-1]} image tokens, not a "
                f"CLS token and a {rows}x{cols} patch grid; this model's maps cannot be drawn"
            )
        return words, gallery.attention_grid(weights, self.grid)
