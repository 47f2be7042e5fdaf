"""Tokenizers as transformers builds them from a checkpoint's files, without transformers:
GPT-2 and RoBERTa byte-level BPE (vocab.json + merges.txt), BERT WordPiece (vocab.txt), XLM-R
sentencepiece (sentencepiece.bpe.model, converted as transformers converts it), or any
tokenizer.json. `tokenizer_config.json`'s `tokenizer_class` names the family (by the
files when it is absent), and with it the named special tokens' defaults and the
post-processor that adds them, as each transformers class sets them."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from nnx_caption.files import read_json, replacing, write_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SENTENCEPIECE_FILE = "sentencepiece.bpe.model"  # XLM-R's (trocr-small's)
# The named special tokens, in the order transformers adds them.
_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Options of a family's build that its transformers class rebuilds the backend from: written
# back to tokenizer_config.json so that transformers builds the same tokenizer.
_BUILD_OPTIONS = (
    "do_lower_case", "strip_accents", "tokenize_chinese_chars", "trim_offsets", "add_prefix_space"
)  # fmt: skip


def _byte_level_bpe(path: str, config: dict, tokens: dict) -> _Backend:
    """vocab.json + merges.txt, as GPT2Tokenizer and RobertaTokenizer build them."""
    bpe = models.BPE.from_file(
        os.path.join(path, "vocab.json"),
        os.path.join(path, "merges.txt"),
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    backend = _Backend(bpe)
    prefix = bool(config["add_prefix_space"])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    backend.decoder = decoders.ByteLevel()
    return backend


def _word_piece(path: str, config: dict, tokens: dict) -> _Backend:
    """vocab.txt, as BertTokenizer builds it."""
    vocab = os.path.join(path, "vocab.txt")
    backend = _Backend(models.WordPiece.from_file(vocab, unk_token=tokens["unk_token"]))
    lower = bool(config.get("do_lower_case", True))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),
        lowercase=lower,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _sentencepiece(path: str, config: dict, tokens: dict) -> _Backend:
    """sentencepiece.bpe.model as XLMRobertaTokenizer converts it: the pieces with their
    scores as a Unigram model in fairseq's ids (<s>, <pad>, </s>, <unk>, the pieces after the
    model's own first three, then <mask>), its precompiled normalizer, and Metaspace."""
    try:  # an optional dependency (nnx-caption[sentencepiece]): only this family needs it
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise ValueError(
            f"{path}: an XLM-R sentencepiece tokenizer needs the sentencepiece package to read "
            "its model: pip install 'nnx-caption[sentencepiece]' (or save the tokenizer once "
            "with transformers, which writes a tokenizer.json that loads without it)"
        ) from None
    proto = sentencepiece_model_pb2.ModelProto()
    with open(os.path.join(path, SENTENCEPIECE_FILE), "rb") as f:
        proto.ParseFromString(f.read())
    first = [tokens[k] for k in ("bos_token", "pad_token", "eos_token", "unk_token")]
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = [(t, 0.0) for t in first] + pieces[3:] + [(tokens["mask_token"], 0.0)]
    backend = _Backend(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    if proto.normalizer_spec.precompiled_charsmap:
        backend.normalizer = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    scheme = "always" if config["add_prefix_space"] else "never"
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace("▁", prepend_scheme=scheme)]
    )
    backend.decoder = decoders.Metaspace("▁", prepend_scheme=scheme)
    return backend


def _bos_eos_if_asked(backend: _Backend, tokens: dict, config: dict):
    """GPT2Tokenizer adds bos / eos only when the config asks (add_bos_token, add_eos_token)."""
    bos = tokens["bos_token"] if config.get("add_bos_token") else None
    eos = tokens["eos_token"] if config.get("add_eos_token") else None
    if not (bos or eos):
        return None

    def template(seq: str, type_id: int) -> str:
        return " ".join(f"{t}:{type_id}" for t in (bos, seq, eos) if t)

    return processors.TemplateProcessing(
        single=template("$A", 0),
        pair=template("$A", 0) + " " + template("$B", 1),
        special_tokens=[(t, backend.token_to_id(t)) for t in {bos, eos} if t],
    )


def _roberta(backend: _Backend, tokens: dict, config: dict):
    """<s> A </s> (</s> B </s>)."""
    sep, cls = tokens["sep_token"], tokens["cls_token"]
    return processors.RobertaProcessing(
        (sep, backend.token_to_id(sep)),
        (cls, backend.token_to_id(cls)),
        trim_offsets=bool(config.get("trim_offsets", True)),
        add_prefix_space=bool(config.get("add_prefix_space", False)),
    )


def _bos_a_eos(backend: _Backend, tokens: dict, config: dict):
    """<s> A </s> (</s> B </s>), XLMRobertaTokenizer's."""
    bos, eos = tokens["bos_token"], tokens["eos_token"]
    return processors.TemplateProcessing(
        single=[bos, "$A", eos],
        pair=[bos, "$A", eos, eos, "$B", eos],
        special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))],
    )


