"""push_to_hub: the model card carries the results; the upload holds the model, its tokenizer
and processor files, the card, the results and the plots, and nothing else of the run
directory (checked with huggingface_hub's own pattern filter over the folder's real files);
a hub that fails is one clear error without the token. The hub cannot be reached here, so
huggingface_hub.HfApi is replaced by a recorder."""

from __future__ import annotations

import json
import os

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects

from nnx_caption.errors import RunError
from nnx_caption.publish import push_to_hub
from nnx_caption.train_args import TrainArgs

TOKEN = "hf_secret_token_for_the_test"
PUBLISHED = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "README.md",
    "eval_results.json",
    "test_results.json",
    "generated_eval.json",
    "loss.png",
    "eval_metrics.png",
}
PRIVATE = {
    "train_args.json",
    "metrics.jsonl",
    "skipped_train.jsonl",
    "gallery_eval.html",
    "train.lock",
    "model.safetensors.tmp123",
    "checkpoints/step_00000004/_CHECKPOINT_METADATA",
    "tensorboard/events.out.tfevents.1.host",
    "dataset_images/train/00000001.png",
    "dataset_images/train/x_results.json",
    "gallery/gallery.html",
}


class Recorder:
    calls: list = []
    fail: Exception | None = None

    def __init__(self, token=None):
        Recorder.calls.append(("init", token))

    def create_repo(self, repo, exist_ok=False):
        Recorder.calls.append(("create_repo", repo, exist_ok))

    def upload_folder(self, **kw):
        if Recorder.fail is not None:
            raise Recorder.fail
        Recorder.calls.append(("upload_folder", kw))


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    Recorder.calls, Recorder.fail = [], None
    out = tmp_path / "my-captioner"
    for name in PUBLISHED | PRIVATE:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    return out


def test_push_uploads_the_model_card_results_and_plots_only(run_dir):
    results = {"eval": {"eval_Bleu_4": 0.42, "eval_loss": 1.5}}
    push_to_hub(TrainArgs(output_dir=str(run_dir), hub_token=TOKEN, push_to_hub=True), results)
    card = (run_dir / "README.md").read_text()
    assert "eval_Bleu_4" in card and json.dumps(results, indent=2) in card
    assert Recorder.calls[0] == ("init", TOKEN)
    assert Recorder.calls[1] == ("create_repo", "my-captioner", True)
    upload = Recorder.calls[2][1]
    assert upload["repo_id"] == "my-captioner" and upload["folder_path"] == str(run_dir)
    every = [
        os.path.relpath(os.path.join(root, f), run_dir)
        for root, _, files in os.walk(run_dir)
        for f in files
    ]
    uploaded = set(
        filter_repo_objects(
            every,
            allow_patterns=upload.get("allow_patterns"),
            ignore_patterns=upload.get("ignore_patterns"),
        )
    )
    assert uploaded == PUBLISHED


def test_a_failed_push_is_one_error_without_the_token(run_dir):
    # What the HTTP client raises when the hub cannot be reached, a token echoed in it.
    Recorder.fail = ConnectionError(f"401 Unauthorized: invalid token {TOKEN}")
    args = TrainArgs(output_dir=str(run_dir), hub_token=TOKEN, push_to_hub=True)
    with pytest.raises(RunError) as err:
        push_to_hub(args, {})
    message = str(err.value)
    assert "401 Unauthorized" in message and "Everything else is saved" in message
    assert TOKEN not in message and "model.safetensors" in message
