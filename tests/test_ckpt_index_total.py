"""The safetensors index ``verl-mtp ckpt`` writes states the output's own size.

``metadata.total_size`` is read by no loader (vLLM's and transformers' loaders use only the weight
map), so a wrong value would pass every load: these checks compare it with the bytes of the
tensors the output's shards hold, for each writing command, with the input index's value absent,
stale, or right.
"""

import json
import os

import pytest
import torch

from verl_mtp.ckpt import extract_mtp, graft_mtp, stitch_mtp
from verl_mtp.ckpt.files import read_safetensors_header
from verl_mtp.models import detect_family
from verl_mtp.testing.tiny_hf import random_tensors, tiny_config, write_checkpoint

INDEX = "model.safetensors.index.json"


def _shard_bytes(path):
    with open(os.path.join(path, INDEX)) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    return index["metadata"]["total_size"], sum(
        e.nbytes for s in shards for e in read_safetensors_header(os.path.join(path, s)).tensors.values())


def _write(path, config, tensors, total):
    """A two-shard checkpoint whose index says ``total_size: total`` (None: no such key)."""
    write_checkpoint(str(path), config, tensors, shards=2)
    with open(os.path.join(path, INDEX)) as f:
        index = json.load(f)
    index["metadata"] = {} if total is None else {"total_size": total}
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f)
    return str(path)


def _pair(tmp_path, total, head_dtype=None):
    """(full checkpoint, another full one with a different head, the trunk alone) of tiny MiMo."""
    config = tiny_config("mimo", 1)
    naming = detect_family(config).naming(config, 1)
    a, b = random_tensors(config, seed=0), random_tensors(config, seed=1)
    b = {n: (t.to(head_dtype) if head_dtype and naming.is_mtp(n) else t) for n, t in b.items()}
    b.update({n: t for n, t in a.items() if not naming.is_mtp(n)})  # one trunk, two heads
    trunk = {n: t for n, t in a.items() if not naming.is_mtp(n)}
    bare = {k: v for k, v in config.items() if k != "num_nextn_predict_layers"}

    def stated(tensors):
        return {"right": sum(t.numel() * t.element_size() for t in tensors.values()), "stale": 7, "absent": None}[total]

    return (_write(tmp_path / "a", config, a, stated(a)), _write(tmp_path / "b", config, b, stated(b)),
            _write(tmp_path / "trunk", bare, trunk, stated(trunk)))


@pytest.mark.parametrize("total", ["right", "stale", "absent"])
def test_stitch_graft_extract_index_total_size_is_the_output_bytes(tmp_path, total):
    a, b, trunk = _pair(tmp_path, total)
    outs = {
        "stitch": stitch_mtp(a, b, str(tmp_path / "stitched")).out,
        "graft (replace)": graft_mtp(b, a, str(tmp_path / "grafted")).out,
        "graft (add)": graft_mtp(b, trunk, str(tmp_path / "added")).out,
        "extract": extract_mtp(b, str(tmp_path / "extracted")).out,
    }
    for command, out in outs.items():
        stated, held = _shard_bytes(out)
        assert stated == held, f"{command} ({total} input total_size): index says {stated}, shards hold {held}"


def test_graft_of_a_head_in_another_dtype_counts_its_own_bytes(tmp_path):
    """A bf16 head added to a float32 trunk: the added bytes are the head's, not the trunk dtype's."""
    _, b, trunk = _pair(tmp_path, "right", head_dtype=torch.bfloat16)
    stated, held = _shard_bytes(graft_mtp(b, trunk, str(tmp_path / "added")).out)
    assert stated == held
