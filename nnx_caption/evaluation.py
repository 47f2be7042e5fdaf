"""`train`'s evaluation of a split: the loss over every caption and, with generation, one caption
per distinct image scored against all of that image's references (the COCO protocol), written
as {prefix}_results.json, generated_{prefix}.json and gallery_{prefix}.html."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from nnx_caption import data as data_lib
from nnx_caption import gallery, processes
from nnx_caption.captioning import Captioner
from nnx_caption.files import replacing
from nnx_caption.metrics import caption_metrics, exact_match
from nnx_caption.plots import plot_run
from nnx_caption.processing import load_rgb
from nnx_caption.progress import first_call, log
from nnx_caption.train import Trainer
from nnx_caption.train_log import append_metrics

GALLERY_LIMIT = 1000  # images shown in a gallery page


@dataclass
class Evaluator:
    """Evaluates `trainer`'s model on a split and writes what it found into output_dir (process
    0 writes; every process takes part in computing)."""

    trainer: Trainer
    output_dir: str
    batch_size: int  # the global batch of an evaluation step
    captioner: Captioner | None  # None: the loss only (no --predict_with_generate)
    limit_batches: int | None = None  # evaluate only the first N batches

    def __call__(self, ds: data_lib.CaptionDataset, prefix: str) -> dict:
        """{prefix}_loss and, with a captioner, the caption metrics; written to
        {prefix}_results.json, a metrics.jsonl row and the plots."""
        results = {f"{prefix}_loss": self.loss(ds)}
        if self.captioner is not None:
            results.update(self.captions(ds, prefix))
        if processes.is_main():
            with replacing(os.path.join(self.output_dir, f"{prefix}_results.json")) as f:
                json.dump(results, f, indent=2)
            append_metrics(self.output_dir, {"step": self.trainer.step, **results})
            plot_run(self.output_dir)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items() if isinstance(v, float))
            log(f"{prefix}: {shown}")
        return results

    def _batches(self, ds: data_lib.CaptionDataset, rows=None):
        for i, batch in enumerate(data_lib.eval_batches(ds, self.batch_size, rows)):
            if self.limit_batches and i >= self.limit_batches:
                return
            yield batch

    def loss(self, ds: data_lib.CaptionDataset) -> float:
        """The mean loss over every caption of the split."""
        total, count = 0.0, 0.0
        for batch, n_real in self._batches(ds):
            # The last batch is padded to the compiled shape: its padding rows carry no tokens.
            rows = data_lib.process_rows(self.batch_size, ds.process)  # this process's rows
            real_rows = (np.arange(rows.start, rows.stop) < n_real)[:, None]
            mask = batch["decoder_attention_mask"] * real_rows
            t, c = first_call(
                "eval step", self.trainer.eval_loss, {**batch, "decoder_attention_mask": mask}
            )
            total, count = total + t, count + c
        return total / max(count, 1.0)

    def captions(self, ds: data_lib.CaptionDataset, prefix: str) -> dict:
        """Captions each distinct image once and scores them against its references; writes
        generated_{prefix}.json (image, prediction, references) and gallery_{prefix}.html."""
        rows, references = ds.image_rows()
        predictions: list[str] = []
        for batch, n_real in self._batches(ds, rows):
            pixels = self.trainer.put({"pixel_values": batch["pixel_values"]})["pixel_values"]
            out = self.captioner.generate(self.trainer.model, pixels)
            predictions += [self.captioner.caption(out, i).caption for i in range(n_real)]
        if not processes.is_main():  # it took part in generating; process 0 scores and writes
            return {}
        images = [ds.examples[r].image for r in rows[: len(predictions)]]
        # Named relative to the folder that holds all of the split's images: these files are
        # published (push_to_hub), and a local absolute path is nobody else's business.
        root = os.path.commonpath([os.path.dirname(e.image) for e in ds.examples])
        names = [os.path.relpath(image, root) for image in images]
        references = references[: len(predictions)]
        scores = caption_metrics(predictions, references)
        results = {f"{prefix}_{k}": v for k, v in scores.items()}
        results[f"{prefix}_exact_match"] = exact_match(predictions, references)
        entries = zip(names, predictions, references, strict=True)
        self._write(f"generated_{prefix}.json", json.dumps(
            [dict(image=i, prediction=p, references=r) for i, p, r in entries], indent=1
        ))  # fmt: skip
        cards = _cards(images, names, predictions, references)
        search = self.captioner.search
        settings = dict(
            num_beams=search.num_beams, max_length=search.max_length, step=self.trainer.step
        )
        summary = gallery.summary(results[f"{prefix}_exact_match"], scores["CIDEr"])
        title = f"{prefix} at step {self.trainer.step}"
        self._write(
            f"gallery_{prefix}.html", gallery.page(title, settings, cards, len(images), summary)
        )
        return results

    def _write(self, name: str, text: str) -> None:
        with replacing(os.path.join(self.output_dir, name), encoding="utf-8") as f:
            f.write(text)


def _cards(images: list[str], names: list[str], predictions, references) -> list[gallery.Card]:
    """Gallery cards of the first GALLERY_LIMIT images (read from `images`, shown as `names`)."""
    cards = []
    for image, name, prediction, refs in zip(
        images[:GALLERY_LIMIT], names, predictions, references, strict=False
    ):
        try:
            thumb = gallery.thumbnail(load_rgb(image))
        except (OSError, ValueError):  # it decoded for the evaluation; a race with the disk
            continue
        cards.append(gallery.Card(name, thumb, prediction, None, references=refs))
    return cards
