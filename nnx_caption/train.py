"""Training: loss, optimizer, one jit-compiled step, checkpoints.

The step is a pure function of (state, batch, step number): `state` is the nnx.State of
(model, optimizer), donated so its buffers are updated in place; dropout keys are derived from
(seed, step), so a run resumed from a checkpoint reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nnx_caption.checkpointing import Checkpointer
from nnx_caption.errors import Diverged
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.names import path_str
from nnx_caption.options import at_least, flag, flags, fraction, regexes
from nnx_caption.sharding import put_rows, scalar


@dataclass(frozen=True)
class TrainConfig:
    """The train step: optimisation and what trains. The meaning (and defaults) of HF's
    captioning script; fields with help are the flags of the same name of `train` and `bench`
    (their flag classes extend this one; TrainConfig.of takes these fields back out)."""

    learning_rate: float = flag(5e-5, "peak learning rate of AdamW", at_least(0))
    weight_decay: float = flag(0.0, "AdamW weight decay (not on biases and LayerNorm)", at_least(0))
    adam_beta1: float = flag(0.9, "AdamW beta1", fraction)
    adam_beta2: float = flag(0.999, "AdamW beta2", fraction)
    adam_epsilon: float = flag(1e-8, "AdamW epsilon", at_least(0))
    warmup_steps: int = flag(0, "linear warmup steps, then linear decay to 0", at_least(0))
    total_steps: int = 1000  # `train` derives it from --max_steps or --num_train_epochs
    label_smoothing_factor: float = flag(0.0, "label smoothing of the cross-entropy", fraction)
    max_grad_norm: float | None = flag(
        None, "clip gradients to this global norm (0: no clipping)", at_least(0)
    )
    gradient_accumulation_steps: int = flag(
        1, "micro-batches summed per optimizer step", at_least(1)
    )
    # What trains, by NNX path (see trainable()): prefixes or whole-path regexes.
    freeze: tuple[str, ...] = flag(
        (), "NNX path prefixes or regexes not to train, e.g. encoder", regexes
    )
    trainable: tuple[str, ...] = flag(
        (),
        "only the parameters these NNX path prefixes or regexes match train; the rest is "
        "frozen (default: all)",
        regexes,
    )
    lora: bool = False  # train the LoRA adapters (lora.add_lora) and new_params; the rest frozen
    new_params: tuple[str, ...] = ()  # from_pretrained's new_params (flags.ModelArgs' flag)
    seed: int = flag(42, "seed of data order, dropout and init (bench: its weights and inputs)")

    @classmethod
    def of(cls, args: object, **derived: object) -> TrainConfig:
        """The train-step options among a command's flags (an object extending this class),
        with the fields the command derives (total_steps, lora, new_params); nothing else of
        the flags (a hub token) reaches the config, which checkpoints record."""
        return cls(**{f.name: getattr(args, f.name) for f in flags(cls)}, **derived)


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
    # A batch without a real token (every image in it failed to decode) adds no gradient,
    # rather than 0 / 0.
    return total, count, jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)


def _train_step(graphdef, state, batch, step, first_bad, cfg: TrainConfig):
    """(new state, metrics, first_bad): first_bad, int32 (), is the first step (1-based) with
    a non-finite loss or gradient norm, 0 while there is none."""
    model, optimizer = nnx.merge(graphdef, state)
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    total, count, grads = loss_and_grads(model, batch, key, cfg)
    optimizer.update(model, grads)
    metrics = {
        "loss": total / jnp.maximum(count, 1.0),
        "tokens": count,
        "learning_rate": schedule(cfg)(step),
        "grad_norm": optax.tree.norm(grads),
    }
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    first_bad = jnp.where((first_bad == 0) & ~finite, step + 1, first_bad)
    return nnx.state((model, optimizer)), metrics, first_bad


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


def _mesh(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """jax.set_mesh(mesh), or nothing without a mesh."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


