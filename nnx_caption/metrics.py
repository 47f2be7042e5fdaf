"""Caption metrics: the COCO scores (pycocoevalcap) and the ROUGE scores HF's script reports.

``caption_metrics(predictions, references)`` returns a ``CaptionScores``: a plain
``dict[str, float]`` with

- ``Bleu_1``..``Bleu_4``, ``METEOR`` (only when Java is present), ``ROUGE_L``, ``CIDEr``: computed
  by pycocoevalcap's own scorers, on its scale (0..1, CIDEr up to ~10), after PTB tokenization;
- ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``: rouge_score F-measures x 100 with the Porter
  stemmer, as ``run_image_captioning_flax.py`` reports them;

plus a ``tokenizer`` attribute saying which PTB tokenizer ran: ``"ptb-java"`` (pycocoevalcap's
Stanford PTBTokenizer, when ``java`` is on PATH) or ``"treebank-nltk"`` (the pure-Python fallback
below). The same function is an ``evaluate`` metric module: ``evaluate.load(metric_path())``.

Edge cases (pycocoevalcap itself asserts on an image without references, and CIDEr crashes when
no reference has a token):

- an empty (or punctuation-only) prediction is scored as the empty caption it tokenizes to:
  pycocoevalcap's scorers accept it and give it no credit (but its ROUGE_L gives 1.0 to an empty
  prediction whose references are all empty too; kept as is);
- an image with no references is scored against one empty reference (so a non-empty prediction
  gets 0 and the image still counts in the averages); if no reference of the batch has a single
  token, CIDEr (whose document frequencies would be empty) is 0;
- captions are whitespace-normalised first (``\\r``, tabs, ``\\u2028``... become one space): the
  Java tokenizer reads one caption per line, and a stray line break would shift every later one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

# pycocoevalcap, rouge_score and nltk are imported where used: `import nnx_caption` stays fast
# and works without them (they are only needed to score).
if TYPE_CHECKING:
    from pycocoevalcap.meteor.meteor import Meteor

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at . ! or ? (and any closing quotes / brackets) followed by white space. HF's
# script uses nltk's punkt here, which needs a data download; this regex needs none. It differs
# from punkt on abbreviations ("Mr. Smith" is split) and on "..." before a lowercase word (split
# here), which captions rarely contain.
_SENTENCE_END = re.compile(r"([.!?]+[\"'”’)\]]*)\s+")

# The Java PTB tokenizer maps these to ASCII quotes, dashes, ellipses (so they are then removed);
# Treebank does not know them.
_UNICODE_PUNCT = str.maketrans(
    dict.fromkeys("“”„«»", '"')
    | dict.fromkeys("‘’‹›", "'")
    | {"–": " -- ", "—": " -- ", "…": " ... ", "\ufeff": ""}
)
# Java's lexer (3.4.1) drops characters outside the BMP (emoji...) as untokenizable separators.
_ASTRAL = re.compile(r"[\U00010000-\U0010ffff]")
# An opening single quote ('cool') that is not a contraction ('s, 'll...): Treebank leaves it
# glued to the word, the Java tokenizer splits it off.
_OPEN_QUOTE = re.compile(r"(?<!\w)'(?!(?:s|re|ve|ll|m|d|t)\b)(?=\w)", re.IGNORECASE)


class CaptionScores(dict[str, float]):
    """The scores, a plain ``dict[str, float]``, plus ``tokenizer``: which PTB tokenizer ran."""

    def __init__(self, scores: dict[str, float], tokenizer: str):
        super().__init__(scores)
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"CaptionScores({dict.__repr__(self)}, tokenizer={self.tokenizer!r})"


def matches_a_reference(prediction: str, references: list[str]) -> bool:
    """The exact match `train` reports (as a percentage): the caption is one of its
    references, case aside."""
    return prediction.lower() in {r.lower() for r in references}


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """The percentage of predictions that match one of their references."""
    pairs = zip(predictions, references, strict=True)
    return 100 * float(np.mean([matches_a_reference(p, refs) for p, refs in pairs]))


def metric_path() -> str:
    """The folder of the ``evaluate`` metric module: ``evaluate.load(metric_path())``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "caption_metric")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (regex, no data download); existing line breaks also split."""
    return [s for s in _SENTENCE_END.sub(r"\1\n", text.strip()).split("\n") if s.strip()]


def treebank_tokenize(caption: str) -> str:
    """The pure-Python stand-in for pycocoevalcap's PTBTokenizer on one caption.

    nltk's regex Treebank tokenizer per sentence (it only splits a sentence-final period), then,
    as the Java tokenizer run with ``-lowerCase``: lowercase, drop pycocoevalcap's punctuation
    list. Brackets become -LRB- etc. and so survive lowercased as -lrb-, as they do in Java.
    """
    from nltk.tokenize import TreebankWordTokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    text = _ASTRAL.sub(" ", caption.translate(_UNICODE_PUNCT))
    text = _OPEN_QUOTE.sub("' ", text)
    treebank = TreebankWordTokenizer()
    words = (w.lower() for s in split_sentences(text) for w in treebank.tokenize(s, True))
    return " ".join(w for w in words if w not in PUNCTUATIONS)


def _ptb_tokenize(
    captions: dict[object, list[str]], java: bool
) -> tuple[dict[object, list[str]], str]:
    """Tokenized captions keyed as given, and the name of the tokenizer that ran."""
    if not java:
        return {k: [treebank_tokenize(c) for c in v] for k, v in captions.items()}, "treebank-nltk"
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One JVM start for the whole batch (the Java tokenizer works line by line, so tokenizing
    # predictions and references together gives what two separate calls would).
    tokenized = PTBTokenizer().tokenize(
        {k: [{"caption": " ".join(c.split())} for c in v] for k, v in captions.items()}
    )
    if any(len(tokenized.get(k, [])) != len(v) for k, v in captions.items()):
        raise RuntimeError("the Java PTB tokenizer returned a different number of captions")
    return tokenized, "ptb-java"


@contextlib.contextmanager
def _meteor() -> Iterator[Meteor]:
    """pycocoevalcap's METEOR scorer, whose Java process is ended on exit, not at GC time."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        yield scorer
    finally:
        with scorer.lock:  # what Meteor.__del__ does, plus closing the pipes
            proc = scorer.meteor_p
            proc.stdin.close()
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()


