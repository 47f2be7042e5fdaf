"""Bad checkpoints are refused with an error naming the file, the key and what is wrong; odd but
valid ones (legacy buffers, a head stored under either name, shards, bf16) load."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import nnx_caption as nc
from nnx_caption.cli import main as cli
from nnx_caption.config import tiny
from nnx_caption.safetensors_io import SafetensorsReader, write_safetensors


def _read_all(path) -> dict[str, np.ndarray]:
    with SafetensorsReader(path) as r:
        return {k: r.read(k) for k in r.entries}


def _write_all(path, tensors: dict[str, np.ndarray]) -> None:
    write_safetensors(
        path, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()], {"format": "pt"}
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
    model = nc.VisionEncoderDecoder(tiny(), rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp("tiny_hf")
    nc.save_pretrained(model, path)
    return path


@pytest.fixture
def ckpt(saved, tmp_path) -> pathlib.Path:
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    return path


def _inputs():
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.standard_normal((1, 32, 32, 3), dtype=np.float32)),
        jnp.asarray(rng.integers(0, 512, (1, 5)), jnp.int32),
    )


def _edit(ckpt, fn) -> None:
    tensors = _read_all(ckpt / "model.safetensors")
    fn(tensors)
    _write_all(ckpt / "model.safetensors", tensors)


def _raises(ckpt, *needles):
    with pytest.raises((nc.CheckpointError, nc.ConfigError)) as err:
        nc.from_pretrained(ckpt)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    return str(err.value)


def test_save_load_round_trip_is_exact(saved):
    model = nc.VisionEncoderDecoder(tiny(), rngs=nnx.Rngs(0))
    loaded = nc.from_pretrained(saved)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(loaded, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_missing_tensor(ckpt):
    _edit(ckpt, lambda t: t.pop("decoder.transformer.h.1.crossattention.q_attn.weight"))
    _raises(ckpt, "missing 1 tensor", "decoder.transformer.h.1.crossattention.q_attn.weight")


def test_unexpected_tensor(ckpt):
    _edit(ckpt, lambda t: t.update({"decoder.transformer.h.0.attn.rotary": np.zeros(3, "f4")}))
    _raises(ckpt, "unexpected tensor", "decoder.transformer.h.0.attn.rotary", "model.safetensors")


def test_extra_layer_is_unexpected(ckpt):
    _edit(ckpt, lambda t: t.update({"decoder.transformer.h.7.ln_1.weight": np.ones(48, "f4")}))
    _raises(ckpt, "unexpected tensor", "decoder.transformer.h.7.ln_1.weight")


def test_legacy_buffers_and_pooler_are_ignored(ckpt):
    def add(t):
        t["decoder.transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), "f4"))
        t["decoder.transformer.h.0.attn.masked_bias"] = np.array(-1e4, "f4")
        t["decoder.transformer.h.1.crossattention.bias"] = np.ones((1, 1, 64, 64), "f4")
        t["decoder.transformer.h.1.crossattention.masked_bias"] = np.array(-1e4, "f4")
        t["encoder.pooler.dense.weight"] = np.ones((32, 32), "f4")
        t["encoder.pooler.dense.bias"] = np.ones(32, "f4")

    _edit(ckpt, add)
    nc.from_pretrained(ckpt)


def test_shape_mismatch(ckpt):
    _edit(ckpt, lambda t: t.update({"decoder.transformer.wpe.weight": np.zeros((63, 48), "f4")}))
    _raises(ckpt, "decoder.transformer.wpe.weight", "(63, 48)", "(64, 48)")


def test_transposed_weight_of_same_size_is_a_shape_mismatch(ckpt):
    key = "encoder.encoder.layer.0.intermediate.dense.weight"  # (64, 32) in nn.Linear layout
    _edit(ckpt, lambda t: t.update({key: np.ascontiguousarray(t[key].T)}))
    _raises(ckpt, key, "(32, 64)")


def test_integer_dtype(ckpt):
    key = "decoder.transformer.ln_f.bias"
    _edit(ckpt, lambda t: t.update({key: np.zeros(48, np.int32)}))
    _raises(ckpt, key, "I32", "floating")


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    _raises(ckpt, str(path), "truncated")


def test_garbage_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _raises(ckpt, "model.safetensors", "not valid JSON")
    (ckpt / "model.safetensors").write_bytes(b"abc")
    _raises(ckpt, "model.safetensors", "truncated")


def test_missing_and_invalid_config(ckpt):
    (ckpt / "config.json").rename(ckpt / "config.bak")
    _raises(ckpt, str(ckpt / "config.json"), "missing")
    (ckpt / "config.json").write_text("{not json")
    _raises(ckpt, "config.json", "not valid JSON")
    cfg = json.loads((ckpt / "config.bak").read_text())
    for edit, needle in (
        (lambda c: c.update(model_type="bert"), "model_type"),
        (lambda c: c["decoder"].update(model_type="llama"), "decoder.model_type"),
        (lambda c: c["decoder"].update(n_head=5), "n_embd % n_head"),
        (lambda c: c["encoder"].update(hidden_act="gelu_magic"), "gelu_magic"),
        (lambda c: c["decoder"].update(n_layer="two"), "decoder.n_layer"),
        (lambda c: c.update(decoder_start_token_id=10**6), "decoder_start_token_id"),
    ):
        bad = json.loads(json.dumps(cfg))
        edit(bad)
        (ckpt / "config.json").write_text(json.dumps(bad))
        _raises(ckpt, "config.json", needle)


def test_head_stored_under_either_name_loads(ckpt):
    model = nc.from_pretrained(ckpt)
    pixels, ids = _inputs()
    want = model(pixels, ids)

    _edit(
        ckpt,
        lambda t: t.update({"decoder.lm_head.weight": t.pop("decoder.transformer.wte.weight")}),
    )
    np.testing.assert_array_equal(nc.from_pretrained(ckpt)(pixels, ids), want)

    _edit(ckpt, lambda t: t.update({"decoder.transformer.wte.weight": t["decoder.lm_head.weight"]}))
    np.testing.assert_array_equal(nc.from_pretrained(ckpt)(pixels, ids), want)

    _edit(ckpt, lambda t: t.update({"decoder.lm_head.weight": t["decoder.lm_head.weight"] + 1}))
    _raises(ckpt, "decoder.lm_head.weight", "tie_word_embeddings")


def test_tied_head_is_shared_not_copied(ckpt):
    model = nc.from_pretrained(ckpt)
    params = nnx.state(model, nnx.Param)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
    assert "decoder.wte" in paths and not any("lm_head" in p for p in paths)


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(ckpt, tmp_path):
    """pytorch_model.bin is read (a state dict, by a restricted unpickler); a pickle in it
    that asks for os.mkdir is refused by name, and the directory is never made."""
    import zipfile

    os.remove(ckpt / "model.safetensors")
    marker = tmp_path / "ran"
    with zipfile.ZipFile(ckpt / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", f"cos\nmkdir\n(S'{marker}'\ntR.")
    _raises(ckpt, "pytorch_model.bin", "os.mkdir", "before anything of it ran")
    assert not marker.exists()
    os.remove(ckpt / "pytorch_model.bin")
    (ckpt / "model.pt").write_bytes(b"\x80\x04cos\nsystem\n.")  # other pickles: never read
    msg = _raises(ckpt, "model.pt", "never unpickled")
    assert "pytorch_model.bin" in msg


def test_no_weights(ckpt):
    os.remove(ckpt / "model.safetensors")
    _raises(ckpt, "no model.safetensors")


def test_sharded_checkpoint_and_bad_index(ckpt):
    model = nc.from_pretrained(ckpt)
    tensors = _read_all(ckpt / "model.safetensors")
    os.remove(ckpt / "model.safetensors")
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, names in shards.items():
        _write_all(ckpt / name, {k: tensors[k] for k in names})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(nc.from_pretrained(ckpt)(*_inputs()), model(*_inputs()))

    os.remove(ckpt / "model-00002-of-00002.safetensors")
    _raises(ckpt, "model-00002-of-00002.safetensors", "missing")
    (ckpt / "model.safetensors.index.json").write_text("[]")
    _raises(ckpt, "model.safetensors.index.json", "not a valid weights index")


def test_bf16_and_fp16_checkpoints_load_as_fp32(ckpt):
    fp32 = _read_all(ckpt / "model.safetensors")
    for dtype in (ml_dtypes.bfloat16, np.float16):
        _write_all(ckpt / "model.safetensors", {k: v.astype(dtype) for k, v in fp32.items()})
        model = nc.from_pretrained(ckpt)
        wte = model.decoder.wte[...]
        assert wte.dtype == jnp.float32
        np.testing.assert_array_equal(
            wte, fp32["decoder.transformer.wte.weight"].astype(dtype).astype(np.float32)
        )


def test_converted_layout_round_trip(ckpt, tmp_path):
    model = nc.from_pretrained(ckpt)
    nc.save_pretrained(model, tmp_path / "nnx", layout="nnx")
    assert (tmp_path / "nnx" / "nnx_model.safetensors").exists()
    assert not (tmp_path / "nnx" / "model.safetensors").exists()
    with SafetensorsReader(tmp_path / "nnx" / "nnx_model.safetensors") as r:
        assert "encoder.blocks.0.attn.q.kernel" in r.entries
        assert r.shape("encoder.blocks.0.attn.q.kernel") == (32, 4, 8)
    again = nc.from_pretrained(tmp_path / "nnx")
    np.testing.assert_array_equal(again(*_inputs()), model(*_inputs()))


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_convert_and_export_in_place_refuse_and_leave_the_source_unchanged(ckpt, tmp_path, capsys):
    before = _files(ckpt)
    for command in ("convert", "export"):
        assert cli([command, str(ckpt), str(ckpt)]) == 2
        err = capsys.readouterr().err
        assert "is the source folder" in err and "model.safetensors" in err and "--overwrite" in err
    assert _files(ckpt) == before

    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    assert cli(["convert", str(ckpt), str(other)]) == 2
    assert "holds a checkpoint (model.safetensors)" in capsys.readouterr().err
    assert _files(other) == before

    want = nc.from_pretrained(ckpt)(*_inputs())
    assert cli(["convert", str(ckpt), str(ckpt), "--overwrite"]) == 0
    assert not (ckpt / "model.safetensors").exists()  # one layout per folder
    np.testing.assert_array_equal(nc.from_pretrained(ckpt)(*_inputs()), want)


def test_save_pretrained_refuses_a_folder_holding_other_weights(ckpt):
    model = nc.from_pretrained(ckpt)
    before = _files(ckpt)
    with pytest.raises(nc.CheckpointError, match=r"holds other weights \(model.safetensors\)"):
        nc.save_pretrained(model, ckpt, layout="nnx")
    assert _files(ckpt) == before
    nc.save_pretrained(model, ckpt)  # the same layout is rewritten, as transformers does
    assert _files(ckpt) == before
    nc.save_pretrained(model, ckpt, layout="nnx", overwrite=True)
    assert not (ckpt / "model.safetensors").exists()
    assert (ckpt / "nnx_model.safetensors").exists()


def test_a_crash_mid_save_leaves_the_old_file(ckpt):
    path = ckpt / "model.safetensors"
    before = path.read_bytes()

    def crash():
        raise KeyboardInterrupt  # e.g. Ctrl-C while the second tensor is being written

    tensors = [("a", (2,), np.float32, lambda: np.ones(2, "f4")), ("b", (2,), np.float32, crash)]
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(path, tensors)
    assert path.read_bytes() == before
    assert not [n for n in os.listdir(ckpt) if ".tmp" in n]  # no partial file left behind


def test_not_a_folder(tmp_path):
    with pytest.raises(nc.CheckpointError, match="not a checkpoint folder"):
        nc.from_pretrained(tmp_path / "nope")


def test_hub_offline_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(nc.CheckpointError) as err:
        nc.from_pretrained("someorg/not-cached", cache_dir=str(tmp_path))
    assert "HF_HUB_OFFLINE" in str(err.value) and "someorg/not-cached" in str(err.value)


def test_hub_repo_from_the_cache(monkeypatch, saved, tmp_path):
    """A repo id resolves through huggingface_hub's real cache layout (no network here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0" * 40
    repo = tmp_path / "models--someorg--tiny"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = nc.from_pretrained("someorg/tiny", cache_dir=str(tmp_path))
    np.testing.assert_array_equal(model(*_inputs()), nc.from_pretrained(saved)(*_inputs()))


