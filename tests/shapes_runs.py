"""The shapes runs the e2e tests share: the data and a tiny model (make_setup), and the
`nnx-caption train` command they run on it, as a subprocess."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from flax import nnx

import nnx_caption as nc
from nnx_caption.config import CaptionConfig, GPT2Config, ViTConfig
from nnx_caption.data import load_split, make_shapes, train_caption_tokenizer
from nnx_caption.processing import ImageProcessor, Tokenizer


def make_setup(root: Path) -> dict:
    """The shapes data (imagefolder splits, and csv files of them with HF's example columns)
    and a tiny ViT + GPT-2 with a tokenizer trained on its captions, under `root`."""
    splits = make_shapes(str(root / "data"), n_train=256, n_validation=32, n_test=32, seed=1)
    init = root / "init"
    init.mkdir()
    captions = [e.caption for e in load_split(splits["train"], "file_name", "text").examples]
    train_caption_tokenizer(captions, str(init))
    tok = Tokenizer.from_pretrained(init)
    ImageProcessor(size=32).save_pretrained(init)
    eos = tok.eos_token_id
    config = CaptionConfig(
        encoder=ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        decoder=GPT2Config(
            vocab_size=tok.vocab_size,
            n_positions=20,
            n_embd=32,
            n_layer=1,
            n_head=2,
            bos_token_id=eos,
            eos_token_id=eos,
        ),
        decoder_start_token_id=eos,
        pad_token_id=eos,
        eos_token_id=eos,
    )
    nc.save_pretrained(nc.VisionEncoderDecoder(config, rngs=nnx.Rngs(0)), init)
    # The same data as csv files with HF's example columns (image_path, caption).
    for name in ("train", "validation"):
        rows = [json.loads(line) for line in open(Path(splits[name]) / "metadata.jsonl")]
        with open(root / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_path", "caption"])
            for r in rows:
                writer.writerow([str(Path(splits[name]) / r["file_name"]), r["text"]])
            if name == "validation":  # COCO-style: a second reference for 8 of the images
                for r in rows[:8]:
                    writer.writerow([str(Path(splits[name]) / r["file_name"]), "a picture"])
    return dict(root=root, init=init, splits=splits)


def read_scalars(path: Path) -> dict[str, list[float]]:
    """Scalars of a TensorBoard event file: records of (length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, scalars, pos = path.read_bytes(), {}, 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        event = Event.FromString(data[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def cli(*args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nnx_caption.cli", *args],
        text=True,
        capture_output=True,
        timeout=timeout,
        **kw,
    )


def train_args(setup, out: Path) -> list[str]:
    return [
        "train",
        "--output_dir",
        str(out),
        "--model_name_or_path",
        str(setup["init"]),
        "--train_file",
        setup["splits"]["train"],
        "--image_column",
        "file_name",
        "--caption_column",
        "text",
        "--do_train",
        "--max_steps",
        "24",
        "--save_steps",
        "4",
        "--per_device_train_batch_size",
        "16",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "4",
        "--max_target_length",
        "16",
        "--seed",
        "3",
    ]


def params(path: Path) -> dict[str, np.ndarray]:
    model = nc.from_pretrained(path)
    return {
        ".".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def launch(setup, out: Path, stderr=subprocess.DEVNULL, extra: tuple = ()) -> subprocess.Popen:
    """train_args' run (with `extra` flags), started in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "nnx_caption.cli", *train_args(setup, out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


def wait_for(proc: subprocess.Popen, path: Path, pattern: str | None = None) -> None:
    """Until `path` exists (or, with a pattern, something in it matches)."""
    deadline = time.time() + 240
    while not (any(path.glob(pattern)) if pattern else path.exists()):
        assert proc.poll() is None and time.time() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The CLI with `args` as `processes` processes of a jax.distributed run on localhost, each
    with `devices` CPU devices (processes=1: one process, no distributed flags). Their output
    goes to files in `logs` (pipes could fill while another process waits in a collective)."""

    def __init__(
        self, args: list[str], logs: Path, processes: int = 2, devices: int = 2, env=None
    ) -> None:
        import os

        flags = os.environ.get("XLA_FLAGS", "")
        environment = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}",
            **(env or {}),
        }
        port = str(free_port())
        distributed = lambda i: (  # noqa: E731
            ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes),
             "--process_id", str(i)] if processes > 1 else []
        )  # fmt: skip
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs = []
        for i in range(processes):
            with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
                command = [sys.executable, "-m", "nnx_caption.cli", *args, *distributed(i)]
                self.procs.append(
                    subprocess.Popen(command, stdout=out, stderr=err, env=environment)
                )

    def finish(self, timeout: float = 600) -> list[tuple[int, str, str]]:
        """(exit status, stdout, stderr) of each process, in order; none is left running."""
        try:
            for p in self.procs:
                p.wait(timeout=timeout)
        finally:
            for p in self.procs:
                p.kill()
        return [(p.returncode, *self.output(i)) for i, p in enumerate(self.procs)]

    def output(self, i: int) -> tuple[str, str]:
        return (self.logs / f"{i}.out").read_text(), (self.logs / f"{i}.err").read_text()