def _coco_scores(
    gts: dict[int, list[str]], res: dict[int, list[str]], meteor: Meteor | None
) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if meteor is not None:
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    # Cider's document frequencies are empty when no reference has a token: max() would crash.
    has_ngrams = any(ref for refs in gts.values() for ref in refs)
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0]) if has_ngrams else 0.0
    return scores


def _rouge_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    # As run_image_captioning_flax.py: strip, one sentence a line (for rougeLsum), stemmer on.
    # It averages with rouge_score's BootstrapAggregator (whose mid estimate is a resampled
    # mean); this takes the plain mean. Several references: the best one per ROUGE type.
    from rouge_score import rouge_scorer

    def prep(text: str) -> str:
        return "\n".join(split_sentences(text))

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per_image = [
        scorer.score_multi([prep(r) for r in refs], prep(pred))
        for pred, refs in zip(predictions, references, strict=True)
    ]
    return {t: float(np.mean([s[t].fmeasure for s in per_image]) * 100) for t in ROUGE_TYPES}


def caption_metrics(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> CaptionScores:
    """COCO and ROUGE scores of ``predictions`` (one caption an image) against ``references``.

    ``references`` holds one caption an image, or a list of captions an image. Returns a
    ``CaptionScores`` (a ``dict[str, float]``, see the module docstring for the keys and scales);
    its ``tokenizer`` attribute is ``"ptb-java"`` or ``"treebank-nltk"``.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references: "
            "need one prediction and one reference entry (a caption or a list of them) an image"
        )
    if not predictions:
        raise ValueError("no predictions to score")
    if not all(isinstance(p, str) for p in predictions):
        raise TypeError("predictions must be strings")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    refs = [r or [""] for r in refs]  # an image without references scores against ""
    if not all(isinstance(r, str) for rs in refs for r in rs):
        raise TypeError("references must be strings or lists of strings")

    java = shutil.which("java") is not None
    # METEOR's JVM takes seconds to load its paraphrase table: start it first, tokenize meanwhile.
    with _meteor() if java else contextlib.nullcontext() as meteor:
        captions = {("pred", i): [p] for i, p in enumerate(predictions)}
        captions.update({("ref", i): rs for i, rs in enumerate(refs)})
        tokenized, tokenizer = _ptb_tokenize(captions, java)
        res = {i: tokenized[("pred", i)] for i in range(len(predictions))}
        gts = {i: tokenized[("ref", i)] for i in range(len(predictions))}
        scores = _coco_scores(gts, res, meteor)
    scores.update(_rouge_scores(list(predictions), refs))
    return CaptionScores(scores, tokenizer)
