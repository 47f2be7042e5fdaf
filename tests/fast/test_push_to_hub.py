"""push_to_hub: the model card carries the results and the upload leaves checkpoints out.
The hub cannot be reached here, so huggingface_hub.HfApi is replaced by a recorder."""

from __future__ import annotations

import json

import huggingface_hub

from nnx_caption.loop import TrainArgs, push_to_hub


class Recorder:
    calls: list = []

    def __init__(self, token=None):
        Recorder.calls.append(("init", token))

    def create_repo(self, repo, exist_ok=False):
        Recorder.calls.append(("create_repo", repo, exist_ok))

    def upload_folder(self, **kw):
        Recorder.calls.append(("upload_folder", kw))


def test_push_to_hub_writes_card_and_uploads(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    out = tmp_path / "my-captioner"
    out.mkdir()
    results = {"eval": {"eval_Bleu_4": 0.42, "eval_loss": 1.5}}
    push_to_hub(TrainArgs(output_dir=str(out), hub_token="tok", push_to_hub=True), results)
    card = (out / "README.md").read_text()
    assert "eval_Bleu_4" in card and json.dumps(results, indent=2) in card
    assert Recorder.calls[0] == ("init", "tok")
    assert Recorder.calls[1] == ("create_repo", "my-captioner", True)
    upload = Recorder.calls[2][1]
    assert upload["repo_id"] == "my-captioner" and upload["folder_path"] == str(out)
    assert "checkpoints/*" in upload["ignore_patterns"]
