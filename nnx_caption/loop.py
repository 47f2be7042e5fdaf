"""`nnx-caption train`: HF's run_image_captioning_flax.py rebuilt on nnx-caption.

Same flags, same meaning; plus gradient accumulation, clipping, checkpoints that resume
exactly, a (data, fsdp, tensor) mesh, freezing. A run resumes from the newest checkpoint in
output_dir by itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp
import numpy as np

from nnx_caption import data as data_lib
from nnx_caption.flags import (
    ModelArgs,
    UsageError,
    add_flags,
    check_patterns,
    flag,
    flags,
    from_values,
)
from nnx_caption.hf import resolve, save_pretrained
from nnx_caption.processing import ImageProcessor, Tokenizer
from nnx_caption.train import TrainConfig, Trainer, checkpoints, prune_checkpoints


@dataclass(frozen=True)
class TrainArgs(ModelArgs, TrainConfig):
    """Data, evaluation, checkpoints and output. The flags of `train` are these (HF's
    run_image_captioning_flax.py's, same names and meaning, then ours), ModelArgs' and
    TrainConfig's; run() sets TrainConfig's other fields (total_steps from --max_steps or
    --num_train_epochs, lora from --lora_rank)."""

    output_dir: str = flag("", "where checkpoints, metrics, results and the final model go")
    overwrite_output_dir: bool = flag(
        False, "delete output_dir first instead of resuming from its checkpoints"
    )
    do_train: bool = flag(False, "train on --train_file")
    do_eval: bool = flag(
        False,
        "evaluate on --validation_file (loss; captions and metrics with --predict_with_generate)",
    )
    do_predict: bool = flag(False, "evaluate on --test_file")
    train_file: str | None = flag(
        None, "csv / json / jsonl with image and caption columns, or an imagefolder"
    )
    validation_file: str | None = flag(None, "as --train_file, for evaluation")
    test_file: str | None = flag(None, "as --train_file, for --do_predict")
    dataset_name: str | None = flag(
        None,
        "HF datasets name or builder, e.g. imagefolder with --data_dir (needs the optional "
        "`datasets` package)",
    )
    dataset_config_name: str | None = flag(None, "HF datasets config name")
    data_dir: str | None = flag(
        None, "folder image paths are relative to (default: the data file's folder)"
    )
    image_column: str = flag("image_path", "column holding image paths")
    caption_column: str = flag("caption", "column holding captions")
    max_target_length: int = flag(
        128, "caption tokens (incl. EOS) in training; longer ones are truncated"
    )
    val_max_target_length: int | None = flag(
        None, "max_length of generated captions and eval targets"
    )
    max_train_samples: int | None = flag(None, "use only the first N training rows")
    max_eval_samples: int | None = flag(None, "use only the first N validation rows")
    max_predict_samples: int | None = flag(None, "use only the first N test rows")
    per_device_train_batch_size: int = flag(8, "examples per device per micro-batch")
    per_device_eval_batch_size: int = flag(8, "examples per device in evaluation")
    num_train_epochs: float = flag(3.0, "epochs to train (may be fractional)")
    logging_steps: int = flag(500, "log metrics every N steps")
    eval_steps: int | None = flag(None, "evaluate every N steps during training")
    predict_with_generate: bool = flag(False, "generate captions in evaluation and score them")
    num_beams: int | None = flag(
        None, "beams for generation (default: the checkpoint's generation config)"
    )
    push_to_hub: bool = flag(False, "upload output_dir to the hub at the end")
    hub_model_id: str | None = flag(None, "hub repo to push to (default: output_dir's name)")
    hub_token: str | None = flag(None, "hub token (default: the logged-in one)")
    # Beyond HF's script.
    max_steps: int | None = flag(None, "stop after N optimizer steps (overrides num_train_epochs)")
    save_steps: int | None = flag(None, "checkpoint every N steps (always at the end)")
    save_total_limit: int | None = flag(None, "keep only the newest N checkpoints")
    lora_rank: int = flag(
        0,
        "train only LoRA adapters of this rank on the attention and MLP projections (merged "
        "into the weights at export)",
    )
    captions_per_image: int = flag(
        1,
        "k > 1: batches of images with k captions each, each image encoded once per step; an "
        "epoch covers every image once (default 1: every caption once, as HF)",
    )
    preprocessing_num_workers: int = flag(2, "processes decoding images")
    image_cache_gb: float = flag(
        2.0,
        "keep a split's resized images in memory when they fit in this many GiB (decoded "
        "once); larger splits are decoded batch by batch",
    )
    eval_limit_batches: int | None = flag(None, "evaluate only the first N batches")


def _log(msg: str) -> None:
    print(f"[nnx-caption] {msg}", file=sys.stderr, flush=True)


def _check_args(a: TrainArgs) -> None:
    if not a.model_name_or_path or not a.output_dir:
        raise UsageError("--model_name_or_path and --output_dir are required")
    if not (a.do_train or a.do_eval or a.do_predict):
        raise UsageError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    if a.dataset_name:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise UsageError(
                "--dataset_name needs the optional `datasets` package (pip install datasets); "
                "or export the splits to csv/jsonl or an imagefolder and pass --train_file etc."
            ) from None
    for todo, needed in (
        ("do_train", "train_file"),
        ("do_eval", "validation_file"),
        ("do_predict", "test_file"),
    ):
        if getattr(a, todo) and not getattr(a, needed) and not a.dataset_name:
            raise UsageError(f"--{todo} needs --{needed}")
    a.check()
    k = a.captions_per_image
    if k < 1 or a.per_device_train_batch_size % k:
        raise UsageError(
            f"--captions_per_image {k} must divide --per_device_train_batch_size "
            f"{a.per_device_train_batch_size}: each device holds whole images with their captions"
        )
    for name in ("trainable", "freeze"):
        check_patterns(name, getattr(a, name))
    if a.lora_rank < 0:
        raise UsageError(f"--lora_rank must be >= 0, got {a.lora_rank}")


def _holds_files(directory: str) -> bool:
    """Whether a folder holds anything but empty folders (a run stopped before it wrote
    anything, e.g. on a bad flag, leaves only those)."""
    return any(files for _, _, files in os.walk(directory))


def _prepare_output_dir(a: TrainArgs) -> str:
    ckpt_dir = os.path.join(a.output_dir, "checkpoints")
    if a.overwrite_output_dir and os.path.isdir(a.output_dir):
        shutil.rmtree(a.output_dir)
    elif a.do_train and _holds_files(a.output_dir) and not checkpoints(ckpt_dir):
        raise UsageError(
            f"--output_dir {a.output_dir} exists, is not empty and holds no checkpoint to "
            "resume from; use --overwrite_output_dir to start over there"
        )
    os.makedirs(ckpt_dir, exist_ok=True)
    return ckpt_dir


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
            if not os.path.exists(path):
                image.save(path)
        examples.append(data_lib.Example(path, caption))
        if limit is not None and len(examples) == limit:
            break
    return data_lib.Split(examples, skipped)


def _dataset(
    a: TrainArgs, path: str, limit: int | None, target_len: int, proc, tok, cfg, name: str
) -> data_lib.CaptionDataset:
    if a.dataset_name:
        split = hf_dataset_split(a, {"eval": "validation"}.get(name, name), limit)
    else:
        split = data_lib.load_split(path, a.image_column, a.caption_column, a.data_dir, limit)
    ds = data_lib.CaptionDataset(
        split,
        proc,
        tok,
        target_len,
        cfg.decoder_start_token_id,
        cfg.pad_token_id,
        workers=a.preprocessing_num_workers,
        cache_limit_bytes=a.image_cache_gb * 1024**3,
    )
    skipped = ds.skipped
    if skipped:
        _log(
            f"{name}: skipped {len(skipped)} of {len(skipped) + len(ds)} rows; first: "
            + "; ".join(f"{where}: {why}" for where, why in skipped[:3])
        )
        with open(os.path.join(a.output_dir, f"skipped_{name}.jsonl"), "w") as f:
            for where, why in skipped:
                f.write(json.dumps({"row": where, "reason": why}) + "\n")
    if len(ds) == 0:
        raise UsageError(f"{path or a.dataset_name}: no usable rows ({len(skipped)} skipped)")
    _log(f"{name}: {len(ds)} examples from {path or a.dataset_name}")
    return ds


def run(a: TrainArgs) -> dict:
    """Runs training / evaluation / prediction as HF's script does; returns the results."""
    _check_args(a)
    ckpt_dir = _prepare_output_dir(a)
    devices = jax.device_count()
    mesh = a.mesh()
    source = resolve(a.model_name_or_path)
    model = a.load(source, mesh, seed=a.seed)
    if a.lora_rank:
        from nnx_caption.lora import add_lora

        _log(
            f"LoRA rank {a.lora_rank} on {add_lora(model, a.lora_rank, seed=a.seed)} "
            "projections; only the adapters train"
        )
    cfg = model.config
    tok = Tokenizer.from_pretrained(source)
    proc = ImageProcessor.from_pretrained(source)
    val_len = a.val_max_target_length or a.max_target_length
    results: dict = {}

    train_ds = (
        _dataset(a, a.train_file, a.max_train_samples, a.max_target_length, proc, tok, cfg, "train")
        if a.do_train
        else None
    )
    eval_ds = (
        _dataset(a, a.validation_file, a.max_eval_samples, val_len, proc, tok, cfg, "eval")
        if a.do_eval
        else None
    )
    global_batch = a.per_device_train_batch_size * devices * a.gradient_accumulation_steps
    eval_batch = a.per_device_eval_batch_size * devices

    # A DataError (the CLI's usage exit) when the split does not fill one batch.
    k = a.captions_per_image
    steps_per_epoch = train_ds.steps_per_epoch(global_batch, k) if train_ds else 1
    total = a.max_steps or int(steps_per_epoch * a.num_train_epochs)
    derived = dict(total_steps=max(total, 1), lora=bool(a.lora_rank))
    tcfg = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)} | derived)
    trainer = Trainer(model, tcfg, mesh)
    existing = checkpoints(ckpt_dir)
    if existing and a.do_train:
        meta = trainer.restore(existing[-1])
        _log(f"resumed from {existing[-1]} (step {meta['step']})")

    def evaluate(ds, prefix: str) -> dict:
        out = evaluate_split(trainer, ds, eval_batch, val_len, a, tok, prefix)
        with open(os.path.join(a.output_dir, f"{prefix}_results.json"), "w") as f:
            json.dump(out, f, indent=2)
        _log(
            f"{prefix}: "
            + ", ".join(f"{k}={v:.4g}" for k, v in out.items() if isinstance(v, float))
        )
        return out

    if a.do_train:
        history = train_loop(
            trainer,
            train_ds,
            a,
            global_batch,
            total,
            ckpt_dir,
            eval_fn=(lambda: evaluate(eval_ds, "eval")) if eval_ds else None,
        )
        results["train"] = {
            "steps": trainer.step,
            "final_loss": history[-1]["loss"] if history else None,
        }
        export(trainer, a.output_dir, source)
        plot_loss(
            os.path.join(a.output_dir, "metrics.jsonl"), os.path.join(a.output_dir, "loss.png")
        )
    if a.do_eval:
        results["eval"] = evaluate(eval_ds, "eval")
    if a.do_predict:
        test_ds = _dataset(a, a.test_file, a.max_predict_samples, val_len, proc, tok, cfg, "test")
        results["test"] = evaluate(test_ds, "test")
    if a.push_to_hub:
        push_to_hub(a, results)
    return results


