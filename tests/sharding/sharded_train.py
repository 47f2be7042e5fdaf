"""Run in its own process (8 simulated CPU devices, set before jax is imported): a few train
steps on a mesh vs on one device; prints JSON."""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ["JAX_PLATFORMS"] = "cpu"

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from reference import random_train_batches  # noqa: E402

import nnx_caption as nc  # noqa: E402
from nnx_caption.config import tiny  # noqa: E402
from nnx_caption.layers import Execution  # noqa: E402
from nnx_caption.sharding import make_mesh  # noqa: E402
from nnx_caption.train import TrainConfig, Trainer  # noqa: E402


def run(
    directory: str, mesh, cfg: TrainConfig, data, execution: Execution | None = None
) -> tuple[list[float], dict, dict, Trainer]:
    model = nc.from_pretrained(directory, mesh=mesh, execution=execution)
    trainer = Trainer(model, cfg, mesh)
    losses = [float(trainer.train_step(b)["loss"]) for b in data]
    params = {
        ".".join(map(str, p)): np.asarray(jax.device_get(v[...]))
        for p, v in nnx.to_flat_state(nnx.state(trainer.model, nnx.Param))
    }
    specs = {
        ".".join(map(str, p)): str(tuple(getattr(v[...].sharding, "spec", ())))
        for p, v in nnx.to_flat_state(nnx.state(trainer.model, nnx.Param))
    }
    return losses, params, specs, trainer


def _host_state(trainer: Trainer) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, p)): np.asarray(jax.device_get(v[...]))
        for p, v in nnx.to_flat_state(trainer.state)
    }


def restored_elsewhere(trainer: Trainer, directory: str, cfg: TrainConfig) -> dict:
    """The (model, optimizer) checkpoint of a sharded run restored on one device and on
    another mesh: (largest difference from the saved state, restored step) for each."""
    saved = trainer.save(tempfile.mkdtemp())
    want = _host_state(trainer)
    out = {"saved step": trainer.step}
    for name, mesh in (("one device", None), ("1,4,2", make_mesh(1, 4, 2))):
        fresh = Trainer(nc.from_pretrained(directory, mesh=mesh), cfg, mesh)
        fresh.restore(saved)
        got = _host_state(fresh)
        out[name] = [max(float(np.abs(got[k] - want[k]).max()) for k in want), fresh.step]
    return out


def main(meshes: list[str]) -> None:
    """Each mesh "D,F,T" or "D,F,T,scan" against one device's run (computed once)."""
    directory = tempfile.mkdtemp()
    config = tiny()
    nc.save_pretrained(nc.VisionEncoderDecoder(config, rngs=nnx.Rngs(0)), directory)
    cfg = TrainConfig(
        learning_rate=1e-3,
        warmup_steps=1,
        total_steps=4,
        weight_decay=0.01,
        max_grad_norm=1.0,
        gradient_accumulation_steps=2,
        seed=1,
    )
    data = random_train_batches(config.decoder.vocab_size)
    single_losses, single, _, _ = run(directory, None, cfg, data)
    results = {}
    for name in meshes:
        parts = name.split(",")
        scan = parts[-1] == "scan"
        mesh = make_mesh(*map(int, parts[:3]))
        # The sharded run may also scan over layers with remat: still the unrolled run's numbers.
        execution = Execution(scan=scan, remat=scan)
        losses, sharded, specs, trainer = run(directory, mesh, cfg, data, execution)
        if name == "2,4,1":  # an FSDP-sharded state's checkpoint, restored elsewhere
            results["restored"] = restored_elsewhere(trainer, directory, cfg)
        results[name] = {
            "loss_diff": max(abs(a - b) for a, b in zip(losses, single_losses, strict=True)),
            "param_diff": max(float(np.abs(sharded[k] - single[k]).max()) for k in single),
            "losses": losses,
            "specs": specs,
        }
    print(json.dumps(results))


if __name__ == "__main__":  # sharded_train.py D,F,T[,scan] ...
    main(sys.argv[1:])
