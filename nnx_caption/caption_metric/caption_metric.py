"""`evaluate` metric module: ``evaluate.load(nnx_caption.metrics.metric_path())``.

Loads from this local folder without any download, and composes with ``evaluate.combine``.
"""

import datasets
import evaluate

from nnx_caption.metrics import caption_metrics

_DESCRIPTION = """\
Image-captioning metrics: the COCO scores of pycocoevalcap (Bleu_1..Bleu_4, METEOR when Java is
present, ROUGE_L, CIDEr; after PTB tokenization) and the ROUGE F-measures x 100 that Hugging
Face's run_image_captioning_flax.py reports (rouge1, rouge2, rougeL, rougeLsum).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: list of str, one generated caption an image.
    references: list of str (one reference an image) or list of list of str (several).
Returns:
    the float scores named above, plus "tokenizer": "ptb-java" (pycocoevalcap's Java
    PTBTokenizer) or "treebank-nltk" (the pure-Python fallback used without Java).
Example:
    >>> metric = evaluate.load(nnx_caption.metrics.metric_path())
    >>> metric.compute(predictions=["a cat on a mat"], references=[["a cat sits on a mat"]])
"""

_CITATION = """\
@inproceedings{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and
          Gupta, Saurabh and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_STRING = datasets.Value("string")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Several references an image, or exactly one (evaluate picks the matching schema).
            features=[
                datasets.Features(
                    {"predictions": _STRING, "references": datasets.Sequence(_STRING)}
                ),
                datasets.Features({"predictions": _STRING, "references": _STRING}),
            ],
        )

    def _compute(self, predictions: list[str], references: list) -> dict[str, float | str]:
        scores = caption_metrics(predictions, references)
        return {**scores, "tokenizer": scores.tokenizer}
