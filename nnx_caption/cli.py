"""The `nnx-caption` command."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import inspect
import logging
import os
import sys
import traceback

from jax.errors import JaxRuntimeError

from nnx_caption import bench, loop, processes, train_args
from nnx_caption.checkpointing import quiet_failed_writes
from nnx_caption.compose import from_encoder_decoder_pretrained
from nnx_caption.config import ConfigError
from nnx_caption.data import DataError
from nnx_caption.demo import run_demo
from nnx_caption.distributed import DistributedArgs, start
from nnx_caption.edits import ModelClassError
from nnx_caption.errors import RunError, UsageError
from nnx_caption.flags import (
    PREDICT_FLAGS,
    SOURCE_FLAGS,
    ModelArgs,
    add_argument,
    add_flags,
    from_namespace,
)
from nnx_caption.gallery import summary as score_line
from nnx_caption.hub import TOKENIZER_FILES, checkpoint_files, copy_aux_files
from nnx_caption.names import listing
from nnx_caption.plots import plot_run
from nnx_caption.predict import predict
from nnx_caption.preemption import Preempted
from nnx_caption.safetensors_io import CheckpointError
from nnx_caption.saving import save_pretrained

# Errors in what the command was given (a flag, a path, a file's contents): exit status 2.
USAGE_ERRORS = (CheckpointError, ConfigError, UsageError, DataError, ModelClassError)
DEBUG_ENV = "NNX_CAPTION_DEBUG"  # set (not 0): tracebacks, as --debug


def _rewrite(args: argparse.Namespace, layout: str) -> None:
    how = dataclasses.replace(from_namespace(ModelArgs, args), model_name_or_path=args.src)
    how.check()
    src = how.source()
    same = os.path.isdir(args.dst) and os.path.samefile(src, args.dst)
    held = [os.path.basename(f) for f in checkpoint_files(args.dst)]
    if (same or held) and not args.overwrite:
        what = "is the source folder" if same else "holds a checkpoint"
        raise UsageError(
            f"{args.dst} {what} ({listing(held)}): writing there would replace those weights. "
            "Choose another output folder, or pass --overwrite to replace them"
        )
    model = how.load(src, mesh=None)
    save_pretrained(model, args.dst, layout=layout, overwrite=args.overwrite)
    copied = copy_aux_files(src, args.dst)
    print(f"wrote {layout.upper()} layout to {args.dst} (+ {', '.join(copied) or 'no aux files'})")


def _compose(args: argparse.Namespace) -> None:
    """HF's create-model step: a captioner from a ViT and a GPT-2, ready for `train`."""
    out = args.output_dir
    if os.path.isdir(out) and os.listdir(out):
        raise UsageError(f"--output_dir {out} exists and is not empty: choose a new folder")
    hub = from_namespace(ModelArgs, args)
    enc_dir = dataclasses.replace(hub, model_name_or_path=args.encoder).source()
    dec_dir = dataclasses.replace(hub, model_name_or_path=args.decoder).source()
    tokens = {k: getattr(args, k) for k in COMPOSE_TOKENS}
    model = from_encoder_decoder_pretrained(enc_dir, dec_dir, seed=args.seed, **tokens)
    save_pretrained(model, out)
    copied = copy_aux_files(dec_dir, out, TOKENIZER_FILES)
    copied += copy_aux_files(enc_dir, out, ("preprocessor_config.json",))
    if not {"tokenizer.json", "vocab.json", "vocab.txt", "sentencepiece.bpe.model"} & set(copied):
        print(
            f"warning: {dec_dir} has no tokenizer files (tokenizer.json, vocab.json + "
            f"merges.txt, vocab.txt or sentencepiece.bpe.model): add the decoder's tokenizer "
            f"to {out} before training",
            file=sys.stderr,
        )
    if "preprocessor_config.json" not in copied:
        print(
            f"warning: {enc_dir} has no preprocessor_config.json: add the encoder's image "
            f"processor config to {out} before training",
            file=sys.stderr,
        )
    cfg = model.config
    layers = (
        f"{cfg.encoder.num_hidden_layers}-layer {cfg.encoder.model_type} + "
        f"{cfg.decoder.num_layers}-layer {cfg.decoder.model_type}"
    )
    print(
        f"composed {out}: {layers}, new weights from seed {args.seed}; "
        f"decoder_start={cfg.decoder_start_token_id} pad={cfg.pad_token_id} "
        f"eos={cfg.eos_token_id}; "
        f"copied {', '.join(copied) or 'no tokenizer/processor files'}"
    )


