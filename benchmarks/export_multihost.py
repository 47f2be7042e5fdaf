"""The final export (`save_pretrained`, HF layout) of a model sharded across processes: time and
each process's peak memory during it, N processes against one.

    .venv/bin/python benchmarks/export_multihost.py [--preset vit_gpt2_base] [--processes 2]

ViT-B/16 + GPT-2 small by default (random weights), FSDP over every device (2 simulated CPU
devices a process, gloo collectives on localhost), so that no process holds a whole tensor:
the export all-gathers one tensor at a time and process 0 streams it into model.safetensors.
The same model on one process with as many devices is the baseline. The peak is VmHWM over
the export alone (reset through /proc/self/clear_refs before it); the resident size before
it is the baseline the peak is measured from. Results: benchmarks/results/export_multihost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "export_multihost.json"
DEVICES_PER_PROCESS = 2


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(preset: str, out: str, processes: int, index: int, port: int) -> None:
    """One process: build the sharded model, export it, print what it measured as JSON."""
    import jax

    if processes > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", processes, index)
    from nnx_caption import config as config_lib
    from nnx_caption.hf import init_model, save_pretrained
    from nnx_caption.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=jax.device_count())
    model = init_model(getattr(config_lib, preset)(), mesh=mesh)
    jax.block_until_ready(jax.tree.leaves(model))
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM from here on
        f.write("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    save_pretrained(model, out)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(json.dumps(dict(process=index, seconds=seconds, rss_mib=before / 1024,
                          peak_mib=peak / 1024, added_mib=(peak - before) / 1024)))  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(preset: str, processes: int, devices: int) -> list[dict]:
    """The export on `processes` processes of `devices` devices each."""
    port, out = free_port(), tempfile.mkdtemp()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", preset, out, str(processes), str(i), str(port)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(processes)
    ]
    results = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a worker failed with exit status {p.returncode}")
        lines = [line for line in stdout.splitlines() if line.startswith('{"process"')]  # gloo's
        results.append(json.loads(lines[-1]))  # own lines go to stdout too
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    for r in results:
        r["file_mib"] = size / 2**20
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        preset, out, processes, index, port = sys.argv[2:]
        return worker(preset, out, int(processes), int(index), int(port))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit_gpt2_base")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    from common import machine, machine_line

    n = args.processes
    one = run(args.preset, 1, DEVICES_PER_PROCESS * n)  # as many devices, one process
    many = run(args.preset, n, DEVICES_PER_PROCESS)
    result = dict(
        preset=args.preset,
        one_process=one,
        processes=many,
        machine=machine(),
        command=f"benchmarks/export_multihost.py --preset {args.preset} "
        f"--processes {args.processes}",
    )
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    print(machine_line(result["machine"]))
    print(f"{args.preset}: model.safetensors {one[0]['file_mib']:.0f} MiB")
    rows = [("1 process", one[0])] + [(f"process {r['process']} of {len(many)}", r) for r in many]
    for name, r in rows:
        print(
            f"  {name}: export {r['seconds']:.1f} s; resident {r['rss_mib']:.0f} MiB before, "
            f"peak {r['peak_mib']:.0f} MiB during it (+{r['added_mib']:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
