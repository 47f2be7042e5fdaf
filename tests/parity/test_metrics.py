"""caption_metrics against pycocoevalcap's scorers and rouge_score run directly, and through
`evaluate` (its local module, offline, alone and in `evaluate.combine`)."""

from __future__ import annotations

import shutil
import socket
import textwrap
from collections.abc import Callable

import evaluate
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from rouge_score import rouge_scorer

from nnx_caption import metrics
from nnx_caption.metrics import ROUGE_TYPES, caption_metrics, metric_path, split_sentences

HAS_JAVA = shutil.which("java") is not None

# Several references an image, punctuation, capitals, unicode (accents, guillemets, emoji), repeated
# words, a one-word caption, long and multi-sentence captions, an empty prediction.
PREDICTIONS = [
    "a man riding a wave on top of a surfboard",
    "A DOG catches a frisbee in the park!",
    "two giraffes standing next to a tree.",
    "",
    "pizza",
    "a cat cat cat sitting sitting on a couch",
    "Un café crème sur une table — très « français » à Zürich 😀",
    "a group of people standing around a kitchen preparing food. a woman is cutting vegetables "
    "while a man washes dishes, and a child watches from a stool next to the counter",
    "a red (double-decker) bus on a street; it's parked near the 'old' station...",
    "A train on the tracks. It is going fast! Is it?",
]
REFERENCES = [
    ["A surfer rides a large wave.", "a man on a surfboard riding a wave", "Surfer in the ocean."],
    ["a dog jumping to catch a frisbee", "The dog is catching a Frisbee in a grassy park."],
    ["Two giraffes standing by a tree", "a pair of giraffes near a tall tree", "giraffes."],
    ["a bowl of fruit on a table", "apples and oranges in a bowl"],
    ["a pizza with cheese and tomatoes", "Pizza!"],
    ["a cat sitting on a couch", "a cat lying on the sofa"],
    ["a cup of coffee on a table in Zürich", "café crème — très bon", "Kaffee und Kuchen 🍰"],
    [
        "several people in a kitchen cooking a meal together while a child watches them",
        "a family preparing food in a large kitchen; the woman cuts vegetables and the man "
        "does the dishes",
    ],
    ["A red double decker bus parked at a station.", "a (red) bus on the street, isn't it?"],
    ["a fast train on the railway tracks. it passes a station", "A train. Moving quickly!"],
]

Captions = dict[int, list[dict[str, str]]]


def java_ptb(captions: Captions) -> dict[int, list[str]]:
    return PTBTokenizer().tokenize(captions)


def treebank_ptb(captions: Captions) -> dict[int, list[str]]:
    return {k: [metrics.treebank_tokenize(c["caption"]) for c in v] for k, v in captions.items()}


def coco_reference(tokenize: Callable[[Captions], dict], meteor: bool) -> dict[str, float]:
    """The standard COCO caption evaluation: id -> [{"caption": ...}], tokenize, each scorer."""
    gts = tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(REFERENCES)})
    res = tokenize({i: [{"caption": p}] for i, p in enumerate(PREDICTIONS)})
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"])]
    scorers += [(Meteor(), "METEOR")] if meteor else []
    scorers += [(Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    out = {}
    for scorer, names in scorers:
        score, _ = scorer.compute_score(gts, res)
        out.update(zip(names, score, strict=True) if isinstance(names, list) else {names: score})
    return out


def rouge_reference() -> dict[str, float]:
    """rouge_score as HF's script calls it (stemmer on, one sentence a line), best reference."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    best = {t: [] for t in ROUGE_TYPES}
    for pred, refs in zip(PREDICTIONS, REFERENCES, strict=True):
        prediction = "\n".join(split_sentences(pred))
        per_ref = [scorer.score("\n".join(split_sentences(r)), prediction) for r in refs]
        for t in ROUGE_TYPES:
            best[t].append(max(s[t].fmeasure for s in per_ref))
    return {t: 100 * float(np.mean(v)) for t, v in best.items()}


@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name, *a, **k: None)


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("java", marks=pytest.mark.skipif(not HAS_JAVA, reason="needs Java")),
        "fallback",
    ],
)
def test_matches_pycocoevalcap_and_rouge_score(mode, request):
    if mode == "fallback":
        request.getfixturevalue("no_java")
    scores = caption_metrics(PREDICTIONS, REFERENCES)

    assert scores.tokenizer == {"java": "ptb-java", "fallback": "treebank-nltk"}[mode]
    tokenize = java_ptb if mode == "java" else treebank_ptb
    coco = coco_reference(tokenize, meteor=mode == "java")
    rouge = rouge_reference()
    assert list(scores) == [*coco, *rouge]
    assert all(type(v) is float for v in scores.values())
    for name, expected in coco.items():
        assert scores[name] == pytest.approx(expected, abs=1e-6), name
    for name, expected in rouge.items():
        assert scores[name] == pytest.approx(expected, abs=1e-4), name
    # Sanity on the scales: COCO in 0..1 (CIDEr 0..10), ROUGE in 0..100, all informative here.
    assert all(0 < scores[k] < 1 for k in coco if k != "CIDEr") and 0 < scores["CIDEr"] < 10
    assert all(1 < scores[k] < 100 for k in rouge)


@pytest.mark.skipif(not HAS_JAVA, reason="needs Java")
def test_fallback_tokenizer_agrees_with_java_on_the_caption_set():
    captions = PREDICTIONS + [r for refs in REFERENCES for r in refs]
    as_dict = {i: [{"caption": c}] for i, c in enumerate(captions)}
    assert treebank_ptb(as_dict) == java_ptb(as_dict)


# A second local metric module to combine with (offline, no hub metric can be loaded).
METRIC_COUNT = """
    import datasets
    import evaluate

    STRING = datasets.Value("string")

    class PredictionCount(evaluate.Metric):
        def _info(self):
            features = {"predictions": STRING, "references": datasets.Sequence(STRING)}
            return evaluate.MetricInfo(
                description="", citation="", inputs_description="",
                features=datasets.Features(features),
            )

        def _compute(self, predictions, references):
            return {"count": len(predictions)}
"""


def test_evaluate_module_offline_and_combined(no_java, monkeypatch, tmp_path):
    # Nothing may download: any socket connection from this process fails the test.
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    expected = {**caption_metrics(PREDICTIONS, REFERENCES), "tokenizer": "treebank-nltk"}

    metric = evaluate.load(metric_path())
    assert metric.compute(predictions=PREDICTIONS, references=REFERENCES) == expected
    for start in range(0, len(PREDICTIONS), 4):  # batches accumulate as in an eval loop
        metric.add_batch(
            predictions=PREDICTIONS[start : start + 4], references=REFERENCES[start : start + 4]
        )
    assert metric.compute() == expected
    # One reference an image: a plain list of strings.
    singles = [refs[0] for refs in REFERENCES]
    got = metric.compute(predictions=PREDICTIONS, references=singles)
    assert got == {**caption_metrics(PREDICTIONS, singles), "tokenizer": "treebank-nltk"}

    other = tmp_path / "prediction_count"
    other.mkdir()
    (other / "prediction_count.py").write_text(textwrap.dedent(METRIC_COUNT))
    combined = evaluate.combine([metric_path(), str(other)])
    got = combined.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert got == {**expected, "count": len(PREDICTIONS)}