# compose's token flags, and what they default to (from_encoder_decoder_pretrained).
COMPOSE_TOKENS = {
    "decoder_start_token_id": "the decoder's bos_token_id",
    "pad_token_id": "GPT-2: its eos; else the decoder's pad_token_id",
    "eos_token_id": "the decoder's eos_token_id",
}


def _add_compose(sub) -> None:
    help_ = (
        "compose a captioner from a pretrained ViT / DeiT and a pretrained GPT-2, TrOCR or BERT "
        "decoder (HF's create step)"
    )
    p = sub.add_parser("compose", help=help_, description=help_)
    p.add_argument("--encoder", required=True, help="ViT / DeiT checkpoint folder or hub repo id")
    p.add_argument("--decoder", required=True, help="decoder checkpoint folder or hub repo id")
    add_argument(p, "output_dir", required=True, help="a new folder for the composed model")
    p.add_argument("--seed", type=int, default=0, help="seed of the new cross-attention weights")
    for name, default in COMPOSE_TOKENS.items():
        add_argument(p, name, type=int, default=None, help=f"(default: {default})")
    add_flags(p, ModelArgs, only=("revision", "cache_dir"))


def _add_predict(sub) -> None:
    help_ = "caption images: write predictions.jsonl, skipped.jsonl and gallery.html"
    p = sub.add_parser("predict", help=help_, description=help_)
    p.add_argument("model", help="checkpoint folder (HF or NNX layout) or hub repo id")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image file, folder (searched recursively), quoted glob pattern, or a "
        ".csv / .jsonl / .json file with an image column (paths relative to that file)",
    )
    add_argument(p, "output_dir", required=True, help="folder for the results")
    add_argument(p, "batch_size", type=int, default=8, help="images per search (default: 8)")
    add_argument(p, "num_beams", type=int, help="default: the checkpoint's generation config")
    add_argument(p, "max_length", type=int, help="counts the start token")
    add_argument(p, "max_new_tokens", type=int, help="wins over --max_length")
    add_argument(p, "image_column", default="image", help="column of csv/jsonl/json inputs")
    add_argument(
        p,
        "caption_column",
        help="column of csv/jsonl/json inputs holding reference captions (several rows of one "
        "image: several references): the gallery and predictions.jsonl show which match",
    )
    add_argument(
        p,
        "attention_maps",
        action="store_true",
        help="put each caption's cross-attention over its image into gallery.html (hover or "
        "click a word)",
    )
    p.add_argument("--limit", type=int, help="caption only the first N images")
    add_argument(p, "gallery_size", type=int, default=1000, help="images shown in gallery.html")
    add_flags(p, ModelArgs, only=PREDICT_FLAGS)
    add_flags(p, DistributedArgs)


def _predict(args: argparse.Namespace) -> None:
    named = inspect.signature(predict).parameters  # its flags are named as its options
    options = {k: v for k, v in vars(args).items() if k in named and k not in ("model", "inputs")}
    summary = predict(args.model, args.inputs, **options)
    if not processes.is_main():  # process 0 wrote the files and says so
        return
    if "CIDEr" in summary:
        print(score_line(summary["exact_match"], summary["CIDEr"]))
    print(
        f"captioned {summary['captioned']} images, skipped {summary['skipped']} "
        f"({summary['caption_seconds']:.1f}s, {summary['images_per_second']:.1f} images/s); "
        f"wrote {summary['predictions_file']}, {summary['gallery_file']}, {summary['skipped_file']}"
    )


def _bench(args: argparse.Namespace, argv: list[str]) -> None:
    options = bench.args_from_namespace(args)
    results = bench.run(options, command=" ".join(["nnx-caption", *argv]))
    if not processes.is_main():  # process 0 wrote bench.json and says so
        return
    print(bench.table(results))
    print(f"{results[0]['peak_source']}; wrote {os.path.join(options.output_dir, 'bench.json')}")


