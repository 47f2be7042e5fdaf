"""Parameters shard by the logical-axis rules; sharded logits equal single-device logits."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sharded_forward.py")


MESHES = ["8,1,1", "2,4,1", "2,2,2", "1,2,4"]


@pytest.fixture(scope="module")
def results(tiny_dir) -> dict:
    """One process for every mesh: the single-device reference is computed once."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tiny_dir), *MESHES],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_forward_equals_single_device(results, mesh):
    result = results[mesh]
    assert result["devices"] == 8
    assert result["max_diff_vs_single"] <= 1e-5
    assert result["max_abs_logit"] > 0.1
    assert result["same_generation"]
    specs = result["specs"]
    f, t = "'fsdp'", "'tensor'"  # named even where the mesh axis has size 1
    # (embed, mlp) -> (fsdp, tensor); (embed, heads, kv) -> (fsdp, tensor, None); LayerNorm
    # scales by embed; wte (vocab=336, embed) splits both ways.
    assert specs["decoder.blocks.0.mlp.fc.kernel"] == f"({f}, {t})"
    assert specs["encoder.blocks.1.attn.q.kernel"] == f"({f}, {t}, None)"
    assert specs["decoder.blocks.1.attn.qkv.kernel"] == f"({f}, None, {t}, None)"
    assert specs["decoder.ln_f.scale"] == f"({f},)"
    assert specs["decoder.wte"] == f"({t}, {f})"


def test_other_families_shard_scan_and_remat_to_the_same_logits(results):
    """DeiT + GPT-2, DeiT + TrOCR and ViT + BERT on (2, 2, 2), scanned and rematerialised."""
    f, t = "'fsdp'", "'tensor'"
    for pairing in ("deit", "deit_trocr", "vit_bert"):
        assert results[pairing]["max_diff_vs_single"] <= 1e-5, pairing
    for pairing in ("deit", "deit_trocr"):
        assert results[pairing]["specs"]["encoder.embeddings.distillation"] == f"({f},)"  # as CLS
    specs = results["deit_trocr"]["specs"]
    assert specs["decoder.blocks.1.cross.k.kernel"].startswith(f"({f}, {t}")  # (embed, heads, kv)
    assert specs["decoder.lm_head.kernel"] == f"({f}, {t})"
    assert specs["decoder.wpe"] == f"(None, {f})"
    assert results["vit_bert"]["specs"]["decoder.head_bias"] == f"({t},)"  # by vocab