def _bert(backend: _Backend, tokens: dict, config: dict):
    """[CLS] A [SEP] (B [SEP])."""
    cls, sep = tokens["cls_token"], tokens["sep_token"]
    return processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))],
    )


@dataclass(frozen=True)
class Family:
    """A transformers tokenizer class: the files it is built from, its backend, its named
    special tokens' defaults, and its post-processor (where there is no tokenizer.json)."""

    name: str  # tokenizer_class, as tokenizer_config.json records it
    files: tuple[str, ...]
    build: Callable[[str, dict, dict], _Backend]  # (folder, config, named special tokens)
    specials: dict[str, str | None]
    post_processor: Callable[[_Backend, dict, dict], Any]
    add_prefix_space: bool = False  # its default where the config does not say


_GPT2_SPECIAL = "<|endoftext|>"  # GPT2Tokenizer's default bos/eos/unk token
GPT2 = Family(
    "GPT2Tokenizer",
    ("vocab.json", "merges.txt"),
    _byte_level_bpe,
    {"bos_token": _GPT2_SPECIAL, "eos_token": _GPT2_SPECIAL, "unk_token": _GPT2_SPECIAL},
    _bos_eos_if_asked,
)
ROBERTA = Family(
    "RobertaTokenizer",
    ("vocab.json", "merges.txt"),
    _byte_level_bpe,
    {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "mask_token": "<mask>",
    },  # fmt: skip
    _roberta,
)
BERT = Family(
    "BertTokenizer",
    ("vocab.txt",),
    _word_piece,
    {
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    },  # fmt: skip
    _bert,
)
XLM_ROBERTA = Family(
    "XLMRobertaTokenizer",
    (SENTENCEPIECE_FILE,),
    _sentencepiece,
    ROBERTA.specials,
    _bos_a_eos,
    add_prefix_space=True,
)
FAMILIES = {f.name: f for f in (GPT2, ROBERTA, BERT, XLM_ROBERTA)}


def family_of(path: str, config: dict) -> Family:
    """tokenizer_config.json's class (its Fast twin alike), else the files that are there."""
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    if name in FAMILIES:
        return FAMILIES[name]
    if name:
        has_json = os.path.isfile(os.path.join(path, TOKENIZER_FILE))
        if not has_json:
            raise ValueError(
                f"{path}: tokenizer_class {name!r} is not one nnx-caption builds from its "
                f"vocabulary files ({', '.join(FAMILIES)}); a tokenizer.json of it would load"
            )
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    if has(SENTENCEPIECE_FILE) and not has("vocab.json"):
        return XLM_ROBERTA
    if has("vocab.txt") and not has("vocab.json"):
        return BERT
    return GPT2


_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _token_content(value: Any) -> str | None:
    """A special token from a config: a string, an AddedToken dict, or None."""
    return value.get("content") if isinstance(value, dict) else value


def _as_added_token(value: Any, special: bool) -> AddedToken:
    if isinstance(value, dict):
        flags = {k: value[k] for k in _ADDED_TOKEN_FLAGS if k in value}
        flags.setdefault("special", special)
        return AddedToken(value["content"], **flags)
    return AddedToken(value, special=special, normalized=not special)


def _id_list(ids: Any) -> list[int]:
    ids = np.asarray(ids).tolist()  # numpy, jax arrays and lists alike
    return [ids] if isinstance(ids, int) else ids


def _load_backend(path: str, family: Family, config: dict, tokens: dict) -> _Backend:
    tokenizer_file = os.path.join(path, TOKENIZER_FILE)
    files = [os.path.join(path, n) for n in family.files]
    if not os.path.isfile(tokenizer_file) and not all(map(os.path.isfile, files)):
        raise FileNotFoundError(
            f"no tokenizer in directory {path!r}: looked for {TOKENIZER_FILE}, "
            f"or {' + '.join(family.files)} ({family.name})"
        )
    try:
        if os.path.isfile(tokenizer_file):
            return _Backend.from_file(tokenizer_file)
        return family.build(path, config, tokens)
    except Exception as e:  # tokenizers raises plain Exceptions on malformed files
        raise ValueError(f"cannot load the tokenizer in {path!r}: {e}") from e


