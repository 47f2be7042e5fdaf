"""`nnx-caption train`: HF's run_image_captioning_flax.py rebuilt on nnx-caption.

Same flags, same meaning; plus gradient accumulation, clipping, checkpoints that resume
exactly, a (data, fsdp, tensor) mesh, freezing. A run resumes from the newest checkpoint in
output_dir by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, fields

import jax
import numpy as np

from nnx_caption import data as data_lib
from nnx_caption import gallery, processes, rundir
from nnx_caption.checkpointing import checkpoints
from nnx_caption.config import read_config
from nnx_caption.distributed import DistributedArgs
from nnx_caption.errors import Diverged, RunError
from nnx_caption.files import replacing
from nnx_caption.flags import (
    ModelArgs,
    UsageError,
    above,
    add_flags,
    at_least,
    flag,
    flags,
    from_values,
    one_of,
    public_values,
)
from nnx_caption.hf import resolve, save_pretrained
from nnx_caption.plots import METRICS_FILE, plot_run
from nnx_caption.preemption import Preempted, Preemption
from nnx_caption.processing import ImageProcessor, Tokenizer
from nnx_caption.progress import first_call, log
from nnx_caption.train import TrainConfig, Trainer


@dataclass(frozen=True)
class TrainArgs(ModelArgs, TrainConfig, DistributedArgs):
    """Data, evaluation, checkpoints and output. The flags of `train` are these (HF's
    run_image_captioning_flax.py's, same names and meaning, then ours), ModelArgs' and
    TrainConfig's; run() sets TrainConfig's other fields (total_steps from --max_steps or
    --num_train_epochs, lora from --lora_rank)."""

    output_dir: str = flag("", "where checkpoints, metrics, results and the final model go")
    overwrite_output_dir: bool = flag(
        False,
        "write into an output_dir that is not empty, and train from --model_name_or_path "
        "instead of resuming from its checkpoints (an earlier run's checkpoints and logs are "
        "removed then; nothing else is)",
    )
    do_train: bool = flag(False, "train on --train_file")
    do_eval: bool = flag(
        False,
        "evaluate on --validation_file (loss; captions and metrics with --predict_with_generate)",
    )
    do_predict: bool = flag(False, "evaluate on --test_file")
    train_file: str | None = flag(
        None,
        "csv / json / jsonl with image and caption columns, an imagefolder, a COCO captions "
        "file (captions_train2017.json) or a Karpathy split file (dataset_coco.json: its train "
        "split; as --validation_file its val split, as --test_file its test split)",
    )
    validation_file: str | None = flag(None, "as --train_file, for evaluation")
    test_file: str | None = flag(None, "as --train_file, for --do_predict")
    dataset_name: str | None = flag(
        None,
        "HF datasets name or builder, e.g. imagefolder with --data_dir (needs the optional "
        "`datasets` package)",
    )
    dataset_config_name: str | None = flag(None, "HF datasets config name")
    image_dir: str | None = flag(
        None,
        "folder the image paths of the data files are relative to (COCO: its root, holding "
        "train2017/ and val2017/, or the one folder of a file's images)",
    )
    karpathy_restval: bool = flag(
        False, "a Karpathy split file as --train_file: train on its restval images too"
    )
    data_dir: str | None = flag(
        None, "folder image paths are relative to (default: the data file's folder)"
    )
    image_column: str = flag("image_path", "column holding image paths")
    caption_column: str = flag("caption", "column holding captions")
    max_target_length: int = flag(
        128,
        "caption tokens (incl. EOS) in training; longer ones are truncated (at most the "
        "decoder's positions)",
        at_least(1),
    )
    val_max_target_length: int | None = flag(
        None, "max_length of generated captions and eval targets", at_least(2)
    )
    max_train_samples: int | None = flag(None, "use only the first N training rows", at_least(1))
    max_eval_samples: int | None = flag(None, "use only the first N validation rows", at_least(1))
    max_predict_samples: int | None = flag(None, "use only the first N test rows", at_least(1))
    per_device_train_batch_size: int = flag(8, "examples per device per micro-batch", at_least(1))
    per_device_eval_batch_size: int = flag(8, "examples per device in evaluation", at_least(1))
    num_train_epochs: float = flag(3.0, "epochs to train (may be fractional)", above(0))
    logging_steps: int = flag(500, "log metrics every N steps", at_least(1))
    eval_steps: int | None = flag(None, "evaluate every N steps during training", at_least(1))
    predict_with_generate: bool = flag(False, "generate captions in evaluation and score them")
    num_beams: int | None = flag(
        None, "beams for generation (default: the checkpoint's generation config)", at_least(1)
    )
    push_to_hub: bool = flag(
        False,
        "upload the model, its tokenizer and processor files, a model card, the results and "
        "the plots to the hub at the end",
    )
    hub_model_id: str | None = flag(None, "hub repo to push to (default: output_dir's name)")
    hub_token: str | None = flag(
        None, "hub token (default: the logged-in one); never written to a file", secret=True
    )
    # Beyond HF's script.
    max_steps: int | None = flag(
        None, "stop after N optimizer steps (overrides num_train_epochs)", at_least(1)
    )
    save_steps: int | None = flag(None, "checkpoint every N steps (always at the end)", at_least(1))
    save_total_limit: int | None = flag(None, "keep only the newest N checkpoints", at_least(1))
    lora_rank: int = flag(
        0,
        "train only LoRA adapters of this rank on the attention and MLP projections (merged "
        "into the weights at export)",
        at_least(0),
    )
    captions_per_image: int = flag(
        1,
        "k > 1: batches of images with k captions each, each image encoded once per step; an "
        "epoch covers every image once (default 1: every caption once, as HF)",
        at_least(1),
    )
    captions_per_step: str = flag(
        "all",
        "all: an epoch is every caption once (HF); sample: every image once, with one of its "
        "captions drawn at random each epoch (big_vision)",
        one_of(*data_lib.CAPTIONS_PER_STEP),
    )
    preprocessing_num_workers: int = flag(
        2, "grain worker processes decoding images (per host); 0: in the main process", at_least(0)
    )
    image_cache_gb: float = flag(
        2.0,
        "keep a split's resized images in memory when they fit in this many GiB (decoded "
        "once); larger splits are decoded batch by batch",
        at_least(0),
    )
    eval_limit_batches: int | None = flag(None, "evaluate only the first N batches", at_least(1))


def _append_metrics(output_dir: str, row: dict) -> None:
    """One row of metrics.jsonl: a logging step's training metrics or an evaluation's."""
    with open(os.path.join(output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _check_args(a: TrainArgs) -> None:
    """A UsageError naming the flag that cannot work, before anything is read or written."""
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
    a.check()  # every flag's own check
    k = a.captions_per_image
    if a.per_device_train_batch_size % k:
        raise UsageError(
            f"--captions_per_image {k} must divide --per_device_train_batch_size "
            f"{a.per_device_train_batch_size}: each device holds whole images with their captions"
        )


def _check_lengths(a: TrainArgs, config) -> None:
    """Caption lengths the model's decoder can hold: its positions bound both the training
    targets and the generated captions (whose max_length counts the start token)."""
    positions = config.decoder.n_positions
    for name in ("max_target_length", "val_max_target_length"):
        value = getattr(a, name)
        if value is not None and value > positions:
            raise UsageError(
                f"--{name} {value}: the decoder of {a.model_name_or_path} has {positions} "
                f"positions; pass at most {positions}"
            )
    if a.predict_with_generate and (a.val_max_target_length or a.max_target_length) < 2:
        raise UsageError(
            "--predict_with_generate: generated captions count the start token, so "
            "--val_max_target_length (or --max_target_length) must be at least 2"
        )


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


def _dataset(
    a: TrainArgs, path: str, limit: int | None, target_len: int, proc, tok, cfg, name: str
) -> data_lib.CaptionDataset:
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


def run(a: TrainArgs) -> dict:
    """Runs training / evaluation / prediction as HF's script does; returns the results. Every
    flag is checked before the run directory is touched, data is read or anything compiles;
    the directory is then held by this run alone (rundir.RunLock) until it ends."""
    _check_args(a)
    mesh = a.mesh()  # a UsageError when the --mesh_* flags do not fit the devices
    if mesh is not None:
        log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices")
    source = resolve(a.model_name_or_path)
    _check_lengths(a, read_config(source))
    lock = rundir.RunLock(a.output_dir)
    todo = processes.from_main(lambda: _take(a, lock), (UsageError, OSError))
    try:
        return _run(a, mesh, source, lock, todo)
    finally:
        if processes.is_main():
            lock.release()


def _take(a: TrainArgs, lock: rundir.RunLock) -> str:
    """Process 0's part of a start: the run directory's lock, what to do there (rundir.plan),
    and train_args.json; what an earlier run's cut-off writes left is removed."""
    lock.acquire()
    try:
        todo = rundir.plan(a.output_dir, a.overwrite_output_dir, a.do_train)
        stale = rundir.remove_stale_temporary_files(a.output_dir)
        if stale:
            log(f"removed what writes cut off by an earlier run left: {', '.join(stale)}")
        if a.do_train:  # the run's flags, secrets masked, written first: the folder is a run's
            with replacing(os.path.join(a.output_dir, rundir.RUN_MARKER), encoding="utf-8") as f:
                json.dump(public_values(a), f, indent=2)
    except BaseException:
        lock.release()
        raise
    return todo


def _run(a: TrainArgs, mesh, source: str, lock: rundir.RunLock, todo: str) -> dict:
    ckpt_dir = os.path.join(a.output_dir, rundir.CHECKPOINTS)
    devices = jax.device_count()
    model = a.load(source, mesh, seed=a.seed)
    if a.lora_rank:
        from nnx_caption.lora import add_lora

        log(
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
    k, per_step = a.captions_per_image, a.captions_per_step
    steps_per_epoch = train_ds.steps_per_epoch(global_batch, k, per_step) if train_ds else 1
    total = a.max_steps or int(steps_per_epoch * a.num_train_epochs)
    if a.do_train and total < 1:
        raise UsageError(
            f"--num_train_epochs {a.num_train_epochs} is less than one step of the "
            f"{steps_per_epoch} of an epoch: train longer, or pass --max_steps"
        )
    derived = dict(total_steps=max(total, 1), lora=bool(a.lora_rank))
    tcfg = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)} | derived)
    trainer = Trainer(model, tcfg, mesh)
    if todo == "resume":
        _resume(trainer, ckpt_dir, a, global_batch, devices)
    elif todo in ("fresh", "start over") and processes.is_main():
        if todo == "start over":
            where = a.output_dir
            log(f"{where}: the earlier run stopped before its first checkpoint: starting over")
        removed = rundir.clear_previous_run(a.output_dir)
        if removed and todo == "fresh":
            log(f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)}")

    def evaluate(ds, prefix: str) -> dict:
        out = evaluate_split(trainer, ds, eval_batch, val_len, a, tok, prefix)
        if processes.is_main():  # the others took part in computing it; process 0 writes
            with replacing(os.path.join(a.output_dir, f"{prefix}_results.json")) as f:
                json.dump(out, f, indent=2)
            _append_metrics(a.output_dir, {"step": trainer.step, **out})
            plot_run(a.output_dir)
            log(
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
            lock=lock,
        )
        results["train"] = {
            "steps": trainer.step,
            "final_loss": history[-1]["loss"] if history else None,
        }
        export(trainer, a.output_dir, source)
        if not (a.do_eval or a.do_predict) and processes.is_main():  # else after each one
            plot_run(a.output_dir)
    if a.do_eval:
        results["eval"] = evaluate(eval_ds, "eval")
    if a.do_predict:
        test_ds = _dataset(a, a.test_file, a.max_predict_samples, val_len, proc, tok, cfg, "test")
        results["test"] = evaluate(test_ds, "test")
    if a.push_to_hub:  # by process 0; its failure is every process's
        processes.from_main(lambda: push_to_hub(a, results), (RunError,))
    return results


