"""`train`'s data: the splits its flags name, from files or an HF `datasets` dataset."""

from __future__ import annotations

import json
import os

import jax

from nnx_caption import data as data_lib
from nnx_caption import processes
from nnx_caption.config import CaptionConfig
from nnx_caption.errors import UsageError
from nnx_caption.files import replacing
from nnx_caption.processing import ImageProcessor, Tokenizer
from nnx_caption.progress import log
from nnx_caption.train_args import TrainArgs


def hf_dataset_split(a: TrainArgs, split: str, limit: int | None) -> data_lib.Split:
    """One split of an HF `datasets` dataset (e.g. --dataset_name imagefolder --data_dir DIR).
    Image columns holding decoded images are written once as PNG files under output_dir, so
    that they go through the same image pipeline as files do."""
    import datasets

    try:
        ds = datasets.load_dataset(
            a.dataset_name, a.dataset_config_name, data_dir=a.data_dir, split=split
        )
    except Exception as err:  # datasets raises many kinds; the message says which
        raise UsageError(
            f"--dataset_name {a.dataset_name}: cannot load split {split!r}: {err}"
        ) from None
    for column in (a.image_column, a.caption_column):
        if column not in ds.column_names:
            raise UsageError(
                f"--dataset_name {a.dataset_name} ({split}): no column {column!r} "
                f"(columns: {', '.join(ds.column_names)})"
            )
    image_dir = os.path.join(a.output_dir, "dataset_images", split)
    if processes.is_main():
        os.makedirs(image_dir, exist_ok=True)
    examples, skipped = [], []
    for i, row in enumerate(ds):
        image, caption = row[a.image_column], row[a.caption_column]
        where = f"{a.dataset_name}:{split}:{i}"
        if not isinstance(caption, str) or not caption.strip():
            skipped.append((where, f"empty caption in column {a.caption_column!r}"))
            continue
        if isinstance(image, str):
            path = os.path.abspath(os.path.join(a.data_dir or "", image))
        else:
            path = os.path.join(image_dir, f"{i:08d}.png")
            if processes.is_main() and not os.path.exists(path):  # the others read it
                with replacing(path, "wb") as f:
                    image.save(f, format="PNG")
        examples.append(data_lib.Example(path, caption))
        if limit is not None and len(examples) == limit:
            break
    processes.barrier(f"dataset_images {split}")  # written before any process reads them
    return data_lib.Split(examples, skipped)


def load_dataset(
    a: TrainArgs,
    name: str,
    target_len: int,
    proc: ImageProcessor,
    tok: Tokenizer,
    cfg: CaptionConfig,
) -> data_lib.CaptionDataset:
    """The split `name` (train, eval or test) of --train_file / --validation_file / --test_file
    (or --dataset_name), as its --max_*_samples limits it; rows that cannot be used are logged
    and listed in skipped_{name}.jsonl."""
    path, limit = {
        "train": (a.train_file, a.max_train_samples),
        "eval": (a.validation_file, a.max_eval_samples),
        "test": (a.test_file, a.max_predict_samples),
    }[name]
    if a.dataset_name:
        split = hf_dataset_split(a, {"eval": "validation"}.get(name, name), limit)
    else:
        split = data_lib.load_split(
            path,
            a.image_column,
            a.caption_column,
            a.image_dir or a.data_dir,
            limit,
            split={"eval": "validation"}.get(name, name),
            karpathy_restval=a.karpathy_restval,
        )
    ds = data_lib.CaptionDataset(
        split,
        proc,
        tok,
        target_len,
        cfg.decoder_start_token_id,
        cfg.pad_token_id,
        workers=a.preprocessing_num_workers,
        cache_limit_bytes=a.image_cache_gb * 1024**3,
        process=(jax.process_index(), jax.process_count()),  # each host decodes its own rows
    )
    skipped = ds.skipped
    if skipped:
        log(
            f"{name}: skipped {len(skipped)} of {len(skipped) + len(ds)} rows; first: "
            + "; ".join(f"{where}: {why}" for where, why in skipped[:3])
        )
        if processes.is_main():
            with replacing(os.path.join(a.output_dir, f"skipped_{name}.jsonl")) as f:
                for where, why in skipped:
                    f.write(json.dumps({"row": where, "reason": why}) + "\n")
    if len(ds) == 0:
        raise UsageError(f"{path or a.dataset_name}: no usable rows ({len(skipped)} skipped)")
    log(f"{name}: {len(ds)} examples from {path or a.dataset_name}")
    return ds
