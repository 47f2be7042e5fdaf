"""The flags of `nnx-caption train` (TrainArgs), their checks, and reading them from the
command line or a JSON config as HF's scripts accept one."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from nnx_caption.config import CaptionConfig
from nnx_caption.data import CAPTIONS_PER_STEP
from nnx_caption.distributed import DistributedArgs
from nnx_caption.errors import UsageError
from nnx_caption.flags import CaptionsPerImage, ModelArgs, add_flags
from nnx_caption.options import above, at_least, flag, flags, from_values, one_of
from nnx_caption.train import TrainConfig


@dataclass(frozen=True)
class TrainArgs(ModelArgs, TrainConfig, CaptionsPerImage, DistributedArgs):
    """Data, evaluation, checkpoints and output. The flags of `train` are these (HF's
    run_image_captioning_flax.py's, same names and meaning, then ours), ModelArgs',
    TrainConfig's and DistributedArgs': one flat set, as HF's script has. The train step's
    config is TrainConfig.of(these), with the fields the run derives (total_steps from
    --max_steps or --num_train_epochs, lora from --lora_rank)."""

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
    captions_per_step: str = flag(
        "all",
        "all: an epoch is every caption once (HF); sample: every image once, with one of its "
        "captions drawn at random each epoch (big_vision)",
        one_of(*CAPTIONS_PER_STEP),
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


def check_args(a: TrainArgs) -> None:
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
    a.check_batch(a.per_device_train_batch_size, "per_device_train_batch_size")


def check_lengths(a: TrainArgs, config: CaptionConfig) -> None:
    """Caption lengths the model's decoder can hold: its positions bound both the training
    targets and the generated captions (whose max_length counts the start token)."""
    positions = config.decoder.max_positions
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


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Adds every TrainArgs flag, and the optional JSON config of them."""
    add_flags(parser, TrainArgs)
    parser.add_argument(
        "config",
        nargs="?",
        help="a JSON file of these flags (as HF's "
        "scripts accept); flags given on the command line win",
    )


def args_from_namespace(ns: argparse.Namespace, argv: list[str]) -> TrainArgs:
    """TrainArgs from parsed flags; a JSON config's values for the flags argv does not give."""
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


def parse(argv: list[str]) -> TrainArgs:
    """TrainArgs from a `train` command line (without the command's name)."""
    parser = argparse.ArgumentParser(prog="nnx-caption train")
    build_parser(parser)
    return args_from_namespace(parser.parse_args(argv), argv)