def _resume(trainer: Trainer, ckpt_dir: str, a: TrainArgs, global_batch: int, devices: int):
    """The newest checkpoint that passes its checks (those that fail are moved aside), if it
    was trained as this run will go on: the same global batch and seed."""
    meta, path = trainer.restore_newest(ckpt_dir)
    saved_batch = meta.get("global_batch", global_batch)
    if saved_batch != global_batch:  # the data position would mean other examples
        raise UsageError(
            f"{path} was trained with a global batch of {saved_batch} examples; "
            f"this run's is {global_batch} (--per_device_train_batch_size "
            f"{a.per_device_train_batch_size} x {devices} devices x "
            f"--gradient_accumulation_steps {a.gradient_accumulation_steps}): pass a "
            f"per-device batch that gives {saved_batch} on these {devices} devices"
        )
    if meta.get("seed", a.seed) != a.seed:  # the data order and dropout come from it
        raise UsageError(
            f"{path} was trained with --seed {meta['seed']}; resume with it, not {a.seed}"
        )
    if processes.is_main():
        rundir.drop_rows_after(a.output_dir, trainer.step)  # they are logged again
    log(f"resumed from {path} (step {meta['step']})")


def train_loop(
    trainer: Trainer,
    ds,
    a: TrainArgs,
    global_batch: int,
    total: int,
    ckpt_dir: str,
    eval_fn=None,
    lock: rundir.RunLock | None = None,
) -> list[dict]:
    """Steps from trainer.step to `total`, logging, evaluating and checkpointing. Stops with
    a RunError (Diverged, SaveFailed) before anything after the last good checkpoint is saved
    or exported; its message names that checkpoint."""
    try:
        return _steps(trainer, ds, a, global_batch, total, ckpt_dir, eval_fn, lock)
    except Diverged as err:
        with contextlib.suppress(RunError):  # a failed save in flight shows on the next run
            trainer.wait()  # the saves in flight are of steps before the divergence
        last = checkpoints(ckpt_dir)
        raise Diverged(
            f"{err}. Nothing after it was saved or exported; the last good checkpoint is "
            f"{last[-1] if last else 'none'}. Lower --learning_rate (or clip with "
            "--max_grad_norm, warm up with --warmup_steps) and run the same command: it "
            "resumes from there"
        ) from None


