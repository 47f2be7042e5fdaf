"""`nnx-caption train`: HF's run_image_captioning_flax.py rebuilt on nnx-caption.

Same flags, same meaning; plus gradient accumulation, clipping, checkpoints that resume
exactly, a (data, fsdp, tensor) mesh, freezing. A run resumes from the newest checkpoint in
output_dir by itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from nnx_caption import data as data_lib
from nnx_caption.edits import model_class
from nnx_caption.hf import from_pretrained, resolve, save_pretrained
from nnx_caption.layers import Execution
from nnx_caption.predict import UsageError
from nnx_caption.processing import ImageProcessor, Tokenizer
from nnx_caption.train import TrainConfig, Trainer, checkpoints, prune_checkpoints


@dataclass
class TrainArgs:
    """Flags of HF's run_image_captioning_flax.py (same names and meaning), then ours."""

    model_name_or_path: str = ""
    output_dir: str = ""
    overwrite_output_dir: bool = False
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    data_dir: str | None = None
    image_column: str = "image_path"
    caption_column: str = "caption"
    max_target_length: int = 128
    val_max_target_length: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_predict_samples: int | None = None
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    label_smoothing_factor: float = 0.0
    num_train_epochs: float = 3.0
    warmup_steps: int = 0
    logging_steps: int = 500
    eval_steps: int | None = None
    seed: int = 42
    dtype: str = "float32"
    predict_with_generate: bool = False
    num_beams: int | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    # Beyond HF's script.
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    max_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    model_class: str | None = None
    new_params: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    lora_rank: int = 0
    gradient_checkpointing: bool = False
    remat_policy: str | None = None
    scan_layers: bool = False
    captions_per_image: int = 1
    preprocessing_num_workers: int = 2
    image_cache_gb: float = 2.0
    eval_limit_batches: int | None = None


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
    for flag, needed in (
        ("do_train", "train_file"),
        ("do_eval", "validation_file"),
        ("do_predict", "test_file"),
    ):
        if getattr(a, flag) and not getattr(a, needed) and not a.dataset_name:
            raise UsageError(f"--{flag} needs --{needed}")
    if a.dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be float32, bfloat16 or float16, not {a.dtype!r}")
    k = a.captions_per_image
    if k < 1 or a.per_device_train_batch_size % k:
        raise UsageError(
            f"--captions_per_image {k} must divide --per_device_train_batch_size "
            f"{a.per_device_train_batch_size}: each device holds whole images with their captions"
        )
    try:
        Execution(remat_policy=a.remat_policy)
    except ValueError as e:
        raise UsageError(f"--remat_policy: {e}") from None
    for flag in ("new_params", "trainable", "freeze"):
        for pattern in getattr(a, flag):
            try:
                re.compile(pattern)
            except re.error as err:
                raise UsageError(
                    f"--{flag} {pattern!r} is not a regular expression: {err}"
                ) from None
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
    mesh = None
    if devices > 1:
        from nnx_caption.sharding import make_mesh

        mesh = make_mesh(a.mesh_data, a.mesh_fsdp, a.mesh_tensor)
    source = resolve(a.model_name_or_path)
    dtype = None if a.dtype == "float32" else jnp.dtype(a.dtype)
    model = from_pretrained(
        source,
        dtype,
        mesh=mesh,
        model_cls=model_class(a.model_class),
        new_params=a.new_params,
        execution=Execution(a.scan_layers, a.gradient_checkpointing, a.remat_policy),
        seed=a.seed,
    )
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
    tcfg = TrainConfig(
        learning_rate=a.learning_rate,
        weight_decay=a.weight_decay,
        adam_beta1=a.adam_beta1,
        adam_beta2=a.adam_beta2,
        adam_epsilon=a.adam_epsilon,
        warmup_steps=a.warmup_steps,
        total_steps=max(total, 1),
        label_smoothing_factor=a.label_smoothing_factor,
        max_grad_norm=a.max_grad_norm,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        freeze=tuple(a.freeze),
        trainable=tuple(a.trainable),
        new_params=tuple(a.new_params),
        seed=a.seed,
        lora=bool(a.lora_rank),
    )
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

