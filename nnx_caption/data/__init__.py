"""Training data: caption tables, images decoded once, batches in a resumable order; and the
synthetic "shapes" dataset of the demo.

One job per module:

- `tables`: csv / json / jsonl tables and imagefolder metadata read into a `Split` of
  `Example`s (`load_split`, `read_table`); unusable rows are skipped, broken tables are a
  `DataError`.
- `targets`: captions encoded as labels and decoder inputs as Hugging Face's
  run_image_captioning_flax.py encodes them (`encode_targets`, `shift_tokens_right`).
- `images`: image files decoded and resized in grain's worker processes, and the `ImageStore`
  holding a split's images.
- `batches`: `CaptionDataset`, the resumable epoch order (`epoch_order`) and the batch streams
  (`train_batches`, `eval_batches`).
- `shapes`: the synthetic shapes dataset (`make_shapes`) and `train_caption_tokenizer`.

Every name is re-exported here: `from nnx_caption.data import load_split` works as before.
"""

from nnx_caption.data.batches import (
    CAPTIONS_PER_STEP,
    CaptionDataset,
    epoch_order,
    eval_batches,
    process_rows,
    train_batches,
)
from nnx_caption.data.images import ImageStore
from nnx_caption.data.shapes import (
    COLOURS,
    SHAPES,
    SHAPES_MARKER,
    SHAPES_VERSION,
    SIZES,
    make_shapes,
    shapes_caption,
    shapes_specs,
    train_caption_tokenizer,
)
from nnx_caption.data.tables import (
    IMAGEFOLDER_IMAGE_COLUMN,
    IMAGEFOLDER_METADATA,
    TABLE_SUFFIXES,
    DataError,
    Example,
    Split,
    load_split,
    read_table,
)
from nnx_caption.data.targets import encode_targets, shift_tokens_right

__all__ = [
    "CAPTIONS_PER_STEP",
    "process_rows",
    "COLOURS",
    "IMAGEFOLDER_IMAGE_COLUMN",
    "IMAGEFOLDER_METADATA",
    "SHAPES",
    "SHAPES_MARKER",
    "SHAPES_VERSION",
    "SIZES",
    "TABLE_SUFFIXES",
    "CaptionDataset",
    "DataError",
    "Example",
    "ImageStore",
    "Split",
    "encode_targets",
    "epoch_order",
    "eval_batches",
    "load_split",
    "make_shapes",
    "read_table",
    "shapes_caption",
    "shapes_specs",
    "shift_tokens_right",
    "train_batches",
    "train_caption_tokenizer",
]