class _Progress:
    """What a person watching a run sees, and what it leaves to read later: the progress bar,
    and at each logging step a metrics.jsonl row and TensorBoard scalars of the steps since
    the last one, with their throughput (the compiling first step is left out of both)."""

    def __init__(self, a: TrainArgs, trainer: Trainer, total: int, steps_per_epoch: int):
        from tensorboardX import SummaryWriter

        self.a, self.total, self.steps_per_epoch = a, total, steps_per_epoch
        self.start = trainer.step
        self.writer = processes.is_main()  # process 0 writes the run directory
        # A resumed run's TensorBoard drops what earlier runs logged from this step on.
        path = os.path.join(a.output_dir, rundir.TENSORBOARD)
        self.board = SummaryWriter(path, purge_step=trainer.step or None) if self.writer else None
        self.bar = None  # made after the first step, which compiles: its ETA would count it
        self.window: list[dict] = []  # the steps' metrics since the last logging step
        self.timed_steps, self.timed_since = 0, 0.0  # in the window, after the compiling one

    def step(self, metrics: dict) -> None:
        """Notes a step's metrics (still on the device: nothing waits for them here)."""
        from tqdm import tqdm

        self.window.append(metrics)
        if self.bar is None:
            self.bar = tqdm(
                total=self.total,
                initial=self.start + 1,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=2.0,
                disable=not self.writer,
            )
            self.timed_since = time.perf_counter()
        else:
            self.timed_steps += 1
            self.bar.update(1)

    def log(self, done: int, examples_per_step: int) -> dict:
        """The logging row of the steps since the last one, written to metrics.jsonl and
        TensorBoard (reading it waits for those steps)."""
        window = self.window
        logged = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
        now = time.perf_counter()  # float() above waited for the window's steps
        # Examples per second of the steps timed in the window: none when its only step was
        # the compiling one.
        seconds = now - self.timed_since
        rate = self.timed_steps * examples_per_step / seconds if self.timed_steps else None
        logged.update(step=done, epoch=done / self.steps_per_epoch, examples_per_second=rate)
        self.window, self.timed_steps, self.timed_since = [], 0, now
        if self.writer:
            _append_metrics(self.a.output_dir, logged)  # NaN too: the row a divergence shows
            for key in ("loss", "learning_rate", "grad_norm", "examples_per_second"):
                if logged[key] is not None and np.isfinite(logged[key]):
                    self.board.add_scalar(f"train/{key}", logged[key], done)
            self.board.flush()
        self.bar.set_postfix(
            loss=f"{logged['loss']:.3f}",
            lr=f"{logged['learning_rate']:.2e}",
            ex_s="-" if rate is None else f"{rate:.0f}",
        )
        return logged

    def restart_timing(self) -> None:
        """After an evaluation: it is not training throughput."""
        self.timed_since = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.board is not None:
            self.board.close()


