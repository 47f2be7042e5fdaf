"""Saving a model as a checkpoint: Hugging Face's layout (model.safetensors, config.json and
generation_config.json, which transformers loads), or the NNX layout that holds any model."""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from nnx_caption import processes
from nnx_caption.config import write_config
from nnx_caption.edits import class_spec
from nnx_caption.hub import HF_WEIGHTS, NNX_FORMAT, NNX_WEIGHTS, checkpoint_files
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.names import listing, path_str
from nnx_caption.safetensors_io import CheckpointError, write_safetensors
from nnx_caption.sharding import to_host
from nnx_caption.weight_table import WeightMap


def unnamed_params(model: nnx.Module) -> list[str]:
    """NNX paths of the model's parameters that the weight table gives no Hugging Face name."""
    weights = WeightMap(model.config)
    names = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    return [n for n in names if not weights.has_hf_name(n)]


def save_pretrained(
    model: VisionEncoderDecoder,
    out_dir: str | os.PathLike,
    *,
    layout: str = "hf",
    overwrite: bool = False,
) -> None:
    """Writes config.json, generation_config.json and the weights, each file atomically (a
    crash mid-save leaves the old one).

    layout "hf": model.safetensors that transformers' VisionEncoderDecoderModel loads (a tied
    head is stored once, as transformers does); a model with parameters that have no HF name
    (an edited architecture, unmerged LoRA adapters) is refused before anything is written.
    layout "nnx": nnx_model.safetensors keyed by NNX path, for any model;
    from_pretrained(out_dir, model_cls=type(model)) restores it exactly.
    A folder holding other weights (the other layout, HF shards, PyTorch pickles) is refused
    unless `overwrite`: then they are deleted once the new weights are written, since
    from_pretrained would otherwise pick them.
    In a multi-process run every process calls it: each tensor sharded across processes is
    all-gathered in turn (so each process holds about one tensor more, never the model) and
    process 0 writes; every process returns once the files are final.
    """
    if layout not in ("hf", "nnx"):
        raise ValueError(f"layout must be 'hf' or 'nnx', got {layout!r}")
    out_dir = os.fspath(out_dir)
    target = os.path.join(out_dir, NNX_WEIGHTS if layout == "nnx" else HF_WEIGHTS)
    others = [f for f in checkpoint_files(out_dir) if os.path.abspath(f) != os.path.abspath(target)]
    if others and not overwrite:
        raise CheckpointError(
            f"{out_dir} holds other weights ({listing([os.path.basename(f) for f in others])}): "
            f"saving the {layout} layout there would replace them. Pass overwrite=True "
            "(CLI: --overwrite) to do so, or save to another folder"
        )
    specs = _nnx_specs(model) if layout == "nnx" else _hf_specs(model, out_dir)
    specs.sort(key=lambda s: s[0])
    if not processes.is_main():  # it takes part in gathering each tensor, in the same order
        for *_, produce in specs:
            produce()
        processes.barrier("save_pretrained")  # returns once process 0's files are final
        return
    os.makedirs(out_dir, exist_ok=True)
    meta = (
        {**NNX_FORMAT, "model_class": class_spec(type(model))}
        if layout == "nnx"
        else {"format": "pt"}  # transformers checks "pt"
    )
    write_safetensors(target, specs, meta)
    for other in others:  # only after the new weights are complete
        os.remove(other)
    write_config(model.config, out_dir)
    processes.barrier("save_pretrained")


def _nnx_specs(model: VisionEncoderDecoder) -> list[tuple]:
    """(NNX path, shape, dtype, () -> host array) of every parameter."""
    return [
        (path_str(path), v.shape, v.dtype, lambda v=v: to_host(v))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
        for v in (var[...],)
    ]


def _hf_specs(model: VisionEncoderDecoder, out_dir: str) -> list[tuple]:
    """(HF name, shape, dtype, () -> host array in HF's layout) of every parameter, and the
    encoder pooler transformers expects; a CheckpointError when some parameter has no HF name."""
    unnamed = unnamed_params(model)
    if unnamed:
        lora = any("lora" in n for n in unnamed)
        raise CheckpointError(
            f"{out_dir}: {len(unnamed)} parameter(s) have no Hugging Face name, so transformers "
            f"could not load them: {listing(unnamed)}. "
            'Save with layout="nnx" (from_pretrained(dir, model_cls=...) restores it)'
            + (", or merge the LoRA adapters first (lora.merge_lora)" if lora else "")
        )
    weights, specs = WeightMap(model.config), []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var[...]
        hf_name, t = weights.to_hf(path_str(path))
        produce = lambda v=value, t=t: t.to_hf(to_host(v))  # noqa: E731
        specs.append((hf_name, t.hf_shape(value.shape), value.dtype, produce))
    # transformers builds the ViT / DeiT with a pooler that VisionEncoderDecoder never uses;
    # zeros keep its load report free of "MISSING, newly initialized" and the export
    # deterministic.
    e = model.config.encoder.hidden_size
    p = model.config.encoder.pooler_output_size
    specs += [
        (f"encoder.pooler.dense.{n}", s, np.float32, lambda s=s: np.zeros(s, np.float32))
        for n, s in (("weight", (p, e)), ("bias", (p,)))
    ]
    return specs
