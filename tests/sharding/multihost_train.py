"""One process of a two-process (multi-host) run on this machine, or the one-process
reference. Each process has 2 simulated CPU devices (4 global), talks to the other through
jax.distributed with gloo collectives, and feeds only its half of every global batch.

    python multihost_train.py CHECKPOINT OUT.npz PORT PROCESS_ID   # PROCESS_ID 0 or 1
    python multihost_train.py CHECKPOINT OUT.npz                   # single process, 1 device
"""

import os
import sys

multihost = len(sys.argv) == 5
if multihost:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from reference import random_train_batches  # noqa: E402

import nnx_caption as nc  # noqa: E402
from nnx_caption.sharding import make_mesh, scalar  # noqa: E402
from nnx_caption.train import TrainConfig, Trainer  # noqa: E402

CFG = TrainConfig(
    learning_rate=1e-3, warmup_steps=1, total_steps=4, weight_decay=0.01, max_grad_norm=1.0, seed=1
)


def main() -> None:
    checkpoint, out = sys.argv[1], sys.argv[2]
    mesh, process, processes = None, 0, 1
    if multihost:
        port, process = sys.argv[3], int(sys.argv[4])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process
        )
        processes = 2
        assert jax.device_count() == 4 and jax.local_device_count() == 2
        mesh = make_mesh(data=4)
    model = nc.from_pretrained(checkpoint, mesh=mesh)
    trainer = Trainer(model, CFG, mesh)
    # Every process holds the whole global batch; the trainer feeds each one's own rows.
    batches = random_train_batches(model.config.decoder.vocab_size, steps=4)
    losses = [scalar(trainer.train_step(b)["loss"]) for b in batches[:3]]
    eval_total, eval_count = trainer.eval_loss(batches[3])
    generated = nc.generate(
        trainer.model, batches[3]["pixel_values"], max_length=6, num_beams=2, mesh=mesh
    )
    # A checkpoint written by the two processes restores into a fresh trainer exactly.
    saved = trainer.save(os.path.join(os.path.dirname(out), f"ckpt_{processes}"))
    if multihost:
        multihost_utils.sync_global_devices("checkpoint written")
    again = Trainer(nc.from_pretrained(checkpoint, mesh=mesh), CFG, mesh)
    again.restore(saved)
    for (_, a), (_, b) in zip(
        nnx.to_flat_state(again.state), nnx.to_flat_state(trainer.state), strict=True
    ):
        assert np.array_equal(
            multihost_utils.process_allgather(a[...], tiled=True),
            multihost_utils.process_allgather(b[...], tiled=True),
        )
    params = {
        ".".join(map(str, p)): np.asarray(multihost_utils.process_allgather(v[...], tiled=True))
        for p, v in nnx.to_flat_state(nnx.state(trainer.model, nnx.Param))
    }
    if process == 0:
        np.savez(
            out,
            losses=np.array(losses),
            eval=np.array([eval_total, eval_count]),
            sequences=generated.sequences,
            beam_scores=generated.scores,
            **params,
        )


if __name__ == "__main__":
    main()