def _steps(trainer, ds, a: TrainArgs, global_batch, total, ckpt_dir, eval_fn, lock) -> list[dict]:
    steps_per_epoch = ds.steps_per_epoch(global_batch, a.captions_per_image, a.captions_per_step)
    batches = data_lib.train_batches(
        ds,
        global_batch,
        a.seed,
        start_step=trainer.step,
        captions_per_image=a.captions_per_image,
        captions_per_step=a.captions_per_step,
    )
    progress = _Progress(a, trainer, total, steps_per_epoch)
    history: list[dict] = []
    try:
        with Preemption() as preemption:  # SIGTERM: save at the next step boundary, exit 0
            for step, batch in batches:
                if step >= total:
                    break
                first = progress.bar is None
                progress.step(
                    first_call("train step", trainer.train_step, batch)
                    if first
                    else trainer.train_step(batch)
                )
                trainer.checkpointer.raise_if_failed()  # a background save that failed
                done = trainer.step
                if done % a.logging_steps == 0 or done == total:
                    history.append(progress.log(done, global_batch))
                    trainer.check_finite()  # the window's steps are done: reading it is free
                    if processes.any_process(lock is not None and lock.lost):  # process 0's
                        raise RunError(
                            f"{lock.path} was taken over by another run (it found this one "
                            f"stale): stopped at step {done}; the checkpoints are in {ckpt_dir}"
                        )
                if eval_fn and a.eval_steps and done % a.eval_steps == 0 and done < total:
                    trainer.check_finite()
                    eval_fn()
                    progress.restart_timing()
                saved = a.save_steps and done % a.save_steps == 0
                if saved:
                    _save(trainer, ckpt_dir, a, global_batch)
                if preemption.stop_now():  # SIGTERM: stop here, saved, and say how to go on
                    if not saved:
                        _save(trainer, ckpt_dir, a, global_batch)
                    trainer.wait()
                    raise Preempted(
                        f"SIGTERM: saved step {done} in {ckpt_dir}; the same command resumes "
                        "from it"
                    )
    finally:
        progress.close()
    if ds.late_failures:
        log(
            f"{len(ds.late_failures)} images failed to decode during training and were left "
            f"out of the loss; first: {ds.late_failures[0][0]}: {ds.late_failures[0][1]}"
        )
    _save(trainer, ckpt_dir, a, global_batch)
    trainer.wait()
    return history


