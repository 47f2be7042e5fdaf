"""gallery.html: one self-contained page (images inlined, no network) of captioned images.

Each card shows an image, its caption and score; with references, the references and whether
the caption is one of them (exact match, case-insensitive, as `train` scores it), wrong ones
first and a filter; with beam search, every returned beam and its score; with attention maps,
the caption's words over the image: hovering or clicking a word shows where the decoder looked
when it wrote it (cross-attention over the image patches, averaged over heads, and over layers
or one layer; gallery.html#attention opens with each caption's first word shown). Images
smaller than the card are enlarged nearest-neighbour.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from nnx_caption.metrics import matches_a_reference

THUMBNAIL_SIZE = 224  # larger images are shrunk to fit, in the page's JPEG
SHOWN_SIZE = 192  # smaller ones are shown enlarged to this, pixelated


@dataclass
class Card:
    image: str  # the image's path
    thumbnail: str  # a data: URI
    caption: str
    score: float | None  # None: not kept (train's evaluation)
    references: list[str] | None = None  # None: the input had no captions
    candidates: list[tuple[str, float]] = field(default_factory=list)  # every returned beam
    words: list[str] | None = None  # the caption's tokens, with attention maps
    maps: np.ndarray | None = None  # (words, 1 + layers, rows, columns) cross-attention

    @property
    def match(self) -> bool | None:
        if self.references is None:
            return None
        return matches_a_reference(self.caption, self.references)


def summary(exact_match: float, cider: float) -> str:
    """The line at the top of a gallery of captions with references."""
    return f"exact match {exact_match:.1f}%, CIDEr {cider:.3f}"


def thumbnail(rgb: np.ndarray) -> str:
    """(H, W, 3) uint8 -> a JPEG data: URI, at most THUMBNAIL_SIZE on a side."""
    image = Image.fromarray(rgb)
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    small = max(image.size) < SHOWN_SIZE  # shown enlarged: keep its pixels crisp
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95 if small else 85, subsampling=0 if small else 2)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def attention_grid(weights: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(tokens, layers, heads, 1 + patches) cross-attention of one caption -> (tokens,
    1 + layers, rows, columns): the mean over layers and heads first, then each layer's mean
    over heads; the CLS token's weight left out, each map scaled to its own maximum."""
    per_layer = weights[..., 1:].mean(axis=2)  # (tokens, layers, patches)
    maps = np.concatenate([per_layer.mean(axis=1, keepdims=True), per_layer], axis=1)
    maps = maps / np.maximum(maps.max(axis=-1, keepdims=True), 1e-12)
    return maps.reshape(*maps.shape[:2], *grid)


def _card_html(i: int, card: Card) -> str:
    esc = html.escape
    status = {None: "", True: " right", False: " wrong"}[card.match]
    lines = [f'<figure class="card{status}" id="card{i}">', '<div class="frame">']
    lines.append(f'<img src="{card.thumbnail}" alt="{esc(card.caption)}">')
    if card.maps is not None:
        lines.append("<canvas></canvas>")
    lines.append("</div><figcaption>")
    if card.words is not None:
        words = "".join(
            f'<span class="word" data-card="{i}" data-word="{j}">{esc(w)}</span>'
            for j, w in enumerate(card.words)
        )
        lines.append(f'<p class="caption">{words}</p>')
    else:
        lines.append(f'<p class="caption">{esc(card.caption)}</p>')
    if card.match is not None:
        mark = "matches a reference" if card.match else "matches no reference"
        lines.append(f'<p class="mark">{mark}; references:</p><ul class="refs">')
        lines += [f"<li>{esc(r)}</li>" for r in card.references]
        lines.append("</ul>")
    if len(card.candidates) > 1:
        lines.append('<p class="mark">beams, with their scores:</p><ol class="beams">')
        lines += [f"<li>{esc(c)} <small>{s:.4f}</small></li>" for c, s in card.candidates]
        lines.append("</ol>")
    elif card.score is not None:
        lines.append(f"<p><small>score {card.score:.4f}</small></p>")
    lines.append(f"<p><small>{esc(card.image)}</small></p></figcaption></figure>")
    return "\n".join(lines)


def _maps_json(cards: list[Card]) -> str:
    """The attention maps, quantised to 0-255 and base64'd: {card: [rows, columns, layers + 1,
    data]}; data holds (words, 1 + layers, rows, columns) bytes."""
    out = {}
    for i, card in enumerate(cards):
        if card.maps is not None:
            words, views, rows, columns = card.maps.shape
            data = np.round(card.maps * 255).astype(np.uint8).tobytes()
            out[i] = [rows, columns, views, base64.b64encode(data).decode("ascii")]
    return json.dumps(out).replace("</", "<\\/")