class Tokenizer:
    """A tokenizer with its transformers class's behaviour and files (`family`: GPT-2
    byte-level BPE, RoBERTa BPE or BERT WordPiece; any tokenizer.json)."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = _GPT2_SPECIAL,
        eos_token: str | None = _GPT2_SPECIAL,
        unk_token: str | None = _GPT2_SPECIAL,
        pad_token: str | None = None,
        sep_token: str | None = None,
        cls_token: str | None = None,
        mask_token: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        model_max_length: int | None = None,
        family: Family = GPT2,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.sep_token, self.cls_token, self.mask_token = sep_token, cls_token, mask_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.model_max_length = model_max_length
        self.family = family
        self.options = dict(options or {})  # the family's _BUILD_OPTIONS from the config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.fspath(path)
        config = read_json(os.path.join(path, TOKENIZER_CONFIG)) or {}
        if "added_tokens_decoder" not in config:
            # Legacy special_tokens_map.json overrides the config, as in transformers.
            config.update(read_json(os.path.join(path, SPECIAL_TOKENS_MAP)) or {})
        family = family_of(path, config)
        config = {"add_prefix_space": family.add_prefix_space, **config}
        named = [config.get(k, family.specials.get(k)) for k in _NAMES]
        specials = {k: _token_content(t) for k, t in zip(_NAMES, named, strict=True)}
        backend = _load_backend(path, family, config, specials)

        # Tokens the config adds, then the named and extra special tokens, skipping those the
        # backend already has (as transformers does).
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        added = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
        to_add = [_as_added_token(t, special=False) for _, t in added]
        to_add += [_as_added_token(t, special=True) for t in [*named, *extra] if t]
        for token in to_add:
            if token.content not in {
                t.content for t in backend.get_added_tokens_decoder().values()
            }:
                backend.add_tokens([token])

        # Built from the vocabulary files, the family's post-processor adds its special tokens
        # (GPT-2's only where add_bos/eos_token ask); a tokenizer.json's own decides.
        if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
            post = family.post_processor(backend, specials, config)
            if post is not None:
                backend.post_processor = post

        # transformers 5 skips this cleanup for BPE models, as it corrupts their output.
        clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            not isinstance(backend.model, models.BPE)
            or config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
        )
        return cls(
            backend,
            **specials,
            clean_up_tokenization_spaces=clean_up,
            model_max_length=config.get("model_max_length"),
            family=family,
            options={k: config[k] for k in _BUILD_OPTIONS if k in config},
        )

    @property
    def add_prefix_space(self) -> bool:
        """Whether a space is put before the text: the byte-level pre-tokenizer's own flag,
        else the config's (a sentencepiece Metaspace's prepend scheme), else the family's."""
        flag = getattr(self.backend.pre_tokenizer, "add_prefix_space", None)
        if flag is None:
            flag = self.options.get("add_prefix_space", self.family.add_prefix_space)
        return bool(flag)

    # -- ids -----------------------------------------------------------------------------------

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table's minimum size)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        padding: bool | str = False,
        truncation: bool = False,
    ) -> dict[str, Any]:
        """Encode a text or batch. Padded results are int32 arrays, else lists.

        Padding is on the right with `pad_token_id`, or `eos_token_id` when there is no pad
        token (GPT-2 has none); `attention_mask` marks the real tokens.
        """
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if truncation and max_length is None:
            max_length = self.model_max_length
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
        encodings = self.backend.encode_batch(batch, add_special_tokens=False)
        ids = []
        for enc in encodings:
            if truncation:  # keep room for tokens the post-processor adds, as transformers does
                enc.truncate(max_length - self.backend.num_special_tokens_to_add(False))
            ids.append(self.backend.post_process(enc).ids)

        if padding is True:
            padding = "longest"
        if padding in (False, None, "do_not_pad"):
            out: dict[str, Any] = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
        else:
            if padding == "longest":
                length = max((len(x) for x in ids), default=0)
            elif padding == "max_length":
                if max_length is None:
                    raise ValueError('padding="max_length" needs max_length')
                length = max_length
            else:
                raise ValueError(
                    f'padding must be False, True, "longest" or "max_length": {padding!r}'
                )
            if any(len(x) > length for x in ids):
                raise ValueError(f"a text is longer than max_length={length}; pass truncation=True")
            pad_id = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
            input_ids = np.full((len(ids), length), pad_id or 0, np.int32)
            mask = np.zeros((len(ids), length), np.int32)
            for row, x in enumerate(ids):
                input_ids[row, : len(x)] = x
                mask[row, : len(x)] = 1
            out = {"input_ids": input_ids, "attention_mask": mask}
        return {k: v[0] for k, v in out.items()} if single else out

    # -- decoding --------------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:  # transformers' clean_up_tokenization
            for before, after in [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'")]:
                text = text.replace(before, after)
            for suffix in ("n't", "'m", "'s", "'ve", "'re"):
                text = text.replace(" " + suffix, suffix)
        return text

    def batch_decode(self, ids: Any, skip_special_tokens: bool = False) -> list[str]:
        rows = ids.tolist() if hasattr(ids, "tolist") else ids
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    # -- saving ----------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json, as the family's transformers class
        loads them."""
        os.makedirs(directory, exist_ok=True)
        with replacing(os.path.join(directory, TOKENIZER_FILE), encoding="utf-8") as f:
            f.write(self.backend.to_str(pretty=True))
        config = {
            **self.options,
            "tokenizer_class": self.family.name,
            "add_prefix_space": self.add_prefix_space,
            **{name: getattr(self, name) for name in _NAMES},
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        write_json(directory, TOKENIZER_CONFIG, config)