def _save(trainer: Trainer, ckpt_dir: str, a: TrainArgs, global_batch: int) -> None:
    """A checkpoint written in the background while training goes on (orbax, async); refused
    (Diverged) after a non-finite step."""
    extra = {"seed": a.seed, "global_batch": global_batch}  # a resume checks both
    trainer.save(ckpt_dir, extra, keep=a.save_total_limit, block=False)


def evaluate_split(
    trainer: Trainer,
    ds,
    batch_size: int,
    max_length: int,
    a: TrainArgs,
    tok: Tokenizer,
    prefix: str,
) -> dict:
    """Loss over every caption of the split; with predict_with_generate, one caption per
    distinct image, scored against all of that image's references (the COCO protocol)."""
    total, count = 0.0, 0.0
    for i, (batch, n_real) in enumerate(data_lib.eval_batches(ds, batch_size)):
        if a.eval_limit_batches and i >= a.eval_limit_batches:
            break
        # The last batch is padded to the compiled shape: its padding rows carry no tokens.
        rows = data_lib.process_rows(batch_size, ds.process)  # this process's of the batch
        real_rows = (np.arange(rows.start, rows.stop) < n_real)[:, None]
        masked = dict(batch, decoder_attention_mask=batch["decoder_attention_mask"] * real_rows)
        t, c = first_call("eval step", trainer.eval_loss, masked)
        total, count = total + t, count + c
    results = {f"{prefix}_loss": total / max(count, 1.0)}
    if a.predict_with_generate:
        results.update(_caption_images(trainer, ds, batch_size, max_length, a, tok, prefix))
    return results