class Trainer:
    """Holds the (model, optimizer) state between steps as one pytree, sharded on `mesh`."""

    def __init__(self, model: VisionEncoderDecoder, cfg: TrainConfig, mesh: Mesh | None = None):
        """The model runs its blocks as it was built to (its config's execution: scan,
        remat)."""
        self.cfg, self.mesh = cfg, mesh
        optimizer = make_optimizer(model, cfg)
        self.graphdef, self.state = nnx.split((model, optimizer))
        self.step = 0
        self.checkpointer = Checkpointer()
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
            out_shardings=(shardings, None, None) if mesh is not None else None,
        )
        self._first_bad = self._no_bad_step()

    def _no_bad_step(self) -> jax.Array:
        """The divergence flag of a finite state (replicated on the mesh)."""
        if self.mesh is None:
            return jnp.int32(0)
        return jax.device_put(jnp.int32(0), NamedSharding(self.mesh, PartitionSpec()))

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
        return {
            k: v if isinstance(v, jax.Array) else put_rows(v, self.mesh) for k, v in batch.items()
        }

    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        with _mesh(self.mesh):
            self.state, metrics, self._first_bad = self._step(
                self.state, self.put(batch), jnp.int32(self.step), self._first_bad
            )
        self.step += 1
        return metrics

    def eval_loss(self, batch: dict[str, np.ndarray]) -> tuple[float, float]:
        """(summed loss, real tokens) of one batch."""
        with _mesh(self.mesh):
            total, count = _eval_step(
                self.graphdef, self.state, self.put(batch), self.cfg.label_smoothing_factor
            )
        return scalar(total), scalar(count)

    # Checkpoints (checkpointing.Checkpointer): the data position and the dropout keys are
    # functions of (seed, step), so the step is all a resume needs besides the state.

    def save(
        self, directory: str, extra: dict | None = None, keep: int | None = None, block=True
    ) -> str:
        """Writes step_<N>/ in `directory`, keeping the newest `keep` (all when None); returns
        its path. Every process must call it. `block=False` returns once the arrays are copied
        off the devices and writes in the background: call wait() before the process ends.
        Diverged, and nothing written, when a step since the start had a non-finite loss or
        gradient norm (or the state holds NaN or Inf)."""
        self.check_finite()
        meta = {"step": self.step, "train_config": asdict(self.cfg), **(extra or {})}
        return self.checkpointer.save(directory, self.step, self.state, meta, keep, block)

    def wait(self) -> None:
        """Waits for the checkpoints being written in the background (SaveFailed if one
        failed)."""
        self.checkpointer.wait()

    def restore(self, checkpoint: str) -> dict:
        """Loads a step_<N>/ folder into the current state, onto its shardings, after checking
        it (Checkpointer.restore); returns its metadata."""
        state, meta = self.checkpointer.restore(checkpoint, self.state)
        self._resume(state, meta)
        return meta

    def restore_newest(self, directory: str) -> tuple[dict, str]:
        """Loads the newest checkpoint in `directory` that passes its checks, refusing (and
        moving aside) those that do not; returns its (metadata, path)."""
        state, meta, path = self.checkpointer.restore_newest(directory, self.state)
        self._resume(state, meta)
        return meta, path

    def _resume(self, state: nnx.State, meta: dict) -> None:
        self.state, self.step = state, int(meta["step"])
        self._first_bad = self._no_bad_step()

    # Divergence: the step records the first step whose loss or gradient norm was not finite
    # in a device scalar; reading it waits for the steps before, so it is read where the loop
    # waits anyway (logging, evaluation, saving), not at every step.

    def diverged_at(self) -> int | None:
        """The first step (1-based, as logged) whose loss or gradient norm was NaN or Inf."""
        return int(scalar(self._first_bad)) or None

    def check_finite(self) -> None:
        """Diverged when a step since the start (or the last restore) was not finite."""
        step = self.diverged_at()
        if step is not None:
            raise Diverged(
                f"training diverged: the loss or gradient norm was NaN or Inf at step {step}"
            )