HELP = {
    "model_name_or_path": "checkpoint folder (HF or converted layout) or hub repo id to start from",
    "output_dir": "where checkpoints, metrics, results and the final model are written",
    "overwrite_output_dir": "delete output_dir first instead of resuming from its checkpoints",
    "do_train": "train on --train_file",
    "do_eval": "evaluate on --validation_file (loss; captions and metrics with "
    "--predict_with_generate)",
    "do_predict": "evaluate on --test_file",
    "train_file": "csv / json / jsonl with image and caption columns, or an imagefolder",
    "validation_file": "as --train_file, for evaluation",
    "test_file": "as --train_file, for --do_predict",
    "dataset_name": "HF datasets name or builder, e.g. imagefolder with --data_dir (needs the "
    "optional `datasets` package)",
    "dataset_config_name": "HF datasets config name",
    "data_dir": "folder image paths are relative to (default: the data file's folder)",
    "image_column": "column holding image paths",
    "caption_column": "column holding captions",
    "max_target_length": "caption tokens (incl. EOS) in training; longer ones are truncated",
    "val_max_target_length": "max_length of generated captions and eval targets",
    "max_train_samples": "use only the first N training rows",
    "max_eval_samples": "use only the first N validation rows",
    "max_predict_samples": "use only the first N test rows",
    "per_device_train_batch_size": "examples per device per micro-batch",
    "per_device_eval_batch_size": "examples per device in evaluation",
    "learning_rate": "peak learning rate of AdamW",
    "weight_decay": "AdamW weight decay (not on biases and LayerNorm)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_epsilon": "AdamW epsilon",
    "label_smoothing_factor": "label smoothing of the cross-entropy",
    "num_train_epochs": "epochs to train (may be fractional)",
    "warmup_steps": "linear warmup steps, then linear decay to 0",
    "logging_steps": "log metrics every N steps",
    "eval_steps": "evaluate every N steps during training",
    "seed": "seed of data order, dropout and init",
    "dtype": "compute dtype: float32, bfloat16 or float16 (weights stay float32)",
    "predict_with_generate": "generate captions in evaluation and score them",
    "num_beams": "beams for generation (default: the checkpoint's generation config)",
    "push_to_hub": "upload output_dir to the hub at the end",
    "hub_model_id": "hub repo to push to (default: output_dir's name)",
    "hub_token": "hub token (default: the logged-in one)",
    "gradient_accumulation_steps": "micro-batches summed per optimizer step",
    "max_grad_norm": "clip gradients to this global norm",
    "max_steps": "stop after N optimizer steps (overrides num_train_epochs)",
    "save_steps": "checkpoint every N steps (always at the end)",
    "save_total_limit": "keep only the newest N checkpoints",
    "mesh_data": "data-parallel mesh axis size (-1: what the other axes leave)",
    "mesh_fsdp": "FSDP mesh axis size",
    "mesh_tensor": "tensor-parallel mesh axis size",
    "model_class": "the model to build, FILE.py:Class or module:Class: an edited architecture "
    "with VisionEncoderDecoder's constructor (default: VisionEncoderDecoder)",
    "new_params": "regexes matching whole NNX paths of parameters the checkpoint lacks (an "
    r"edit's new modules, e.g. 'decoder\.blocks\.\d+\.gate'): they keep --model_class's "
    "initial values; with --lora_rank they train with the adapters",
    "trainable": "only the parameters these NNX path prefixes or regexes match train; the rest "
    "is frozen (default: all)",
    "freeze": "NNX path prefixes or regexes not to train, e.g. encoder",
    "lora_rank": "train only LoRA adapters of this rank on the attention and MLP projections "
    "(merged into the weights at export)",
    "gradient_checkpointing": "remat: recompute each block's activations in the backward "
    "pass instead of storing them (less memory, more compute)",
    "remat_policy": "with --gradient_checkpointing, what is kept anyway: a jax.checkpoint_policies "
    "name, e.g. dots_with_no_batch_dims_saveable (default: nothing)",
    "scan_layers": "run each stack of blocks as one lax.scan: compile time stays flat in depth",
    "captions_per_image": "k > 1: batches of images with k captions each, each image encoded "
    "once per step; an epoch covers every image once (default 1: every caption once, as HF)",
    "image_cache_gb": "keep a split's resized images in memory when they fit in this many GiB "
    "(decoded once); larger splits are decoded batch by batch",
    "preprocessing_num_workers": "processes decoding images",
    "eval_limit_batches": "evaluate only the first N batches",
}


def add_flags(parser, fields_of: type, helps: dict[str, str]) -> None:
    """Adds every field of the dataclass `fields_of` as --name (and --name-with-dashes), typed
    from its annotation, with its help and default."""
    for f in dataclasses.fields(fields_of):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{helps[f.name]} (default: {default})"
        if f.type == "bool":
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_)
        elif f.type == "list[str]":
            parser.add_argument(*names, dest=f.name, nargs="*", default=[], help=help_)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(*names, dest=f.name, type=kind, default=default, help=help_)


def build_parser(parser) -> None:
    """Adds every TrainArgs field as a flag, and the optional JSON config of them."""
    add_flags(parser, TrainArgs, HELP)
    parser.add_argument(
        "config",
        nargs="?",
        help="a JSON file of these flags (as HF's "
        "scripts accept); flags given on the command line win",
    )


def args_from_namespace(ns, argv: list[str]) -> TrainArgs:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)}
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
    return TrainArgs(**values)
