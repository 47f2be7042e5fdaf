"""caption_metrics without Java (the pure-Python tokenizer, fast): errors, edge cases, sanity."""

from __future__ import annotations

import math
import os

import pytest

from nnx_caption import metrics
from nnx_caption.metrics import (
    ROUGE_TYPES,
    CaptionScores,
    caption_metrics,
    metric_path,
    split_sentences,
    treebank_tokenize,
)

COCO = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]


@pytest.fixture(autouse=True)
def no_java(monkeypatch):
    # The Java tokenizer and METEOR are covered by tests/parity/test_metrics.py.
    monkeypatch.setattr(metrics.shutil, "which", lambda name, *a, **k: None)


def test_length_mismatch_names_the_lengths():
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        caption_metrics(["a", "b", "c"], ["a", "b"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="no predictions"):
        caption_metrics([], [])
    with pytest.raises(TypeError, match="predictions"):
        caption_metrics([1], ["a"])
    with pytest.raises(TypeError, match="references"):
        caption_metrics(["a"], [[None]])


def test_identical_captions_score_full_marks():
    captions = ["a dog runs on the grass", "two cats sleep on a red sofa"]
    scores = caption_metrics(captions, captions)
    assert isinstance(scores, CaptionScores) and scores.tokenizer == "treebank-nltk"
    assert list(scores) == [*COCO, *ROUGE_TYPES]
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == 1.0
    assert scores["CIDEr"] > 1  # CIDEr is not bounded by 1 (its tf-idf weights grow)
    assert all(scores[t] == pytest.approx(100.0) for t in ROUGE_TYPES)


def test_disjoint_captions_score_zero():
    scores = caption_metrics(["a dog runs", "blue sky"], [["two cats sleep"], ["green grass"]])
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in scores.values())


def test_one_reference_per_image_equals_a_list_of_one():
    preds = ["a dog runs on the grass", "a cat sleeps"]
    refs = ["a dog running on grass", "the cat is sleeping on a sofa"]
    assert caption_metrics(preds, refs) == caption_metrics(preds, [[r] for r in refs])


def test_best_reference_counts_for_rouge():
    alone = caption_metrics(["a dog runs"], [["a dog runs"]])
    with_worse = caption_metrics(["a dog runs"], [["green grass", "a dog runs"]])
    assert all(with_worse[t] == alone[t] == 100.0 for t in ROUGE_TYPES)


@pytest.mark.parametrize(
    "predictions, references",
    [
        (["", "a cat"], [["a dog"], ["a cat"]]),  # an empty prediction
        (["a dog", "a cat"], [[], ["a cat"]]),  # an image without references
        (["a dog", ""], [[""], ["", ""]]),  # no reference has a token: CIDEr has no n-grams
        (["...!?", "«»—…"], [["?!"], ["(,)"]]),  # punctuation only
        (["café 😀 naïve", "日本語 の 説明"], [["Café naïve"], ["日本語 の 説明"]]),  # unicode
        (["a b\r\nc\u2028d\te", "x"], [["a b c d e"], ["x"]]),  # odd line breaks and tabs
    ],
)
def test_edge_cases_do_not_crash(predictions, references):
    scores = caption_metrics(predictions, references)
    assert all(math.isfinite(v) for v in scores.values())


def test_empty_prediction_scores_zero():
    scores = caption_metrics([""], [["a dog runs on the grass", "a running dog"]])
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in scores.values())


def test_treebank_tokenize_mimics_the_java_ptb_tokenizer():
    # Outputs of pycocoevalcap's Java PTBTokenizer on the same captions.
    assert treebank_tokenize("A DOG'S toy; it's (red)!") == "a dog 's toy it 's -lrb- red -rrb-"
    assert treebank_tokenize("A man riding a horse. On the beach...") == (
        "a man riding a horse on the beach"
    )
    assert treebank_tokenize("a 'cool' cat -- “smart” — café 🍰 don't") == (
        "a cool cat smart café do n't"
    )
    assert treebank_tokenize("") == treebank_tokenize(" ... ") == ""


def test_split_sentences():
    # What nltk's punkt gives on these (it needs a data download; the regex does not). A line
    # break also ends a sentence: rouge_score splits rougeLsum text on line breaks anyway.
    assert split_sentences("  A dog runs. It jumps!  Is it happy? yes.  ") == [
        "A dog runs.",
        "It jumps!",
        "Is it happy?",
        "yes.",
    ]
    assert split_sentences('He said "hi." Then left.') == ['He said "hi."', "Then left."]
    assert split_sentences("a dog\nin the park") == ["a dog", "in the park"]
    assert split_sentences("") == split_sentences(" \n ") == []


def test_metric_path_holds_the_evaluate_module():
    assert os.path.isfile(os.path.join(metric_path(), "caption_metric.py"))
