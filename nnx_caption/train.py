"""Training: loss, optimizer, one jit-compiled step, checkpoints.

The step is a pure function of (state, batch, step number): `state` is the nnx.State of
(model, optimizer), donated so its buffers are updated in place; dropout keys are derived from
(seed, step), so a run resumed from a checkpoint reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nnx_caption.flags import flag
from nnx_caption.hf import path_str
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.safetensors_io import CheckpointError, NonFiniteError
from nnx_caption.sharding import batch_sharding, scalar


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. The meaning (and defaults) of HF's captioning script; fields with help
    are `train`'s flags of the same name (loop.TrainArgs extends this class)."""

    learning_rate: float = flag(5e-5, "peak learning rate of AdamW")
    weight_decay: float = flag(0.0, "AdamW weight decay (not on biases and LayerNorm)")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon")
    warmup_steps: int = flag(0, "linear warmup steps, then linear decay to 0")
    total_steps: int = 1000  # `train` derives it from --max_steps or --num_train_epochs
    label_smoothing_factor: float = flag(0.0, "label smoothing of the cross-entropy")
    max_grad_norm: float | None = flag(None, "clip gradients to this global norm")
    gradient_accumulation_steps: int = flag(1, "micro-batches summed per optimizer step")
    # What trains, by NNX path (see trainable()): prefixes or whole-path regexes.
    freeze: tuple[str, ...] = flag((), "NNX path prefixes or regexes not to train, e.g. encoder")
    trainable: tuple[str, ...] = flag(
        (),
        "only the parameters these NNX path prefixes or regexes match train; the rest is "
        "frozen (default: all)",
    )
    lora: bool = False  # train the LoRA adapters (lora.add_lora) and new_params; the rest frozen
    new_params: tuple[str, ...] = ()  # from_pretrained's new_params (flags.ModelArgs' flag)
    seed: int = flag(42, "seed of data order, dropout and init")


# Loss -----------------------------------------------------------------------------------------


def cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """(summed loss over real tokens, number of real tokens), HF's script's label smoothing:
    soft targets (1 - s on the label, s / (V - 1) elsewhere) minus their entropy, so a perfect
    prediction costs 0. Sums, not means: the caller divides by the global token count."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    if label_smoothing > 0:
        confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
        expected = confidence * picked + low * (logits.sum(-1) - picked)
        constant = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
        loss = lse - expected - constant
    else:
        loss = lse - picked
    mask = mask.astype(jnp.float32)
    return (loss * mask).sum(), mask.sum()


# Optimizer ------------------------------------------------------------------------------------


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to the learning rate, then linear decay to 0 at total_steps."""
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    decay = optax.linear_schedule(
        cfg.learning_rate, 0.0, max(cfg.total_steps - cfg.warmup_steps, 1)
    )
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decays(variable: nnx.Variable) -> bool:
    """AdamW decays weights, not biases nor norm parameters (as HF's script): read from the
    `weight_decay` metadata they are created with (layers.py); a parameter without it decays."""
    return bool(variable.get_metadata().get("weight_decay", True))


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    """Whether an NNX path is one of `patterns`: a prefix ("encoder" covers "encoder.ln_f.bias")
    or a regex matching the whole path ("decoder\\.blocks\\.\\d+\\.cross\\..*")."""
    return any(path == p or path.startswith(p + ".") or re.fullmatch(p, path) for p in patterns)


def trainable(cfg: TrainConfig) -> nnx.filterlib.Filter:
    """The parameters that train: all of them; or, with `trainable`, those it matches; with
    `lora`, the adapters, the declared-new parameters and those `trainable` matches. Never
    those `freeze` matches."""

    def keep(path: tuple, value) -> bool:
        name = path_str(path)
        if not isinstance(value, nnx.Param) or matches(name, cfg.freeze):
            return False
        if cfg.lora:
            return isinstance(value, nnx.LoRAParam) or matches(name, cfg.new_params + cfg.trainable)
        return not cfg.trainable or matches(name, cfg.trainable)

    return keep


def make_optimizer(model: VisionEncoderDecoder, cfg: TrainConfig) -> nnx.Optimizer:
    wrt = trainable(cfg)
    decay = {_keys(path): decays(var) for path, var in nnx.to_flat_state(nnx.state(model, wrt))}
    tx = optax.adamw(
        schedule(cfg),
        cfg.adam_beta1,
        cfg.adam_beta2,
        cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        mask=lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: decay[_keys(path)], params
        ),
    )
    if cfg.max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    return nnx.Optimizer(model, tx, wrt=wrt)


def _keys(path: tuple) -> tuple:
    """A state path's dict keys and list indices (a Variable's own `.value` step dropped)."""
    keys = (getattr(k, "key", getattr(k, "idx", k)) for k in path)
    return tuple(k for k in keys if not isinstance(k, jax.tree_util.GetAttrKey))