def test_training_checkpoints_restore_exactly_and_refuse_a_diverged_one(saved, tmp_path):
    """The trainer's orbax checkpoint (model and optimizer state, step) restores into a fresh
    trainer exactly. A state holding NaN (a diverged run's) is never saved; one saved without
    that check (orbax's own save, as an earlier nnx-caption did) is refused at restore, naming
    the array and saying what to do."""
    import orbax.checkpoint as ocp

    from nnx_caption.checkpointing import checkpoints
    from nnx_caption.errors import Diverged
    from nnx_caption.safetensors_io import NonFiniteError
    from nnx_caption.train import TrainConfig, Trainer

    trainer = Trainer(nc.from_pretrained(saved), TrainConfig(total_steps=2))
    trainer.step = 3
    first = trainer.save(str(tmp_path / "checkpoints"))
    assert checkpoints(str(tmp_path / "checkpoints")) == [first]
    fresh = Trainer(nc.from_pretrained(saved), TrainConfig(total_steps=2))
    assert fresh.restore(first)["step"] == 3 and fresh.step == 3
    for (_, a), (_, b) in zip(
        nnx.to_flat_state(fresh.state), nnx.to_flat_state(trainer.state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))

    flat = dict(nnx.to_flat_state(trainer.state))
    path = next(p for p in flat if "wpe" in map(str, p) and "mu" in map(str, p))
    flat[path][...] = flat[path][...].at[0, 0].set(jnp.nan)
    name = ".".join(map(str, path))
    trainer.step = 4
    with pytest.raises(Diverged, match=re.escape(name)):
        trainer.save(str(tmp_path / "checkpoints"))
    assert checkpoints(str(tmp_path / "checkpoints")) == [first]  # nothing written
    manager = ocp.CheckpointManager(
        str(tmp_path / "checkpoints"), options=ocp.CheckpointManagerOptions(step_prefix="step",
        step_format_fixed_length=8), item_names=("state", "meta")
    )  # fmt: skip
    items = dict(state=ocp.args.StandardSave(trainer.state), meta=ocp.args.JsonSave({"step": 4}))
    manager.save(4, args=ocp.args.Composite(**items))
    manager.wait_until_finished()
    diverged = checkpoints(str(tmp_path / "checkpoints"))[-1]
    with pytest.raises(NonFiniteError) as err:
        fresh.restore(diverged)
    assert repr(name) in str(err.value) and f"Move {diverged} away" in str(err.value)