def _plot(run_dir: str) -> None:
    try:
        written = plot_run(run_dir)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    print(f"wrote {', '.join(written) or 'nothing: metrics.jsonl holds no metrics yet'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnx-caption", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help=f"on an error, print the traceback too (or set {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])  # --debug on each
    for name, help_ in (
        ("convert", "write the converted NNX layout (safetensors keyed by NNX path)"),
        ("export", "write the Hugging Face layout that transformers loads"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("src", help="checkpoint folder (HF or NNX layout) or hub repo id")
        p.add_argument("dst", help="output folder")
        add_flags(p, ModelArgs, only=SOURCE_FLAGS)
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the weights dst holds (e.g. convert a folder in place)",
        )
    _add_compose(sub)
    _add_predict(sub)
    train = sub.add_parser(
        "train",
        help="train / evaluate / predict as HF's run_image_captioning_flax.py",
        description="Train, evaluate and predict with the flags of HF's "
        "run_image_captioning_flax.py. A run resumes from the newest checkpoint in --output_dir.",
    )
    train_args.build_parser(train)
    help_ = "time training and decoding of any configuration: step time, MFU, memory"
    bench.build_parser(sub.add_parser("bench", help=help_, description=help_))
    help_ = "draw a train run's metrics.jsonl as PNG plots next to it (loss, learning rate, ...)"
    plot = sub.add_parser("plot", help=help_, description=help_)
    plot.add_argument("run_dir", help="a `train` --output_dir (the folder holding metrics.jsonl)")
    demo = sub.add_parser("demo", help="train, evaluate and caption on the shapes dataset")
    demo.add_argument("--out", default="out/demo", help="where everything is written")
    demo.add_argument("--steps", type=int, default=3000, help="training steps")
    return parser


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record comes (main() may run again in a process
    that has replaced it since: a test, a notebook), not as it was when the handler was made."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _log_to_stderr() -> None:
    """The package's own log lines (e.g. what a checkpoint load did) on stderr."""
    logger = logging.getLogger("nnx_caption")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[nnx-caption] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _os_error(err: OSError) -> str:
    """An OSError as one line: the path, what happened, what to do."""
    where = f"{err.filename}: " if err.filename else ""
    what = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}{what}: free some space and run the same command (a train run resumes "
            "from its last checkpoint)"
        )
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}{what}: choose a folder that can be written"
    return f"{where}{what}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    _log_to_stderr()
    if not debug:
        quiet_failed_writes()

    def fail(message: object, status: int) -> int:
        if debug:
            traceback.print_exc()
        print(f"nnx-caption {args.command}: error: {message}", file=sys.stderr)
        return status

    try:
        if args.command in ("train", "predict", "bench"):  # they compute: on N processes too
            start(from_namespace(DistributedArgs, args))
            if not processes.is_main():  # info from process 0; warnings and errors from all
                logging.getLogger("nnx_caption").setLevel(logging.WARNING)
        if args.command == "compose":
            _compose(args)
        elif args.command in ("convert", "export"):
            _rewrite(args, "nnx" if args.command == "convert" else "hf")
        elif args.command == "predict":
            _predict(args)
        elif args.command == "bench":
            _bench(args, argv)
        elif args.command == "plot":
            _plot(args.run_dir)
        elif args.command == "demo":
            run_demo(args.out, args.steps)
        elif args.command == "train":
            loop.run(train_args.args_from_namespace(args, argv))
    except Preempted as stop:  # a clean stop, as a preempted job must make: exit 0
        print(f"nnx-caption {args.command}: {stop}", file=sys.stderr)
        return 0
    except USAGE_ERRORS as err:
        return fail(err, 2)
    except RunError as err:
        return fail(err, 1)
    except OSError as err:  # the disk, a folder's permissions, a path that went away
        return fail(_os_error(err), 1)
    except JaxRuntimeError as err:  # out of device memory; a collective whose peer is gone
        cause = (str(err).splitlines() or [type(err).__name__])[0]
        return fail(
            f"{cause}. The run stopped; where another process of a multi-process run was "
            "lost, the same commands resume from the last checkpoint",
            1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
