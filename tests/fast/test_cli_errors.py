"""`nnx-caption train` refuses what cannot work before it reads data, compiles or writes
anything: exit 2 and one line naming the flag, path or file, no traceback (`--debug` adds it).
Run in this process through cli.main, on weights/tiny (64 decoder positions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnx_caption.cli import main as cli

TINY = Path(__file__).resolve().parents[2] / "weights" / "tiny"


def _train(tmp_path, *flags: str) -> list[str]:
    return [
        "train",
        *("--model_name_or_path", str(TINY)),
        *("--output_dir", str(tmp_path / "out")),
        # No such file: a flag error must come before the data is looked at.
        *("--train_file", str(tmp_path / "missing.csv"), "--do_train"),
        "--max_target_length",
        "16",
        *flags,
    ]


@pytest.mark.parametrize(
    "flags, named",
    [
        (("--max_target_length", "0"), "--max_target_length 0"),
        (("--max_target_length", "65"), "--max_target_length 65"),
        (("--val_max_target_length", "100"), "--val_max_target_length 100"),
        (("--logging_steps", "0"), "--logging_steps 0"),
        (("--per_device_eval_batch_size", "0"), "--per_device_eval_batch_size 0"),
        (("--per_device_train_batch_size", "-2"), "--per_device_train_batch_size -2"),
        (("--save_total_limit", "-1"), "--save_total_limit -1"),
        (("--num_train_epochs", "0"), "--num_train_epochs 0"),
        (("--learning_rate", "-1"), "--learning_rate -1"),
        (("--warmup_steps", "-5"), "--warmup_steps -5"),
        (("--label_smoothing_factor", "1.5"), "--label_smoothing_factor 1.5"),
        (("--eval_steps", "0"), "--eval_steps 0"),
        (("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps 0"),
        (("--mesh_fsdp", "2"), "--mesh_fsdp 2"),  # one device here: no FSDP axis of 2
        (("--mesh_data", "0"), "--mesh_data 0"),
        (("--freeze", "a("), "--freeze 'a('"),
    ],
)
def test_each_bad_flag_is_a_usage_error_before_anything_runs(tmp_path, capsys, flags, named):
    assert cli(_train(tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert err.count("\n") == 1  # one line
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_default_target_length_past_the_decoders_positions_is_named(tmp_path, capsys):
    """HF's default --max_target_length 128 on a decoder of 64 positions."""
    argv = _train(tmp_path)
    del argv[argv.index("--max_target_length") : argv.index("--max_target_length") + 2]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "--max_target_length 128" in err and "64 positions" in err


def test_an_output_dir_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    assert cli(_train(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {tmp_path / 'out'} is a file" in err and "Traceback" not in err
    assert (tmp_path / "out").read_text() == "not a folder"


def test_debug_adds_the_traceback(tmp_path, capsys):
    assert cli(_train(tmp_path, "--logging_steps", "0", "--debug")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("--logging_steps 0: must be at least 1")


def test_a_coco_file_without_annotations_is_named(tmp_path, capsys):
    """An instances_*.json (images, no captions) given as the training data."""
    coco = tmp_path / "instances_train2017.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}], "categories": []}))
    argv = _train(tmp_path)
    argv[argv.index("--train_file") + 1] = str(coco)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert str(coco) in err and "no 'annotations'" in err and "Traceback" not in err


def test_a_json_config_value_of_the_wrong_type_is_named(tmp_path, capsys):
    """HF's scripts take their flags from a JSON file too: a string where a number belongs."""
    config = tmp_path / "flags.json"
    config.write_text(json.dumps({"logging_steps": "10"}))
    assert cli([*_train(tmp_path), str(config)]) == 2
    err = capsys.readouterr().err
    assert "--logging_steps '10': must be of type int" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flags, named",
    [
        (("--num_processes", "2"), "missing --coordinator_address, --process_id"),
        (("--coordinator_address", "127.0.0.1:1", "--process_id", "0"), "missing --num_processes"),
        (
            ("--coordinator_address", "127.0.0.1:1", "--num_processes", "2", "--process_id", "2"),
            "--process_id 2: processes are numbered 0 to 1",
        ),
        (("--num_processes", "0"), "--num_processes 0: must be at least 1"),
    ],
)
def test_distributed_flags_that_name_no_run_are_usage_errors(tmp_path, capsys, flags, named):
    for command in (_train(tmp_path), ["bench", "--preset", "tiny"], ["predict", str(TINY), "x"]):
        extra = ["--output_dir", str(tmp_path / "p")] if command[0] == "predict" else []
        assert cli([*command, *extra, *flags]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, err