def test_checkpoints_keep_the_newest_as_many_as_asked(saved, tmp_path):
    """save(keep=N) keeps the newest N step folders, also when an earlier save in the same
    folder asked for another limit (or none)."""
    from nnx_caption.checkpointing import checkpoints
    from nnx_caption.train import TrainConfig, Trainer

    trainer = Trainer(nc.from_pretrained(saved), TrainConfig(total_steps=2))
    folder = str(tmp_path / "checkpoints")
    for step, keep in ((1, None), (2, None), (3, None), (4, 2), (5, 2)):
        trainer.step = step
        trainer.save(folder, keep=keep)
    assert [os.path.basename(c) for c in checkpoints(folder)] == ["step_00000004", "step_00000005"]


def test_checksums_see_one_changed_bit_and_two_swapped_elements(saved):
    """Each array's checksum changes when one bit of one element does, or when two elements
    trade places (the index is part of what is hashed)."""
    from nnx_caption.checkpointing import fingerprint

    model = nc.from_pretrained(saved)
    state = nnx.state(model, nnx.Param)
    before = fingerprint(state)
    flat = dict(nnx.to_flat_state(state))
    path = next(p for p in flat if "wte" in map(str, p))
    name = ".".join(map(str, path))
    table = np.asarray(flat[path][...])
    flipped = table.copy()
    flipped.view(np.uint32)[3, 5] ^= 1  # the lowest mantissa bit
    swapped = table.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    for changed in (flipped, swapped):
        flat[path][...] = jnp.asarray(changed)
        after = fingerprint(state)
        assert after[name][0] != before[name][0]
        assert {k: v for k, v in after.items() if k != name} == {
            k: v for k, v in before.items() if k != name
        }
    flat[path][...] = jnp.asarray(table)
    assert fingerprint(state) == before


