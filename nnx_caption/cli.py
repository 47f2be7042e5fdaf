"""The `nnx-caption` command."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from nnx_caption.config import ConfigError
from nnx_caption.data import DataError
from nnx_caption.predict import UsageError, predict
from nnx_caption.safetensors_io import CheckpointError


def _copy_aux(src: str, dst: str) -> list[str]:
    """Tokenizer and image-processor files travel with the weights."""
    from nnx_caption.hf import AUX_FILES

    copied = []
    for name in AUX_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path) and os.path.abspath(path) != os.path.abspath(
            os.path.join(dst, name)
        ):
            shutil.copyfile(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def _rewrite(args: argparse.Namespace, layout: str) -> None:
    from nnx_caption.hf import from_pretrained, resolve, save_pretrained

    src = resolve(args.src, revision=args.revision, cache_dir=args.cache_dir)
    model = from_pretrained(src)
    save_pretrained(model, args.dst, layout=layout)
    copied = _copy_aux(src, args.dst)
    print(f"wrote {layout.upper()} layout to {args.dst} (+ {', '.join(copied) or 'no aux files'})")


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
    p.add_argument("--output-dir", required=True, help="folder for the results")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, help="default: the checkpoint's generation config")
    p.add_argument("--max-length", type=int, help="counts the start token")
    p.add_argument("--max-new-tokens", type=int, help="wins over --max-length")
    p.add_argument("--image-column", default="image", help="column of csv/jsonl/json inputs")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--limit", type=int, help="caption only the first N images")
    p.add_argument("--gallery-size", type=int, default=1000, help="images shown in gallery.html")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--cache-dir", help="huggingface_hub cache folder")


def _predict(args: argparse.Namespace) -> None:
    summary = predict(
        args.model,
        args.inputs,
        args.output_dir,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        image_column=args.image_column,
        dtype=args.dtype,
        revision=args.revision,
        cache_dir=args.cache_dir,
        limit=args.limit,
        gallery_size=args.gallery_size,
    )
    print(
        f"captioned {summary['captioned']} images, skipped {summary['skipped']} "
        f"({summary['caption_seconds']:.1f}s, {summary['images_per_second']:.1f} images/s); "
        f"wrote {summary['predictions_file']}, {summary['gallery_file']}, {summary['skipped_file']}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnx-caption", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("convert", "write the converted NNX layout (safetensors keyed by NNX path)"),
        ("export", "write the Hugging Face layout that transformers loads"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("src", help="checkpoint folder (HF or NNX layout) or hub repo id")
        p.add_argument("dst", help="output folder")
        p.add_argument("--revision", help="hub revision (branch, tag or commit)")
        p.add_argument("--cache-dir", help="huggingface_hub cache folder")
    _add_predict(sub)
    from nnx_caption.loop import build_parser as add_train_flags

    train = sub.add_parser(
        "train",
        help="train / evaluate / predict as HF's run_image_captioning_flax.py",
        description="Train, evaluate and predict with the flags of HF's "
        "run_image_captioning_flax.py. A run resumes from the newest checkpoint in --output_dir.",
    )
    add_train_flags(train)
    demo = sub.add_parser("demo", help="train, evaluate and caption on the shapes dataset")
    demo.add_argument("--out", default="out/demo", help="where everything is written")
    demo.add_argument("--steps", type=int, default=3000, help="training steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("convert", "export"):
            _rewrite(args, "nnx" if args.command == "convert" else "hf")
        elif args.command == "predict":
            _predict(args)
        elif args.command == "demo":
            from nnx_caption.demo import run_demo

            run_demo(args.out, args.steps)
        elif args.command == "train":
            from nnx_caption.loop import args_from_namespace, run

            run(args_from_namespace(args, argv if argv is not None else sys.argv[1:]))
    except (CheckpointError, ConfigError, UsageError, DataError) as err:
        print(f"nnx-caption {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
