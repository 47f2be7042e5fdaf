"""One process of a multi-host run on this machine, or a one-process run, training weights/tiny
on the caption table DATA with a global batch of 8:

    python multihost_train.py one DATA OUT                  # 1 device: 4 steps uninterrupted
    python multihost_train.py two DATA OUT PORT PROCESS_ID  # 2 processes x 2 devices: 3 steps,
                                                            # then a checkpoint in OUT's folder
    python multihost_train.py restore DATA OUT DEVICES      # that checkpoint on 1 process with
                                                            # DEVICES devices, then step 4
    python multihost_train.py preempt DATA OUT PORT PROCESS_ID  # 2 x 2 devices: steps until
                                                            # SIGTERM, then a checkpoint

The two processes talk through jax.distributed with gloo collectives; each decodes only its
rows of every global batch (data.CaptionDataset with process=(index, 2)).
"""

import os
import sys

mode = sys.argv[1]
devices = int(sys.argv[-1]) if mode == "restore" else {"one": 1, "two": 2, "preempt": 2}[mode]
flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import nnx_caption as nc  # noqa: E402
from nnx_caption import data  # noqa: E402
from nnx_caption.checkpointing import checkpoints  # noqa: E402
from nnx_caption.hf import path_str  # noqa: E402
from nnx_caption.preemption import Preemption  # noqa: E402
from nnx_caption.processing import ImageProcessor, Tokenizer  # noqa: E402
from nnx_caption.sharding import make_mesh, scalar  # noqa: E402
from nnx_caption.train import TrainConfig, Trainer  # noqa: E402

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "weights", "tiny")
CFG = TrainConfig(
    learning_rate=1e-3, warmup_steps=1, total_steps=4, weight_decay=0.01, max_grad_norm=1.0, seed=1
)
BATCH = 8  # global: 8 x 1 device, 2 per device x 4


def gathered(x) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def main() -> None:
    table, out = sys.argv[2], sys.argv[3]
    process, processes = 0, 1
    if mode in ("two", "preempt"):
        port, process = sys.argv[4], int(sys.argv[5])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process
        )
        processes = 2
        assert jax.device_count() == 4 and jax.local_device_count() == 2
    # Saved from (data 2, fsdp 2) over two processes; restored on one device, or on (fsdp 4).
    mesh = None
    if jax.device_count() == 4:
        mesh = make_mesh(data=1, fsdp=4) if mode == "restore" else make_mesh(data=2, fsdp=2)
    model = nc.from_pretrained(TINY, mesh=mesh)
    trainer = Trainer(model, CFG, mesh)
    ds = data.CaptionDataset(
        data.load_split(table, "image", "caption"),
        ImageProcessor.from_pretrained(TINY),
        Tokenizer.from_pretrained(TINY),
        8,
        model.config.decoder_start_token_id,
        model.config.pad_token_id,
        workers=1,
        process=(process, processes),
    )
    ckpt_dir = os.path.join(os.path.dirname(out), "checkpoints")
    if mode == "preempt":
        return preempt(trainer, ds, ckpt_dir)
    start = 0
    if mode == "restore":
        start = trainer.restore(checkpoints(ckpt_dir)[-1])["step"]
    batches = data.train_batches(ds, BATCH, CFG.seed, start_step=start, prefetch=0)
    losses = [scalar(trainer.train_step(next(batches)[1])["loss"]) for _ in range(start, 3)]
    decoded = ds.decoded  # the images of the first epoch's rows, before evaluation decodes
    results = {}
    if mode != "restore":
        results.update(evaluation(trainer, ds, mesh, "3"))
    if mode == "two":  # the two processes write one checkpoint, each its own shards
        trainer.save(ckpt_dir)
        multihost_utils.sync_global_devices("checkpoint written")
    else:  # step 4: on from step 3, or on from the checkpoint of step 3
        losses.append(scalar(trainer.train_step(next(batches)[1])["loss"]))
        results.update(evaluation(trainer, ds, mesh, "4"))
    if mode == "restore":  # the step-3 parameters as restored, before step 4 changed them
        again = Trainer(nc.from_pretrained(TINY, mesh=mesh), CFG, mesh)
        again.restore(checkpoints(ckpt_dir)[-1])
        results.update(parameters(again, "restored."))
    results.update(parameters(trainer))
    decodes = gathered(np.array([decoded]))
    if process == 0:
        np.savez(out, losses=np.array(losses), decoded=decodes, **results)


def preempt(trainer: Trainer, ds, ckpt_dir: str) -> None:
    """Steps until SIGTERM reaches either process: both stop after the same step, and save it
    (the train loop's steps, without the rest of the command)."""
    batches = data.train_batches(ds, BATCH, CFG.seed, prefetch=0)
    with Preemption() as preemption:
        step = 0
        while True:
            trainer.train_step(next(batches)[1])
            step += 1
            if step == 1:
                print("ready", flush=True)  # compiled and stepping: send SIGTERM now
            if preemption.stop_now():
                break
    trainer.save(ckpt_dir)
    trainer.wait()
    print("stopped", step, flush=True)


def evaluation(trainer: Trainer, ds, mesh, at: str) -> dict:
    """The loss of the first 8 examples and their captions (beam search over the mesh)."""
    batch, _ = next(data.eval_batches(ds, BATCH))
    total, count = trainer.eval_loss(batch)
    pixels = trainer.put({"pixel_values": batch["pixel_values"]})["pixel_values"]
    out = nc.generate(trainer.model, pixels, max_length=6, num_beams=2, mesh=mesh)
    return {f"eval_{at}": np.array(total / count), f"sequences_{at}": out.sequences}


def parameters(trainer: Trainer, prefix: str = "") -> dict:
    return {
        prefix + path_str(p): gathered(v[...])
        for p, v in nnx.to_flat_state(nnx.state(trainer.model, nnx.Param))
    }


if __name__ == "__main__":
    main()