def train_loop(
    trainer: Trainer, ds, a: TrainArgs, global_batch: int, total: int, ckpt_dir: str, eval_fn=None
) -> list[dict]:
    """Steps from trainer.step to `total`, logging, evaluating and checkpointing."""
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    metrics_path = os.path.join(a.output_dir, "metrics.jsonl")
    board = SummaryWriter(os.path.join(a.output_dir, "tensorboard"))
    history: list[dict] = []
    window: list[dict] = []
    bar = tqdm(
        total=total,
        initial=trainer.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0,
    )
    start, t0 = trainer.step, time.perf_counter()
    per_image = a.captions_per_image
    batches = data_lib.train_batches(
        ds, global_batch, a.seed, start_step=trainer.step, captions_per_image=per_image
    )
    for step, batch in batches:
        if step >= total:
            break
        window.append(trainer.train_step(batch))
        done = trainer.step
        bar.update(1)
        if done % a.logging_steps == 0 or done == total:
            logged = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
            rate = (done - start) * global_batch / (time.perf_counter() - t0)
            logged.update(
                step=done,
                epoch=done / ds.steps_per_epoch(global_batch, per_image),
                examples_per_second=rate,
            )
            history.append(logged)
            window = []
            with open(metrics_path, "a") as f:
                f.write(json.dumps(logged) + "\n")
            for key in ("loss", "learning_rate", "grad_norm", "examples_per_second"):
                board.add_scalar(f"train/{key}", logged[key], done)
            board.flush()
            bar.set_postfix(
                loss=f"{logged['loss']:.3f}",
                lr=f"{logged['learning_rate']:.2e}",
                ex_s=f"{rate:.0f}",
            )
        if eval_fn is not None and a.eval_steps and done % a.eval_steps == 0 and done < total:
            eval_fn()
        if a.save_steps and done % a.save_steps == 0:
            trainer.save(ckpt_dir, {"seed": a.seed})
            prune_checkpoints(ckpt_dir, a.save_total_limit)
    bar.close()
    if ds.late_failures:
        _log(
            f"{len(ds.late_failures)} images failed to decode during training and were left "
            f"out of the loss; first: {ds.late_failures[0][0]}: {ds.late_failures[0][1]}"
        )
    board.close()
    trainer.save(ckpt_dir, {"seed": a.seed})
    prune_checkpoints(ckpt_dir, a.save_total_limit)
    return history


