"""`nnx-caption train`: HF's run_image_captioning_flax.py rebuilt on nnx-caption.

Same flags, same meaning (train_args.py); plus gradient accumulation, clipping, checkpoints that
resume exactly, a (data, fsdp, tensor) mesh, freezing. A run resumes from the newest checkpoint
in output_dir by itself. This module is the run from start to end; its parts have their own:
the data (train_data), the log (train_log), evaluation, the export and the upload (publish).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import jax

from nnx_caption import data as data_lib
from nnx_caption import processes, rundir
from nnx_caption.captioning import Captioner
from nnx_caption.checkpointing import checkpoints
from nnx_caption.config import read_config
from nnx_caption.errors import Diverged, RunError, UsageError
from nnx_caption.evaluation import Evaluator
from nnx_caption.files import replacing
from nnx_caption.options import public_values
from nnx_caption.plots import plot_run
from nnx_caption.preemption import Preempted, Preemption
from nnx_caption.processing import ImageProcessor, Tokenizer
from nnx_caption.progress import first_call, log
from nnx_caption.publish import export, push_to_hub
from nnx_caption.train import TrainConfig, Trainer
from nnx_caption.train_args import TrainArgs, check_args, check_lengths
from nnx_caption.train_data import load_dataset
from nnx_caption.train_log import TrainLog


def run(a: TrainArgs) -> dict:
    """Runs training / evaluation / prediction as HF's script does; returns the results. Every
    flag is checked before the run directory is touched, data is read or anything compiles;
    the directory is then held by this run alone (rundir.RunLock) until it ends."""
    check_args(a)
    mesh = a.mesh()  # a UsageError when the --mesh_* flags do not fit the devices
    if mesh is not None:
        log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices")
    source = a.source()
    check_lengths(a, read_config(source))
    lock = rundir.RunLock(a.output_dir)
    todo = processes.from_main(lambda: _take(a, lock), (UsageError, OSError))
    try:
        return _run(_setup(a, mesh, source, todo), lock)
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


@dataclass
class _Run:
    """What a run works with, once its model, data and trainer are set up."""

    a: TrainArgs
    source: str  # the resolved checkpoint folder it started from
    trainer: Trainer
    evaluator: Evaluator
    train_ds: data_lib.CaptionDataset | None
    eval_ds: data_lib.CaptionDataset | None
    load_test: Callable[[], data_lib.CaptionDataset]  # the test split, read when its turn comes
    global_batch: int  # examples per optimizer step, over every device and micro-batch
    total: int  # the step training ends at


def _setup(a: TrainArgs, mesh, source: str, todo: str) -> _Run:
    """The model, tokenizer, processor and splits; the trainer, restored or fresh as `todo`
    (rundir.plan) says; the evaluator."""
    model = a.load(source, mesh, seed=a.seed)
    cfg = model.config
    tok, proc = Tokenizer.from_pretrained(source), ImageProcessor.from_pretrained(source)
    val_len = a.val_max_target_length or a.max_target_length

    def split(name: str, length: int) -> data_lib.CaptionDataset:
        return load_dataset(a, name, length, proc, tok, cfg)

    train_ds = split("train", a.max_target_length) if a.do_train else None
    eval_ds = split("eval", val_len) if a.do_eval else None
    devices = jax.device_count()
    global_batch = a.per_device_train_batch_size * devices * a.gradient_accumulation_steps
    # A DataError (the CLI's usage exit) when the split does not fill one batch.
    k, per_step = a.captions_per_image, a.captions_per_step
    steps_per_epoch = train_ds.steps_per_epoch(global_batch, k, per_step) if train_ds else 1
    total = a.max_steps or int(steps_per_epoch * a.num_train_epochs)
    if a.do_train and total < 1:
        raise UsageError(
            f"--num_train_epochs {a.num_train_epochs} is less than one step of the "
            f"{steps_per_epoch} of an epoch: train longer, or pass --max_steps"
        )
    step_config = TrainConfig.of(
        a, total_steps=max(total, 1), lora=bool(a.lora_rank), new_params=a.new_params
    )
    trainer = Trainer(model, step_config, mesh)
    _start(trainer, a, todo, global_batch)
    captioner = None
    if a.predict_with_generate:
        captioner = Captioner(cfg, tok, num_beams=a.num_beams, max_length=val_len, mesh=mesh)
    eval_batch = a.per_device_eval_batch_size * devices
    evaluator = Evaluator(trainer, a.output_dir, eval_batch, captioner, a.eval_limit_batches)
    test = lambda: split("test", val_len)  # noqa: E731
    return _Run(a, source, trainer, evaluator, train_ds, eval_ds, test, global_batch, total)


def _start(trainer: Trainer, a: TrainArgs, todo: str, global_batch: int) -> None:
    """Resumes from the run directory's newest checkpoint, or clears an earlier run's files
    for a fresh start (process 0)."""
    if todo == "resume":
        _resume(trainer, a, global_batch)
    elif todo in ("fresh", "start over") and processes.is_main():
        if todo == "start over":
            where = a.output_dir
            log(f"{where}: the earlier run stopped before its first checkpoint: starting over")
        removed = rundir.clear_previous_run(a.output_dir)
        if removed and todo == "fresh":
            log(f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)}")


def _run(r: _Run, lock: rundir.RunLock) -> dict:
    a, results = r.a, {}
    if a.do_train:
        eval_fn = (lambda: r.evaluator(r.eval_ds, "eval")) if r.eval_ds else None
        history = train_loop(r.trainer, r.train_ds, a, r.global_batch, r.total, eval_fn, lock)
        final = history[-1]["loss"] if history else None
        results["train"] = {"steps": r.trainer.step, "final_loss": final}
        export(r.trainer, a.output_dir, r.source)
        if not (a.do_eval or a.do_predict) and processes.is_main():  # else after each one
            plot_run(a.output_dir)
    if a.do_eval:
        results["eval"] = r.evaluator(r.eval_ds, "eval")
    if a.do_predict:
        results["test"] = r.evaluator(r.load_test(), "test")
    if a.push_to_hub:  # by process 0; its failure is every process's
        processes.from_main(lambda: push_to_hub(a, results), (RunError,))
    return results


def _resume(trainer: Trainer, a: TrainArgs, global_batch: int) -> None:
    """The newest checkpoint that passes its checks (those that fail are moved aside), if it
    was trained as this run will go on: the same global batch and seed."""
    meta, path = trainer.restore_newest(_checkpoints(a))
    devices = jax.device_count()
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
    eval_fn: Callable[[], dict] | None = None,
    lock: rundir.RunLock | None = None,
) -> list[dict]:
    """Steps from trainer.step to `total`, logging, evaluating and checkpointing. Stops with
    a RunError (Diverged, SaveFailed) before anything after the last good checkpoint is saved
    or exported; its message names that checkpoint."""
    try:
        return _steps(trainer, ds, a, global_batch, total, eval_fn, lock)
    except Diverged as err:
        with contextlib.suppress(RunError):  # a failed save in flight shows on the next run
            trainer.wait()  # the saves in flight are of steps before the divergence
        last = checkpoints(_checkpoints(a))
        raise Diverged(
            f"{err}. Nothing after it was saved or exported; the last good checkpoint is "
            f"{last[-1] if last else 'none'}. Lower --learning_rate (or clip with "
            "--max_grad_norm, warm up with --warmup_steps) and run the same command: it "
            "resumes from there"
        ) from None


def _steps(trainer, ds, a: TrainArgs, global_batch, total, eval_fn, lock) -> list[dict]:
    k, per_step = a.captions_per_image, a.captions_per_step
    batches = data_lib.train_batches(
        ds, global_batch, a.seed, trainer.step, captions_per_image=k, captions_per_step=per_step
    )
    progress = TrainLog(
        a.output_dir, trainer.step, total, ds.steps_per_epoch(global_batch, k, per_step)
    )
    history: list[dict] = []
    with progress, Preemption() as preemption:  # SIGTERM: save at the next step boundary
        for step, batch in batches:
            if step >= total:
                break
            progress.step(first_call("train step", trainer.train_step, batch))
            trainer.checkpointer.raise_if_failed()  # a background save that failed
            done = trainer.step
            if done % a.logging_steps == 0 or done == total:
                history.append(progress.log(done, global_batch))
                trainer.check_finite()  # the window's steps are done: reading it is free
                _check_lock(lock, a, done)
            if eval_fn and a.eval_steps and done % a.eval_steps == 0 and done < total:
                trainer.check_finite()
                eval_fn()
                progress.restart_timing()  # evaluating is not training throughput
            stop = preemption.stop_now()  # SIGTERM on any process: stop here, saved
            if stop or (a.save_steps and done % a.save_steps == 0):
                _save(trainer, a, global_batch)
            if stop:
                trainer.wait()
                raise Preempted(
                    f"SIGTERM: saved step {done} in {_checkpoints(a)}; the same command "
                    "resumes from it"
                )
    if ds.late_failures:
        where, why = ds.late_failures[0]
        log(
            f"{len(ds.late_failures)} images failed to decode during training and were left "
            f"out of the loss; first: {where}: {why}"
        )
    _save(trainer, a, global_batch)
    trainer.wait()
    return history


def _check_lock(lock: rundir.RunLock | None, a: TrainArgs, done: int) -> None:
    """A RunError on every process when process 0 lost the run directory's lock."""
    if processes.any_process(lock is not None and lock.lost):
        raise RunError(
            f"{lock.path} was taken over by another run (it found this one stale): stopped at "
            f"step {done}; the checkpoints are in {_checkpoints(a)}"
        )


def _save(trainer: Trainer, a: TrainArgs, global_batch: int) -> None:
    """A checkpoint written in the background while training goes on (orbax, async); refused
    (Diverged) after a non-finite step."""
    extra = {"seed": a.seed, "global_batch": global_batch}  # a resume checks both
    trainer.save(_checkpoints(a), extra, keep=a.save_total_limit, block=False)


def _checkpoints(a: TrainArgs) -> str:
    return os.path.join(a.output_dir, rundir.CHECKPOINTS)