def _caption_images(trainer, ds, batch_size, max_length, a: TrainArgs, tok, prefix) -> dict:
    """Captions each distinct image once; scores them against their references; writes
    generated_{prefix}.json (image, prediction, references) and gallery_{prefix}.html."""
    from nnx_caption.generate import generate
    from nnx_caption.metrics import caption_metrics, exact_match

    rows, references = ds.image_rows()
    predictions: list[str] = []
    for i, (batch, n_real) in enumerate(data_lib.eval_batches(ds, batch_size, rows)):
        if a.eval_limit_batches and i >= a.eval_limit_batches:
            break
        pixels = trainer.put({"pixel_values": batch["pixel_values"]})["pixel_values"]
        kw = dict(max_length=max_length, num_beams=a.num_beams, mesh=trainer.mesh)
        out = first_call("generation", generate, trainer.model, pixels, **kw)
        texts = tok.batch_decode(out.sequences[:n_real], skip_special_tokens=True)
        predictions += [text.strip() for text in texts]
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
    with replacing(os.path.join(a.output_dir, f"generated_{prefix}.json"), encoding="utf-8") as f:
        entries = zip(names, predictions, references, strict=True)
        json.dump([dict(image=i, prediction=p, references=r) for i, p, r in entries], f, indent=1)
    cards = _cards(images, names, predictions, references)
    settings = dict(num_beams=a.num_beams, max_length=max_length, step=trainer.step)
    summary = gallery.summary(results[f"{prefix}_exact_match"], scores["CIDEr"])
    page = gallery.page(f"{prefix} at step {trainer.step}", settings, cards, len(images), summary)
    with replacing(os.path.join(a.output_dir, f"gallery_{prefix}.html"), encoding="utf-8") as f:
        f.write(page)
    return results


def _cards(images: list[str], names: list[str], predictions, references, limit=1000):
    """Gallery cards of the first `limit` images (read from `images`, shown as `names`)."""
    from nnx_caption.processing import _to_rgb

    cards = []
    for image, name, prediction, refs in zip(
        images[:limit], names, predictions, references, strict=False
    ):
        try:
            thumb = gallery.thumbnail(_to_rgb(image))
        except (OSError, ValueError):  # it decoded for the evaluation; a race with the disk
            continue
        cards.append(gallery.Card(name, thumb, prediction, None, references=refs))
    return cards


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