def evaluate_split(
    trainer: Trainer,
    ds,
    batch_size: int,
    max_length: int,
    a: TrainArgs,
    tok: Tokenizer,
    prefix: str,
) -> dict:
    """Loss over the split; with predict_with_generate, captions and caption metrics too."""
    from nnx_caption.generate import generate
    from nnx_caption.metrics import caption_metrics

    total, count = 0.0, 0.0
    predictions: list[str] = []
    model = trainer.model
    for i, (batch, n_real) in enumerate(data_lib.eval_batches(ds, batch_size)):
        if a.eval_limit_batches and i >= a.eval_limit_batches:
            break
        # The last batch is padded to the compiled shape: its padding rows carry no tokens.
        real_rows = (np.arange(len(batch["labels"])) < n_real)[:, None]
        t, c = trainer.eval_loss(
            dict(batch, decoder_attention_mask=batch["decoder_attention_mask"] * real_rows)
        )
        total, count = total + t, count + c
        if a.predict_with_generate:
            out = generate(
                model,
                jnp.asarray(batch["pixel_values"]),
                max_length=max_length,
                num_beams=a.num_beams,
                mesh=trainer.mesh,
            )
            predictions += [
                p.strip()
                for p in tok.batch_decode(out.sequences[:n_real], skip_special_tokens=True)
            ]
    results = {f"{prefix}_loss": total / max(count, 1.0)}
    if a.predict_with_generate:
        examples = ds.examples[: len(predictions)]
        by_image: dict[str, list[str]] = {}
        for ex in ds.examples:
            by_image.setdefault(ex.image, []).append(ex.caption)
        references = [by_image[ex.image] for ex in examples]
        scores = caption_metrics(predictions, references)
        results.update({f"{prefix}_{k}": v for k, v in scores.items()})
        exact = np.mean(
            [
                p.lower() in {r.lower() for r in refs}
                for p, refs in zip(predictions, references, strict=True)
            ]
        )
        results[f"{prefix}_exact_match"] = float(exact) * 100
        with open(os.path.join(a.output_dir, f"generated_{prefix}.json"), "w") as f:
            json.dump(
                [
                    {"image": ex.image, "label": ex.caption, "prediction": p}
                    for ex, p in zip(examples, predictions, strict=True)
                ],
                f,
                indent=1,
            )
    return results


