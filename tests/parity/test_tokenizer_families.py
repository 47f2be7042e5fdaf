"""BERT WordPiece (vocab.txt), RoBERTa BPE (vocab.json + merges.txt) and XLM-R sentencepiece
(sentencepiece.bpe.model) tokenizers, built from their files as transformers' BertTokenizer,
RobertaTokenizer and XLMRobertaTokenizer build them: the same ids, special tokens and decoded
text, on vocabularies and a sentencepiece model trained here; and what we save, transformers
loads as the same tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
from parity.test_processing import CORPUS, TEXTS
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer

from nnx_caption.processing import Tokenizer

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
MORE_TEXTS = [*TEXTS, "[CLS] inside [SEP] text [MASK]", "<s> and </s> and <mask> here", "ÀÉÎ Õü"]


def _word_piece_vocab(directory) -> None:
    backend = BackendTokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=BERT_SPECIALS, show_progress=False
    )
    backend.train_from_iterator(CORPUS * 10, trainer)
    backend.model.save(str(directory))  # vocab.txt


def _byte_level_bpe_vocab(directory) -> None:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=ROBERTA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 10, trainer)
    backend.model.save(str(directory))  # vocab.json, merges.txt


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tokenizer folders as hub checkpoints hold them."""
    root = tmp_path_factory.mktemp("families")
    made = {}
    bert = root / "bert_cased"  # vocab.txt and a config (manga-ocr's layout, cased)
    bert.mkdir()
    _word_piece_vocab(bert)
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": False}
    (bert / "tokenizer_config.json").write_text(json.dumps(config))
    made["bert_cased"] = bert
    bare = root / "bert_bare"  # vocab.txt alone: BERT by its files, lower-cased by default
    bare.mkdir()
    shutil.copy(bert / "vocab.txt", bare)
    (bare / "config.json").write_text('{"model_type": "bert"}')  # how transformers knows it
    made["bert_bare"] = bare
    accents = root / "bert_strip_accents"
    shutil.copytree(bert, accents)
    config = {"tokenizer_class": "BertTokenizerFast", "strip_accents": True, "do_lower_case": False}
    (accents / "tokenizer_config.json").write_text(json.dumps(config))
    made["bert_strip_accents"] = accents

    roberta = root / "roberta"  # vocab.json + merges.txt and a config (trocr-base's layout)
    roberta.mkdir()
    _byte_level_bpe_vocab(roberta)
    (roberta / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "RobertaTokenizer"})
    )
    made["roberta"] = roberta
    prefix = root / "roberta_prefix_space"
    shutil.copytree(roberta, prefix)
    config = {"tokenizer_class": "RobertaTokenizer", "add_prefix_space": True}
    (prefix / "tokenizer_config.json").write_text(json.dumps(config))
    made["roberta_prefix_space"] = prefix
    xlmr = root / "xlm_roberta"  # sentencepiece.bpe.model only (trocr-small's layout)
    xlmr.mkdir()
    _sentencepiece_model(xlmr / "sentencepiece.bpe.model", root / "corpus.txt")
    config = {"tokenizer_class": "XLMRobertaTokenizer"}
    (xlmr / "tokenizer_config.json").write_text(json.dumps(config))
    made["xlm_roberta"] = xlmr
    return made


def _sentencepiece_model(path, corpus) -> None:
    """A BPE sentencepiece model trained here, as XLM-R's (<unk> 0, <s> 1, </s> 2)."""
    import sentencepiece

    corpus.write_text("\n".join(CORPUS * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=150,
        model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )  # fmt: skip
    assert path.exists()  # model_prefix + ".model"


LAYOUTS = [
    "bert_cased", "bert_bare", "bert_strip_accents", "roberta", "roberta_prefix_space",
    "xlm_roberta",
]  # fmt: skip


def _same(ours: Tokenizer, hf) -> None:
    assert ours.vocab_size == len(hf)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token"):  # fmt: skip
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.pad_token_id == hf.pad_token_id and ours.eos_token_id == hf.eos_token_id
    for text in MORE_TEXTS:
        ids = hf(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        for skip in (False, True):
            want = hf.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == want, (text, skip)
    batch = hf(MORE_TEXTS[:6], padding=True, return_tensors="np")
    got = ours(MORE_TEXTS[:6], padding=True)
    assert (got["input_ids"] == batch["input_ids"]).all()
    assert (got["attention_mask"] == batch["attention_mask"]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_built_from_its_files_as_transformers_builds_it(folders, layout):
    path = folders[layout]
    _same(Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_what_we_save_transformers_loads_as_the_same_tokenizer(folders, layout, tmp_path):
    Tokenizer.from_pretrained(folders[layout]).save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ == type(AutoTokenizer.from_pretrained(folders[layout])).__name__
    _same(Tokenizer.from_pretrained(tmp_path), hf)
    _same(Tokenizer.from_pretrained(folders[layout]), hf)