# Step -----------------------------------------------------------------------------------------


def loss_and_grads(model, batch: dict[str, jax.Array], key: jax.Array, cfg: TrainConfig):
    """(summed loss, real tokens, gradients / real tokens) of one optimizer step's batch: the
    model FLOPs of a step are this function's (flops.xla_train_step counts them)."""

    def loss_sum(model, micro, key):
        logits = model(
            micro["pixel_values"],
            micro["decoder_input_ids"],
            micro["decoder_attention_mask"],
            rngs=nnx.Rngs(dropout=key),
        )
        return cross_entropy(
            logits, micro["labels"], micro["decoder_attention_mask"], cfg.label_smoothing_factor
        )

    grad_fn = nnx.value_and_grad(loss_sum, argnums=nnx.DiffState(0, trainable(cfg)), has_aux=True)
    # Gradients and losses are summed over micro-batches, then normalised once by the global
    # number of real tokens (not a mean of per-micro-batch means).
    k = cfg.gradient_accumulation_steps
    grads, total, count = None, 0.0, 0.0
    for i, micro in enumerate(split_micro_batches(batch, k) if k > 1 else [batch]):
        (t, c), g = grad_fn(model, micro, jax.random.fold_in(key, i))
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        total, count = total + t, count + c
    return total, count, jax.tree.map(lambda g: g / count, grads)


def _train_step(graphdef, state, batch, step, cfg: TrainConfig):
    model, optimizer = nnx.merge(graphdef, state)
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    total, count, grads = loss_and_grads(model, batch, key, cfg)
    optimizer.update(model, grads)
    metrics = {
        "loss": total / count,
        "tokens": count,
        "learning_rate": schedule(cfg)(step),
        "grad_norm": optax.global_norm(grads),
    }
    return nnx.state((model, optimizer)), metrics


def split_micro_batches(batch: dict[str, jax.Array], k: int) -> list[dict[str, jax.Array]]:
    """k equal micro-batches for gradient accumulation. Strided over images, so that each
    device of a data-parallel mesh holds its share of every micro-batch; an image's captions
    (several per image when pixel_values has fewer rows than the targets) stay with it."""
    images = len(batch["pixel_values"])

    def part(x: jax.Array, i: int) -> jax.Array:
        grouped = x.reshape(images, -1, *x.shape[1:])  # (images, captions per image, ...)
        return grouped[i::k].reshape(-1, *x.shape[1:])

    return [{name: part(x, i) for name, x in batch.items()} for i in range(k)]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _eval_step(graphdef, state, batch, label_smoothing: float):
    model, _ = nnx.merge(graphdef, state)
    logits = model(
        batch["pixel_values"], batch["decoder_input_ids"], batch["decoder_attention_mask"]
    )
    return cross_entropy(logits, batch["labels"], batch["decoder_attention_mask"], label_smoothing)