def export(trainer: Trainer, output_dir: str, source: str) -> str:
    """The final model with tokenizer, processor and generation config: in HF layout, which
    transformers' VisionEncoderDecoderModel.from_pretrained(output_dir) loads, when every
    parameter has a Hugging Face name; else in NNX layout. Returns the layout."""
    from nnx_caption.edits import class_spec
    from nnx_caption.hf import copy_aux_files, unnamed_params
    from nnx_caption.lora import merge_lora

    model = trainer.model
    merge_lora(model)  # adapters become plain weights: the export is an ordinary checkpoint
    unnamed = unnamed_params(model)
    layout = "nnx" if unnamed else "hf"
    save_pretrained(model, output_dir, layout=layout, overwrite=True)  # its own output_dir
    copy_aux_files(source, output_dir)
    if unnamed:
        _log(
            f"exported NNX layout to {output_dir}: {len(unnamed)} parameters have no Hugging "
            f"Face name (e.g. {unnamed[0]}), so transformers could not load them; load it with "
            f"--model_class {class_spec(type(model))}"
        )
    else:
        _log(f"exported HF layout to {output_dir}: transformers loads it as it is")
    return layout


def plot_loss(metrics_path: str, png_path: str, size: tuple[int, int] = (640, 360)) -> None:
    """A loss-curve PNG drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    if not os.path.exists(metrics_path):
        return
    rows = [json.loads(line) for line in open(metrics_path)]
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if len(points) < 2:
        return
    w, h, pad = *size, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    steps, losses = zip(*points, strict=True)
    lo, hi = min(losses), max(losses)
    span_x, span_y = max(steps[-1] - steps[0], 1), max(hi - lo, 1e-9)
    xy = [
        (pad + (s - steps[0]) / span_x * (w - 2 * pad), h - pad - (v - lo) / span_y * (h - 2 * pad))
        for s, v in points
    ]
    draw.rectangle([pad, pad, w - pad, h - pad], outline="#999999")
    draw.line(xy, fill="#1f77b4", width=2)
    draw.text((pad, 10), f"training loss: {hi:.3f} -> {losses[-1]:.3f}", fill="black")
    draw.text((pad, h - pad + 8), f"step {steps[0]}", fill="black")
    draw.text((w - pad - 60, h - pad + 8), f"step {steps[-1]}", fill="black")
    img.save(png_path)


def push_to_hub(a: TrainArgs, results: dict) -> None:
    """Uploads output_dir (model, tokenizer, processor, results) with a model card."""
    import huggingface_hub

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
    with open(os.path.join(a.output_dir, "README.md"), "w") as f:
        f.write("\n".join(card))
    api = huggingface_hub.HfApi(token=a.hub_token)
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(
        repo_id=repo, folder_path=a.output_dir, ignore_patterns=["checkpoints/*", "*.tmp*"]
    )


# Command line -----------------------------------------------------------------------------------


def build_parser(parser) -> None:
    """Adds every TrainArgs flag, and the optional JSON config of them."""
    add_flags(parser, TrainArgs)
    parser.add_argument(
        "config",
        nargs="?",
        help="a JSON file of these flags (as HF's "
        "scripts accept); flags given on the command line win",
    )


def args_from_namespace(ns, argv: list[str]) -> TrainArgs:
    values = {f.name: getattr(ns, f.name) for f in flags(TrainArgs)}
    if ns.config:
        try:
            with open(ns.config, encoding="utf-8") as f:
                from_file = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"{ns.config}: cannot read the JSON config: {err}") from None
        unknown = set(from_file) - set(values)
        if unknown:
            raise UsageError(f"{ns.config}: unknown keys {sorted(unknown)}")
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        values.update({k: v for k, v in from_file.items() if k not in given})
    return from_values(TrainArgs, values)
