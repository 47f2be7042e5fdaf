"""The end of a `train` run: the exported model, and its upload to the hub."""

from __future__ import annotations

import json
import os

import huggingface_hub

from nnx_caption import processes, rundir
from nnx_caption.edits import class_spec
from nnx_caption.errors import RunError
from nnx_caption.files import replacing
from nnx_caption.hub import copy_aux_files
from nnx_caption.lora import merge_lora
from nnx_caption.progress import log
from nnx_caption.saving import save_pretrained, unnamed_params
from nnx_caption.train import Trainer
from nnx_caption.train_args import TrainArgs


def export(trainer: Trainer, output_dir: str, source: str) -> str:
    """The final model with tokenizer, processor and generation config: in HF layout, which
    transformers' VisionEncoderDecoderModel.from_pretrained(output_dir) loads, when every
    parameter has a Hugging Face name; else in NNX layout. Returns the layout."""
    model = trainer.model
    merge_lora(model)  # adapters become plain weights: the export is an ordinary checkpoint
    unnamed = unnamed_params(model)
    layout = "nnx" if unnamed else "hf"
    save_pretrained(model, output_dir, layout=layout, overwrite=True)  # its own output_dir
    if not processes.is_main():  # it took part in gathering the weights; process 0 wrote them
        return layout
    copy_aux_files(source, output_dir)
    if unnamed:
        log(
            f"exported NNX layout to {output_dir}: {len(unnamed)} parameters have no Hugging "
            f"Face name (e.g. {unnamed[0]}), so transformers could not load them; load it with "
            f"--model_class {class_spec(type(model))}"
        )
    else:
        log(f"exported HF layout to {output_dir}: transformers loads it as it is")
    return layout


def push_to_hub(a: TrainArgs, results: dict) -> None:
    """Uploads published_files(output_dir) with a model card. A RunError naming the cause when
    the hub cannot be reached or refuses (everything else of the run is saved by then)."""
    repo = a.hub_model_id or os.path.basename(os.path.abspath(a.output_dir))
    card = [
        "---",
        "library_name: transformers",
        "tags: [image-captioning, nnx-caption]",
        "---",
        f"# {repo}",
        "",
        "Trained with nnx-caption.",
        "",
        "## Results",
        "",
        "```json",
        json.dumps(results, indent=2),
        "```",
        "",
    ]
    with replacing(os.path.join(a.output_dir, rundir.MODEL_CARD), encoding="utf-8") as f:
        f.write("\n".join(card))
    files = rundir.published_files(a.output_dir)
    try:
        api = huggingface_hub.HfApi(token=a.hub_token)
        api.create_repo(repo, exist_ok=True)
        # Exact names, so that "*" cannot reach into subfolders (dataset_images/, ...).
        api.upload_folder(repo_id=repo, folder_path=a.output_dir, allow_patterns=files)
    except Exception as err:  # the hub client raises many kinds (HTTP, connection, offline)
        cause = (str(err).splitlines() or [type(err).__name__])[0]
        if a.hub_token:
            cause = cause.replace(a.hub_token, "<HUB_TOKEN>")
        raise RunError(
            f"--push_to_hub {repo}: {type(err).__name__}: {cause}. Everything else is saved in "
            f"{a.output_dir}; upload these files of it yourself once the hub can be reached: "
            + ", ".join(files)
        ) from None
    log(f"pushed {', '.join(files)} to {repo}")