class Trainer:
    """Holds the (model, optimizer) state between steps as one pytree, sharded on `mesh`."""

    def __init__(self, model: VisionEncoderDecoder, cfg: TrainConfig, mesh: Mesh | None = None):
        """The model runs its blocks as it was built to (its config's execution: scan,
        remat)."""
        self.cfg, self.mesh = cfg, mesh
        optimizer = make_optimizer(model, cfg)
        self.graphdef, self.state = nnx.split((model, optimizer))
        self.step = 0
        self._managers: dict = {}  # checkpoint folder -> (max_to_keep, its CheckpointManager)
        # The new state keeps the old one's shardings (the rules'), whatever XLA would prefer;
        # what the optimizer created off the mesh (its step count) is replicated on it.
        shardings = None
        if mesh is not None:
            replicated = NamedSharding(mesh, PartitionSpec())
            shardings = jax.tree.map(
                lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated,
                self.state,
            )
            self.state = jax.device_put(self.state, shardings)
        self._step = jax.jit(
            functools.partial(_train_step, self.graphdef, cfg=cfg),
            donate_argnums=(0,),
            out_shardings=(shardings, None) if mesh is not None else None,
        )
        if mesh is not None:
            self.batch_sharding = batch_sharding(mesh)

    @property
    def model(self) -> VisionEncoderDecoder:
        return nnx.merge(self.graphdef, self.state)[0]

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global batch onto the mesh: in a multi-host run each
        process holds only its contiguous block of the batch's rows (data.process_rows), as
        CaptionDataset.batch hands it out; in one process, the whole batch. Arrays already on
        the devices (an earlier put's) are used as they are."""
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        count = jax.process_count()
        return {
            k: v
            if isinstance(v, jax.Array)
            else jax.make_array_from_process_local_data(
                self.batch_sharding, v, (len(v) * count, *v.shape[1:])
            )
            for k, v in batch.items()
        }

    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        with _mesh_context(self.mesh):
            self.state, metrics = self._step(self.state, self.put(batch), jnp.int32(self.step))
        self.step += 1
        return metrics

    def eval_loss(self, batch: dict[str, np.ndarray]) -> tuple[float, float]:
        """(summed loss, real tokens) of one batch."""
        with _mesh_context(self.mesh):
            total, count = _eval_step(
                self.graphdef, self.state, self.put(batch), self.cfg.label_smoothing_factor
            )
        return scalar(total), scalar(count)

    # Checkpoints ------------------------------------------------------------------------------
    # orbax-checkpoint: the (model, optimizer) state as sharded arrays, each process writing and
    # reading only its own shards; a step folder appears complete or not at all. The data
    # position and the dropout keys are functions of (seed, step), so the step is all a resume
    # needs besides the state.

    def _manager(self, directory: str, keep: int | None = None):
        import orbax.checkpoint as ocp

        directory = os.path.abspath(directory)
        kept, manager = self._managers.get(directory, (None, None))
        if manager is not None and keep is not None and kept != keep:
            manager.close()  # another limit for this folder: a manager that keeps it
            manager = None
        if manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep or None,
                step_prefix=STEP_PREFIX,
                step_format_fixed_length=8,
                enable_async_checkpointing=True,
                cleanup_tmp_directories=True,  # what a save killed midway left behind
            )
            manager = ocp.CheckpointManager(
                directory, options=options, item_names=("state", "meta")
            )
            self._managers[directory] = keep, manager
        return manager

    def save(
        self, directory: str, extra: dict | None = None, keep: int | None = None, block=True
    ) -> str:
        """Writes step_<N>/ in `directory`, keeping the newest `keep` (all when None); returns
        its path. Every process must call it. `block=False` returns once the arrays are copied
        off the devices and writes in the background: call wait() before the process ends."""
        import orbax.checkpoint as ocp

        manager = self._manager(directory, keep)
        if self.step not in manager.all_steps():  # a step is saved once
            meta = {"step": self.step, "train_config": asdict(self.cfg), **(extra or {})}
            items = dict(state=ocp.args.StandardSave(self.state), meta=ocp.args.JsonSave(meta))
            manager.save(self.step, args=ocp.args.Composite(**items))
        if block:
            manager.wait_until_finished()
        return os.path.join(directory, f"{STEP_PREFIX}_{self.step:08d}")

    def wait(self) -> None:
        """Waits for the checkpoints being written in the background."""
        for _, manager in self._managers.values():
            manager.wait_until_finished()

    def restore(self, checkpoint: str) -> dict:
        """Loads a step_<N>/ folder into the current state, onto its shardings (a checkpoint
        saved on another mesh or device count restores too); each process reads only its own
        shards."""
        import orbax.checkpoint as ocp

        self.wait()
        directory, name = os.path.split(os.path.abspath(checkpoint))
        step = int(name.removeprefix(f"{STEP_PREFIX}_"))
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )
        items = dict(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        try:
            out = self._manager(directory).restore(step, args=ocp.args.Composite(**items))
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise CheckpointError(f"{checkpoint}: cannot restore it: {err}") from None
        floats = [
            (path, var[...])
            for path, var in nnx.to_flat_state(out["state"])
            if jnp.issubdtype(var[...].dtype, jnp.floating)
        ]
        # One program and one transfer to the host for the whole state, not one per array
        # (nor many small programs with collectives in flight at once, which can deadlock
        # XLA's CPU collectives).
        finite = jax.device_get(_all_finite([v for _, v in floats]))
        for (path, _), ok in zip(floats, finite, strict=True):
            if not ok:
                raise NonFiniteError(
                    f"{checkpoint}: {path_str(path)!r} holds NaN or Inf: the run had diverged "
                    f"when this checkpoint was saved. Move {checkpoint} away to resume from the "
                    "one before it"
                )
        self.state = out["state"]
        self.step = int(out["meta"]["step"])
        return out["meta"]


@jax.jit
def _all_finite(arrays: list[jax.Array]) -> jax.Array:
    """bool (len(arrays),): whether each array is free of NaN and Inf."""
    return jnp.stack([jnp.isfinite(a).all() for a in arrays])


STEP_PREFIX = "step"  # checkpoints are step_00000008 and so on


def checkpoints(directory: str) -> list[str]:
    """Complete checkpoints in `directory`, oldest first (a save in progress or killed midway
    has a temporary name until orbax commits it)."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if re.fullmatch(rf"{STEP_PREFIX}_\d{{8}}", n))
    return [
        os.path.join(directory, n)
        for n in names
        if os.path.exists(os.path.join(directory, n, "_CHECKPOINT_METADATA"))
    ]


class _mesh_context:
    """`jax.set_mesh(mesh)` when a mesh is given, else nothing."""

    def __init__(self, mesh: Mesh | None):
        self.ctx = jax.set_mesh(mesh) if mesh is not None else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else None