SCRIPT = """
const maps = JSON.parse(document.getElementById("maps").textContent);
const bytes = {};
function show(card, word) {
  const [rows, cols, views, data] = maps[card];
  bytes[card] = bytes[card] || Uint8Array.from(atob(data), c => c.charCodeAt(0));
  const view = Number(document.getElementById("layer").value);
  const canvas = document.querySelector(`#card${card} canvas`);
  canvas.width = cols; canvas.height = rows;
  const ctx = canvas.getContext("2d"), image = ctx.createImageData(cols, rows);
  const start = (word * views + view) * rows * cols;
  for (let p = 0; p < rows * cols; p++) {
    image.data.set([255, 40, 0, Math.round(0.8 * bytes[card][start + p])], 4 * p);
  }
  ctx.putImageData(image, 0, 0);
  document.querySelectorAll(`#card${card} .word`).forEach(
    w => w.classList.toggle("on", Number(w.dataset.word) === word));
}
document.querySelectorAll(".word").forEach(w => {
  const pick = () => show(Number(w.dataset.card), Number(w.dataset.word));
  w.addEventListener("mouseenter", pick);
  w.addEventListener("click", pick);
});
document.getElementById("layer")?.addEventListener("change", () =>
  document.querySelectorAll(".word.on").forEach(w => w.dispatchEvent(new Event("click"))));
if (location.hash === "#attention") {  // every caption's first word, e.g. for a screenshot
  Object.keys(maps).forEach(card => show(Number(card), 0));
}
document.getElementById("filter")?.addEventListener("change", e => {
  document.querySelectorAll(".card").forEach(c => {
    c.hidden = e.target.value !== "all" && !c.classList.contains(e.target.value);
  });
});
"""

STYLE = f"""
body {{ font-family: sans-serif; margin: 1.5em; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }}
figure {{ margin: 0; padding: 8px; border: 1px solid #ddd; border-radius: 6px; }}
figure.wrong {{ border-color: #d33; background: #fff5f5; }}
figure.right {{ border-color: #3a3; }}
.frame {{ position: relative; width: fit-content; margin: auto; }}
img {{ display: block; max-width: {THUMBNAIL_SIZE}px; max-height: {THUMBNAIL_SIZE}px;
  min-width: {SHOWN_SIZE}px; image-rendering: pixelated; }}
canvas {{ position: absolute; inset: 0; width: 100%; height: 100%; image-rendering: pixelated;
  pointer-events: none; }}
figcaption {{ margin-top: 6px; overflow-wrap: anywhere; }}
.caption {{ font-weight: bold; }}
.word {{ cursor: pointer; border-bottom: 1px dotted #999; }}
.word.on {{ background: #ffd8c8; }}
.mark {{ margin: 4px 0 0; }}
.wrong .mark {{ color: #b00; }}
ul.refs, ol.beams {{ margin: 2px 0; padding-left: 1.3em; }}
"""


def page(
    title: str, settings: dict, cards: list[Card], total: int, summary: str | None = None
) -> str:
    """The gallery of `cards` (of `total` images captioned), wrong ones first."""
    esc = html.escape
    order = sorted(range(len(cards)), key=lambda i: cards[i].match is not False)
    shown = "\n".join(_card_html(i, cards[i]) for i in order)
    note = f"{total} images" + (f", showing {len(cards)}" if len(cards) < total else "")
    controls = []
    if any(c.match is not None for c in cards):
        controls.append(
            '<label>show <select id="filter"><option value="all">all</option>'
            '<option value="wrong">wrong</option><option value="right">right</option>'
            "</select></label>"
        )
    layers = max((c.maps.shape[1] - 1 for c in cards if c.maps is not None), default=0)
    if layers:
        options = ['<option value="0">mean of layers and heads</option>']
        options += [
            f'<option value="{k + 1}">layer {k} (mean of heads)</option>' for k in range(layers)
        ]
        controls.append(
            f'<label>attention <select id="layer">{"".join(options)}</select></label> '
            "<small>hover or click a word of a caption to see where the decoder looked</small>"
        )
    setting_text = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{esc(title)}</h1>
{f"<p><b>{esc(summary)}</b></p>" if summary else ""}
<p>{esc(setting_text)}</p><p>{esc(note)}</p>
<p>{" ".join(controls)}</p>
<main>
{shown}
</main>
<script type="application/json" id="maps">{_maps_json(cards)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