FAILING_WRITE = """
import resource, signal, sys, time
import nnx_caption as nc
from nnx_caption.checkpointing import SaveFailed
from nnx_caption.train import TrainConfig, Trainer

trainer = Trainer(nc.from_pretrained(sys.argv[1]), TrainConfig(total_steps=2))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
trainer.step = 1
trainer.save(sys.argv[2], block=False)
for polls in range(1, 3001):  # the step boundaries a train loop would poll at
    try:
        trainer.checkpointer.raise_if_failed()
    except SaveFailed as err:
        print(polls, err)
        break
    time.sleep(0.01)
"""


def test_a_save_that_fails_in_the_background_is_raised_by_the_next_poll(saved, tmp_path):
    """raise_if_failed, which the train loop calls at each step boundary, raises the failure
    of a background save once it has happened, with no further save needed; until then it
    returns at once."""
    import subprocess
    import sys

    script = tmp_path / "failing_write.py"
    script.write_text(FAILING_WRITE)
    folder = tmp_path / "checkpoints"
    done = subprocess.run(
        [sys.executable, str(script), str(saved), str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    polls, message = done.stdout.strip().split(" ", 1)
    assert 1 <= int(polls) < 3000
    assert message.startswith(f"saving {folder / 'step_00000001'} failed: File too large")
    assert "The last complete checkpoint is none" in message
