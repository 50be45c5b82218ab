"""`verl-mtp ckpt` inspect / extract / stitch / graft on tiny Hugging Face safetensors checkpoints
laid out with each family's real MTP weight names (DESIGN.md section 6)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from verl_mtp import cli
from verl_mtp.ckpt import (
    FAIL_AFTER_SHARDS_ENV,
    CkptError,
    extract_mtp,
    graft_mtp,
    inspect_checkpoint,
    open_checkpoint,
    stitch_mtp,
)
from verl_mtp.models import FAMILIES, UnknownFamilyError, detect_family
from verl_mtp.testing.tiny_hf import hf_tensor_shapes, tiny_config

VERL_MTP = os.path.join(os.path.dirname(sys.executable), "verl-mtp")
V = 32  # vocabulary
FAMILY_NAMES = [f.name for f in FAMILIES]
TRUNK_LAYERS = {"mimo": 2, "deepseek_v3": 2, "glm4_moe": 3, "qwen3_next": 2, "qwen3_5": 2}
DEPTH_KEY = {"mimo": "num_nextn_predict_layers", "deepseek_v3": "num_nextn_predict_layers",
             "glm4_moe": "num_nextn_predict_layers", "qwen3_next": "mtp_num_hidden_layers",
             "qwen3_5": "mtp_num_hidden_layers"}
# The tiny_hf layout each family's checkpoints are written in (Qwen3.5 as its MoE variant).
TINY = {"mimo": "mimo", "deepseek_v3": "deepseek_v3", "glm4_moe": "glm4_moe", "qwen3_next": "qwen3_next",
        "qwen3_5": "qwen3_5_moe"}


# --- tiny checkpoints -----------------------------------------------------------------------------


def is_mtp_name(family, name, trunk_layers):
    """Written out per family here (not with verl_mtp's naming), so the tests check the naming."""
    if family == "mimo":
        return name.startswith("model.mtp_layers.")
    if family in ("deepseek_v3", "glm4_moe"):
        parts = name.split(".")
        return name.startswith("model.layers.") and int(parts[2]) >= trunk_layers
    return name.startswith("mtp.")


def layout(family, hidden=16, depths=1, mtp=True, tiny=None, **config):
    """(config, {name: (shape, dtype)}, set of MTP names) for a tiny checkpoint of ``family`` in
    tiny_hf's layout of the real model (``tiny`` picks another tiny_hf variant; ``config``
    overrides config.json keys, for Qwen3.5 those of its text_config)."""
    L = config.pop("num_hidden_layers", TRUNK_LAYERS[family])
    cfg = tiny_config(tiny or TINY[family], depths, hidden_size=hidden, vocab_size=V, num_hidden_layers=L, **config)
    shapes = hf_tensor_shapes(cfg)
    if family == "qwen3_5":
        shapes["model.visual.patch_embed.proj.weight"] = (hidden, 3 * 2 * 2)
    specs = {n: (shape, torch.float32 if len(shape) == 1 else torch.bfloat16) for n, shape in shapes.items()}
    mtp_names = {n for n in specs if is_mtp_name(family, n, L)}
    if not mtp:
        specs = {n: v for n, v in specs.items() if n not in mtp_names}
        mtp_names = set()
    public = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if "text_config" in public:
        public["text_config"] = {k: v for k, v in public["text_config"].items() if not k.startswith("_")}
    return public, specs, mtp_names


def make_tensors(specs, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(shape, generator=gen).to(dtype) for n, (shape, dtype) in sorted(specs.items())}


def write_ckpt(path, config, tensors, mtp_names, shards=3, spread_mtp=False, drop=()):
    """Trunk tensors round-robin over the first shards-1 files, MTP tensors in the last one (with
    ``spread_mtp`` the first half of them in the one before; without MTP tensors the trunk uses
    every file). ``drop``: names left out."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write('{"tiny": true}')
    tensors = {n: t for n, t in tensors.items() if n not in drop}
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return str(path)
    files = [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    mtp_sorted = sorted(n for n in tensors if n in mtp_names)
    trunk = [n for n in tensors if n not in mtp_names]
    trunk_files = len(files) - 1 if mtp_sorted else len(files)
    where = {n: files[j % trunk_files] for j, n in enumerate(trunk)}
    for j, n in enumerate(mtp_sorted):
        where[n] = files[-2] if spread_mtp and j < len(mtp_sorted) // 2 else files[-1]
    for file in files:
        part = {n: tensors[n] for n in tensors if where[n] == file}
        save_file(part, os.path.join(path, file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict(sorted(where.items()))}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return str(path)


def build(tmp_path, name, family, seed=0, **kw):
    """Write a checkpoint; returns (path, tensors, mtp_names). ``drop``: names left out;
    ``reshape`` / ``add``: {name: shape} changed or added (MTP names); ``mtp_dtype``: the head's dtype."""
    shards = kw.pop("shards", 3)
    spread = kw.pop("spread_mtp", False)
    drop = kw.pop("drop", ())
    config_edit = kw.pop("config_edit", None)
    reshape = kw.pop("reshape", {})
    add = kw.pop("add", {})
    mtp_dtype = kw.pop("mtp_dtype", None)
    config, specs, mtp_names = layout(family, **kw)
    if config_edit:
        config_edit(config)
    for n, shape in reshape.items():
        assert n in specs, n
        specs[n] = (shape, specs[n][1])
    for n, shape in add.items():
        specs[n] = (shape, torch.float32 if len(shape) <= 1 else torch.bfloat16)
        mtp_names = mtp_names | {n}
    if mtp_dtype is not None:
        specs = {n: (shape, mtp_dtype if n in mtp_names else dt) for n, (shape, dt) in specs.items()}
    tensors = make_tensors(specs, seed)
    path = write_ckpt(tmp_path / name, config, tensors, mtp_names, shards=shards, spread_mtp=spread, drop=drop)
    return path, {n: t for n, t in tensors.items() if n not in drop}, mtp_names - set(drop)


def load_all(path):
    """Every tensor of a checkpoint dir, read with safetensors' own reader."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
            weight_map = {n: "model.safetensors" for n in f.keys()}
    out = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            for n in f.keys():
                if weight_map.get(n) == shard:
                    out[n] = f.get_tensor(n)
    return out


def bits(t):
    return t.dtype, tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).tolist()


def same_bits(a, b):
    return bits(a) == bits(b)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_cli(capsys, *args):
    code = cli.main(["ckpt", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- naming --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_naming_classifies_exactly_the_mtp_tensors(family):
    config, specs, mtp_names = layout(family, depths=2)
    assert detect_family(config).name == family
    naming = detect_family(config).naming(config, 2, specs)
    assert {n for n in specs if naming.is_mtp(n)} == mtp_names
    for n in mtp_names:
        assert naming.name(naming.key(n)) == n
    assert sorted(n for n in specs if naming.is_drafter_shared(n)) == sorted(
        n for n in specs if n.endswith(("embed_tokens.weight", "lm_head.weight")) and n not in mtp_names
    )
    depth1 = naming.names_of_depth(specs, 1)
    assert depth1 and all(naming.depth_of(n) == 1 for n in depth1)


def test_qwen_mtp_prefix_matches_at_any_position():
    config, _, _ = layout("qwen3_5")
    names = ["model.language_model.mtp.fc.weight", "model.language_model.mtp.layers.0.self_attn.q_proj.weight",
             "model.language_model.layers.0.self_attn.q_proj.weight", "model.mtp_layers.0.x.weight"]
    naming = detect_family(config).naming(config, 1, names)
    assert naming.key(names[0]) == (None, "fc.weight")
    assert naming.key(names[1]) == (0, "self_attn.q_proj.weight")
    assert naming.key(names[2]) is None and naming.key(names[3]) is None
    assert naming.name((None, "norm.weight")) == "model.language_model.mtp.norm.weight"


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(UnknownFamilyError) as err:
        detect_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    for family in FAMILIES:
        assert family.title in str(err.value)
    assert "'llama'" in str(err.value)


# --- inspect -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_inspect_complete(tmp_path, family):
    path, tensors, mtp_names = build(tmp_path, "ckpt", family, depths=2)
    report = inspect_checkpoint(path)
    assert report.complete, (report.missing, report.unexpected)
    assert report.family == family and report.depths == 2
    listed = {row["name"] for rows in report.groups.values() for row in rows}
    assert listed == mtp_names
    assert report.mtp_bytes == sum(tensors[n].numel() * tensors[n].element_size() for n in mtp_names)
    assert set(report.groups) >= {"0", "1"}
    assert ("shared" in report.groups) == family.startswith("qwen")
    assert report.depth_key == ("text_config." if family == "qwen3_5" else "") + DEPTH_KEY[family]


def test_inspect_single_file_and_cli_json(tmp_path, capsys):
    path, _, mtp_names = build(tmp_path, "single", "mimo", shards=1)
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["complete"] and report["shards"] == ["model.safetensors"]
    assert {r["name"] for r in report["groups"]["0"]} == mtp_names
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "complete     yes" in out and "model.mtp_layers.0.mlp.gate_proj.weight" in out
    glm, _, _ = build(tmp_path, "glm", "glm4_moe", shards=1)
    code, out, _ = run_cli(capsys, "inspect", glm)
    assert code == 0 and "model.layers.3.mlp.experts.{0..3}.gate_proj.weight  [16, 16] BF16  x4" in out


def test_inspect_deleted_mtp_tensor_console_script(tmp_path):
    path, _, _ = build(tmp_path, "ckpt", "deepseek_v3", drop=("model.layers.2.hnorm.weight",))
    report = inspect_checkpoint(path)
    assert not report.complete and report.missing == ["model.layers.2.hnorm.weight"]
    proc = subprocess.run([VERL_MTP, "ckpt", "inspect", path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "missing     model.layers.2.hnorm.weight" in proc.stdout
    assert "complete     NO" in proc.stdout


def test_inspect_tensors_beyond_declared_depths(tmp_path):
    path, _, _ = build(tmp_path, "ckpt", "mimo", depths=2, config_edit=lambda c: c.update(num_nextn_predict_layers=1))
    report = inspect_checkpoint(path)
    assert not report.complete and not report.missing
    assert report.unexpected and all(n.startswith("model.mtp_layers.1.") for n in report.unexpected)


def test_inspect_qwen_missing_layer_and_norm(tmp_path):
    _, specs, _ = layout("qwen3_next")
    drop = tuple(n for n in specs if n.startswith("mtp.layers.0.")) + ("mtp.norm.weight",)
    path, _, _ = build(tmp_path, "ckpt", "qwen3_next", drop=drop)
    assert inspect_checkpoint(path).missing == ["mtp.norm.weight", "mtp.layers.0.*"]


def test_inspect_unreadable_inputs_exit_2(tmp_path, capsys):
    path, _, _ = build(tmp_path, "ckpt", "glm4_moe")
    os.remove(os.path.join(path, "model-00002-of-00003.safetensors"))
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 2 and "model-00002-of-00003.safetensors" in err and "missing" in err

    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    path, _, _ = build(tmp_path, "llama", "mimo", config_edit=lambda c: c.update(llama))
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 2 and "unknown model family" in err and "DeepSeek-V3" in err and "Qwen3.5" in err

    os.makedirs(tmp_path / "empty")
    code, _, err = run_cli(capsys, "inspect", tmp_path / "empty")
    assert code == 2 and "no config.json" in err


# --- extract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_extract_is_bit_exact(tmp_path, family):
    src, tensors, mtp_names = build(tmp_path, "src", family, depths=2, spread_mtp=True)
    out = str(tmp_path / "head")
    result = extract_mtp(src, out, max_shard_bytes=4096)
    assert len(result.shards_new) > 1
    got = load_all(out)
    shared = {n for n in tensors if n.endswith(("embed_tokens.weight", "lm_head.weight")) and n not in mtp_names}
    assert set(got) == mtp_names | shared
    for n, t in got.items():
        assert same_bits(t, tensors[n]), n
    with open(os.path.join(src, "config.json"), "rb") as a, open(os.path.join(out, "config.json"), "rb") as b:
        assert a.read() == b.read()
    with open(os.path.join(out, "mtp_extract.json")) as f:
        info = json.load(f)
    assert info["family"] == family and info["depths"] == 2 and info["source"] == os.path.abspath(src)
    assert inspect_checkpoint(out).complete
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_extract_refuses_incomplete_head(tmp_path):
    src, _, _ = build(tmp_path, "src", "mimo", drop=("model.mtp_layers.0.input_proj.weight",))
    with pytest.raises(CkptError, match="model.mtp_layers.0.input_proj.weight"):
        extract_mtp(src, str(tmp_path / "head"))
    assert not os.path.exists(tmp_path / "head")


# --- stitch --------------------------------------------------------------------------------------


def check_stitched(out, verifier, v_tensors, donor_tensors, mtp_names, rewritten):
    got = load_all(out)
    assert set(got) == set(v_tensors)
    for n, t in got.items():
        assert same_bits(t, donor_tensors[n] if n in mtp_names else v_tensors[n]), n
    with open(os.path.join(verifier, "model.safetensors.index.json")) as f:
        v_index = json.load(f)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        o_index = json.load(f)
    assert o_index == v_index
    for shard in set(v_index["weight_map"].values()):
        identical = sha(os.path.join(out, shard)) == sha(os.path.join(verifier, shard))
        assert identical == (shard not in rewritten), shard
    assert sha(os.path.join(out, "tokenizer.json")) == sha(os.path.join(verifier, "tokenizer.json"))
    assert sha(os.path.join(out, "config.json")) == sha(os.path.join(verifier, "config.json"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stitch_replaces_exactly_the_mtp_tensors(tmp_path, family):
    spread = family in ("deepseek_v3", "qwen3_5")
    verifier, v_tensors, mtp_names = build(tmp_path, "verifier", family, seed=1, spread_mtp=spread)
    donor, d_tensors, _ = build(tmp_path, "donor", family, seed=2, spread_mtp=not spread, shards=2)
    out = str(tmp_path / "out")
    result = stitch_mtp(verifier, donor, out)
    rewritten = {"model-00003-of-00003.safetensors"} | ({"model-00002-of-00003.safetensors"} if spread else set())
    assert set(result.shards_rewritten) == rewritten
    assert set(result.tensors_replaced) == mtp_names
    check_stitched(out, verifier, v_tensors, d_tensors, mtp_names, rewritten)
    assert inspect_checkpoint(out).complete


def test_stitch_from_extract_output_and_single_file(tmp_path):
    verifier, v_tensors, mtp_names = build(tmp_path, "verifier", "glm4_moe", seed=1)
    donor, d_tensors, _ = build(tmp_path, "donor", "glm4_moe", seed=2, shards=1)
    extract_mtp(donor, str(tmp_path / "donor_head"))
    out = str(tmp_path / "out")
    stitch_mtp(verifier, str(tmp_path / "donor_head"), out)
    check_stitched(out, verifier, v_tensors, d_tensors, mtp_names, {"model-00003-of-00003.safetensors"})

    # A single-file verifier stays single-file.
    out2 = str(tmp_path / "out2")
    result = stitch_mtp(donor, verifier, out2)
    assert result.shards_rewritten == ["model.safetensors"]
    assert not os.path.exists(os.path.join(out2, "model.safetensors.index.json"))
    got = load_all(out2)
    for n, t in got.items():
        assert same_bits(t, v_tensors[n] if n in mtp_names else d_tensors[n]), n


def test_stitch_refuses_shape_mismatch_and_wrong_family(tmp_path, capsys):
    verifier, _, _ = build(tmp_path, "verifier", "deepseek_v3", seed=1)
    # A donor complete for its own config.json, whose experts do not fit VERIFIER's.
    donor, _, _ = build(tmp_path, "donor", "deepseek_v3", seed=2, moe_intermediate_size=20)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "stitch", verifier, donor, out)
    assert code == 2 and "refusing to stitch" in err and "for VERIFIER's config.json" in err
    assert "misshapen model.layers.2.mlp.experts.{0..3}.gate_proj.weight [20, 16], expected [16, 16]" in err
    # Same shapes, another dtype: the pairwise comparison.
    donor32, _, _ = build(tmp_path, "donor32", "deepseek_v3", seed=2, mtp_dtype=torch.float32)
    code, _, err = run_cli(capsys, "stitch", verifier, donor32, out)
    assert code == 2 and "the MTP tensors of VERIFIER and DONOR differ" in err
    assert "model.layers.2.mlp.experts.0.gate_proj.weight: VERIFIER [16, 16] BF16 vs DONOR [16, 16] F32" in err
    glm, _, _ = build(tmp_path, "glm", "glm4_moe", seed=2)
    with pytest.raises(CkptError, match="VERIFIER is DeepSeek-V3 .* but DONOR is GLM-4.5"):
        stitch_mtp(verifier, glm, str(out))
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_stitch_out_exists_overwrite_and_link(tmp_path, capsys):
    verifier, v_tensors, mtp_names = build(tmp_path, "verifier", "mimo", seed=1)
    donor, d_tensors, _ = build(tmp_path, "donor", "mimo", seed=2)
    out = tmp_path / "out"
    os.makedirs(out)
    code, _, err = run_cli(capsys, "stitch", verifier, donor, out)
    assert code == 2 and "already exists" in err
    code, text, _ = run_cli(capsys, "stitch", verifier, donor, out, "--overwrite", "--link", "--json")
    assert code == 0
    result = json.loads(text)
    assert result["shards_linked"] == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"]
    shard = "model-00001-of-00003.safetensors"
    assert os.path.samefile(out / shard, os.path.join(verifier, shard))
    check_stitched(str(out), verifier, v_tensors, d_tensors, mtp_names, {"model-00003-of-00003.safetensors"})
    code, _, err = run_cli(capsys, "stitch", verifier, donor, verifier, "--overwrite")
    assert code == 2 and "is the VERIFIER checkpoint itself" in err


def test_failed_stitch_leaves_no_output(tmp_path, monkeypatch):
    verifier, _, _ = build(tmp_path, "verifier", "qwen3_next", seed=1, spread_mtp=True)
    donor, _, _ = build(tmp_path, "donor", "qwen3_next", seed=2)
    monkeypatch.setenv(FAIL_AFTER_SHARDS_ENV, "2")
    with pytest.raises(RuntimeError, match="simulated failure"):
        stitch_mtp(verifier, donor, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_killed_stitch_leaves_no_output_and_next_run_cleans_up(tmp_path):
    verifier, v_tensors, mtp_names = build(tmp_path, "verifier", "deepseek_v3", seed=1, spread_mtp=True)
    donor, d_tensors, _ = build(tmp_path, "donor", "deepseek_v3", seed=2)
    out = str(tmp_path / "out")
    env = dict(os.environ, **{FAIL_AFTER_SHARDS_ENV: "2:kill"})
    proc = subprocess.run(
        [VERL_MTP, "ckpt", "stitch", verifier, donor, out], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    assert not os.path.exists(out)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith("out.tmp-")]
    assert len(leftovers) == 1  # SIGKILL gives no chance to clean up ...
    stitch_mtp(verifier, donor, out)  # ... the next run for the same OUT removes it
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    check_stitched(out, verifier, v_tensors, d_tensors, mtp_names,
                   {"model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"})


# --- graft ---------------------------------------------------------------------------------------


def _drop_depth_key(config):
    target = config.get("text_config", config)
    for key in ("num_nextn_predict_layers", "mtp_num_hidden_layers"):
        target.pop(key, None)


@pytest.mark.parametrize(
    "family,shards", [("deepseek_v3", 3), ("qwen3_5", 2), ("mimo", 1), ("qwen3_next", 3), ("glm4_moe", 2)]
)
def test_graft_into_checkpoint_that_dropped_the_head(tmp_path, family, shards):
    base, b_tensors, mtp_names = build(tmp_path, "base", family, seed=1, depths=2)
    rl, r_tensors, _ = build(tmp_path, "rl", family, seed=2, mtp=False, shards=shards, config_edit=_drop_depth_key)
    assert inspect_checkpoint(rl).depths == 0
    out = str(tmp_path / "out")
    result = graft_mtp(base, rl, out)
    assert set(result.tensors_added) == mtp_names and not result.tensors_replaced and result.config_changed
    report = inspect_checkpoint(out)
    assert report.complete and report.depths == 2
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    declared = config["text_config"] if family == "qwen3_5" else config
    assert declared[DEPTH_KEY[family]] == 2
    got = load_all(out)
    assert set(got) == set(r_tensors) | mtp_names
    for n, t in got.items():
        assert same_bits(t, b_tensors[n] if n in mtp_names else r_tensors[n]), n
    if shards == 1:
        assert result.shards_new == ["model-00002-of-00002.safetensors"]
        assert sha(os.path.join(out, "model-00001-of-00002.safetensors")) == sha(os.path.join(rl, "model.safetensors"))
        assert not os.path.exists(os.path.join(out, "model.safetensors"))
    else:
        assert result.shards_new == ["model-mtp.safetensors"] and not result.shards_rewritten
        for k in range(1, shards + 1):
            shard = f"model-{k:05d}-of-{shards:05d}.safetensors"
            assert sha(os.path.join(out, shard)) == sha(os.path.join(rl, shard))
    # The grafted checkpoint is a valid stitch target.
    stitch_mtp(out, base, str(tmp_path / "restitched"))


def test_graft_replaces_an_untrained_head(tmp_path, capsys):
    base, b_tensors, mtp_names = build(tmp_path, "base", "qwen3_5", seed=1)
    rl, r_tensors, _ = build(tmp_path, "rl", "qwen3_5", seed=2)
    out = tmp_path / "out"
    code, text, err = run_cli(capsys, "graft", base, rl, out)
    assert code == 0, err
    assert "replaced     " in text
    got = load_all(str(out))
    assert set(got) == set(r_tensors)
    for n, t in got.items():
        assert same_bits(t, b_tensors[n] if n in mtp_names else r_tensors[n]), n
    for shard in ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"):
        assert sha(out / shard) == sha(os.path.join(rl, shard))


def test_graft_refuses_hidden_size_mismatch(tmp_path, capsys):
    base, _, _ = build(tmp_path, "base", "mimo", seed=1, hidden=16)
    rl, _, _ = build(tmp_path, "rl", "mimo", seed=2, hidden=24, mtp=False)
    code, _, err = run_cli(capsys, "graft", base, rl, tmp_path / "out")
    assert code == 2 and "refusing to graft" in err
    assert "hidden size / vocabulary differ: BASE model.embed_tokens.weight [32, 16] vs RL" in err
    assert "RL model.embed_tokens.weight [32, 24]" in err
    assert "for RL's config.json: misshapen model.mtp_layers.0.input_proj.weight [16, 32], expected [24, 48]" in err
    assert not os.path.exists(tmp_path / "out")
    other, _, _ = build(tmp_path, "other", "glm4_moe", seed=2)
    with pytest.raises(CkptError, match="expected the same family"):
        graft_mtp(base, other, str(tmp_path / "out"))


def test_open_checkpoint_reports_index_holes(tmp_path):
    path, _, _ = build(tmp_path, "ckpt", "mimo")
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["weight_map"]["model.mtp_layers.0.ghost.weight"] = "model-00003-of-00003.safetensors"
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(CkptError, match="model.mtp_layers.0.ghost.weight"):
        open_checkpoint(path)


def test_graft_into_a_partial_head_replaces_and_adds(tmp_path):
    base, b_tensors, mtp_names = build(tmp_path, "base", "deepseek_v3", seed=1, depths=2)
    _, specs, _ = layout("deepseek_v3", depths=2)
    depth1 = tuple(n for n in specs if n.startswith("model.layers.3."))
    rl, r_tensors, rl_mtp = build(tmp_path, "rl", "deepseek_v3", seed=2, depths=2, drop=depth1,
                                  config_edit=lambda c: c.update(num_nextn_predict_layers=1))
    out = str(tmp_path / "out")
    result = graft_mtp(base, rl, out)
    assert set(result.tensors_replaced) == rl_mtp and set(result.tensors_added) == set(depth1)
    assert result.shards_rewritten == ["model-00003-of-00003.safetensors"]
    assert result.shards_new == ["model-mtp.safetensors"] and result.config_changed
    report = inspect_checkpoint(out)
    assert report.complete and report.depths == 2
    got = load_all(out)
    assert set(got) == set(r_tensors) | mtp_names
    for n, t in got.items():
        assert same_bits(t, b_tensors[n] if n in mtp_names else r_tensors[n]), n


# --- the whole head: every tensor and shape config.json calls for --------------------------------

# (family, tiny_hf variant, MTP tensor of depth 0 left out, what it is); "mtp." names are the
# shared Qwen tensors, the rest is below the depth's own prefix.
MISSING_CASES = [
    ("mimo", None, "self_attn.q_proj.weight", "attention"),
    ("mimo", None, "self_attn.k_proj.bias", "attention bias"),
    ("mimo", None, "mlp.up_proj.weight", "MLP"),
    ("mimo", None, "post_attention_layernorm.weight", "norm"),
    ("mimo", None, "token_layernorm.weight", "fusion norm"),
    ("mimo", None, "input_proj.weight", "projection"),
    ("deepseek_v3", None, "self_attn.kv_b_proj.weight", "MLA attention"),
    ("deepseek_v3", None, "self_attn.q_a_layernorm.weight", "MLA norm"),
    ("deepseek_v3", None, "mlp.experts.1.down_proj.weight", "routed expert"),
    ("deepseek_v3", None, "mlp.shared_experts.up_proj.weight", "shared expert"),
    ("deepseek_v3", None, "mlp.gate.e_score_correction_bias", "router bias"),
    ("deepseek_v3", None, "hnorm.weight", "fusion norm"),
    ("deepseek_v3", None, "eh_proj.weight", "projection"),
    ("deepseek_v3", None, "shared_head.head.weight", "shared head"),
    ("deepseek_v3", None, "embed_tokens.weight", "embedding copy"),
    ("glm4_moe", None, "self_attn.v_proj.bias", "attention bias"),
    ("glm4_moe", None, "mlp.experts.3.gate_proj.weight", "routed expert"),
    ("glm4_moe", None, "mlp.gate.weight", "router"),
    ("glm4_moe", None, "input_layernorm.weight", "norm"),
    ("glm4_moe", None, "shared_head.norm.weight", "shared head norm"),
    ("glm4_moe", None, "eh_proj.weight", "projection"),
    ("qwen3_next", None, "self_attn.q_norm.weight", "attention norm"),
    ("qwen3_next", None, "mlp.experts.0.up_proj.weight", "routed expert"),
    ("qwen3_next", None, "mlp.shared_expert_gate.weight", "shared expert gate"),
    ("qwen3_next", None, "post_attention_layernorm.weight", "norm"),
    ("qwen3_next", None, "mtp.pre_fc_norm_hidden.weight", "fusion norm"),
    ("qwen3_next", None, "mtp.fc.weight", "projection"),
    ("qwen3_5", None, "self_attn.o_proj.weight", "attention"),
    ("qwen3_5", None, "mlp.shared_expert.down_proj.weight", "shared expert"),
    ("qwen3_5", None, "mlp.experts.2.down_proj.weight", "routed expert"),
    ("qwen3_5", None, "mtp.norm.weight", "final norm"),
    ("qwen3_5", None, "mtp.fc.weight", "projection"),
    ("qwen3_5", "qwen3_5", "mlp.down_proj.weight", "dense MLP"),
    ("qwen3_5", "qwen3_5", "self_attn.k_proj.weight", "attention"),
]


def depth0_name(family, rest, trunk_layers=None):
    L = TRUNK_LAYERS[family] if trunk_layers is None else trunk_layers
    if rest.startswith("mtp."):
        return rest
    return {"mimo": f"model.mtp_layers.0.{rest}", "deepseek_v3": f"model.layers.{L}.{rest}",
            "glm4_moe": f"model.layers.{L}.{rest}"}.get(family, f"mtp.layers.0.{rest}")


def assert_refused(capsys, tmp_path, family, broken, tiny, entry):
    """stitch and graft (API and CLI) refuse ``broken``'s head, naming ``entry``; the flag lets graft
    through and carries the head as it is."""
    verifier, _, _ = build(tmp_path, "verifier", family, seed=3, tiny=tiny)
    rl, r_tensors, _ = build(tmp_path, "rl", family, seed=4, tiny=tiny, mtp=False, shards=2)
    for command, args in (("stitch", (verifier, broken)), ("graft", (broken, rl))):
        code, _, err = run_cli(capsys, command, *args, tmp_path / "out")
        assert code == 2, (command, err)
        assert f"refusing to {command}" in err and entry in err and "--allow-incomplete-head" in err, err
        assert not os.path.exists(tmp_path / "out")
    with pytest.raises(CkptError, match="refusing to graft"):
        graft_mtp(broken, rl, str(tmp_path / "out"))
    code, text, err = run_cli(capsys, "graft", broken, rl, tmp_path / "out", "--allow-incomplete-head", "--json")
    assert code == 0, err
    result = json.loads(text)
    assert any("carried as it is" in note and entry in note for note in result["notes"]), result["notes"]
    got = load_all(str(tmp_path / "out"))
    broken_tensors = load_all(broken)
    for n, t in broken_tensors.items():
        if n not in r_tensors:
            assert same_bits(got[n], t), n
    assert not inspect_checkpoint(str(tmp_path / "out")).complete


@pytest.mark.parametrize("family,tiny,rest,kind", MISSING_CASES, ids=[f"{c[0]}{'-' + c[1] if c[1] else ''}-{c[3]}" for c in MISSING_CASES])
def test_head_missing_a_tensor_is_reported_and_refused(tmp_path, capsys, family, tiny, rest, kind):
    name = depth0_name(family, rest)
    path, _, _ = build(tmp_path, "broken", family, tiny=tiny, drop=(name,))
    report = inspect_checkpoint(path)
    assert not report.complete and report.missing == [name], (kind, report.missing)
    assert not report.misshapen and not report.unexpected
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 1 and "complete     NO" in out and f"missing     {name}" in out
    assert_refused(capsys, tmp_path, family, path, tiny, f"missing {name}")


# (family, MTP tensor of depth 0, wrong shape, the shape config.json calls for)
MISSHAPEN_CASES = [
    ("mimo", "input_proj.weight", (16, 16), (16, 32)),
    ("mimo", "self_attn.q_proj.bias", (8,), (16,)),
    ("deepseek_v3", "self_attn.q_b_proj.weight", (32, 16), (48, 16)),
    ("deepseek_v3", "mlp.experts.0.gate_proj.weight", (24, 16), (16, 16)),
    ("deepseek_v3", "shared_head.head.weight", (40, 16), (32, 16)),
    ("glm4_moe", "self_attn.k_proj.weight", (32, 16), (16, 16)),
    ("glm4_moe", "mlp.gate.e_score_correction_bias", (3,), (4,)),
    ("qwen3_next", "self_attn.q_proj.weight", (32, 16), (64, 16)),
    ("qwen3_next", "mtp.fc.weight", (16, 16), (16, 32)),
    ("qwen3_5", "mlp.shared_expert.gate_proj.weight", (8, 16), (16, 16)),
    ("qwen3_5", "mtp.pre_fc_norm_embedding.weight", (8,), (16,)),
]


@pytest.mark.parametrize("family,rest,wrong,right", MISSHAPEN_CASES, ids=[f"{c[0]}-{c[1]}" for c in MISSHAPEN_CASES])
def test_misshapen_head_tensor_is_reported_and_refused(tmp_path, capsys, family, rest, wrong, right):
    name = depth0_name(family, rest)
    path, _, _ = build(tmp_path, "broken", family, reshape={name: wrong})
    report = inspect_checkpoint(path)
    entry = f"{name} {list(wrong)}, expected {list(right)}"
    assert not report.complete and report.misshapen == [entry] and not report.missing
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 1 and f"misshapen   {entry}" in out
    assert_refused(capsys, tmp_path, family, path, None, f"misshapen {entry}")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unexpected_tensor_in_a_depth_is_reported(tmp_path, capsys, family):
    name = depth0_name(family, "self_attn.rogue_proj.weight")
    path, _, _ = build(tmp_path, "broken", family, add={name: (16, 16)})
    report = inspect_checkpoint(path)
    assert not report.complete and report.unexpected == [name] and not report.missing
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 1 and f"unexpected  {name} (not part of a" in out
    with pytest.raises(CkptError, match=f"unexpected {name}"):
        extract_mtp(path, str(tmp_path / "head"))
    extract_mtp(path, str(tmp_path / "head"), allow_incomplete_head=True)
    assert name in load_all(str(tmp_path / "head"))


@pytest.mark.parametrize("family,tiny,extra", [
    ("mimo", None, {}),
    ("deepseek_v3", None, {}),
    ("deepseek_v3", None, {"q_lora_rank": None}),
    ("glm4_moe", None, {}),
    ("glm4_moe", None, {"use_qk_norm": True, "attention_bias": False, "_mtp_trunk_copies": True}),
    ("qwen3_next", None, {}),
    ("qwen3_next", None, {"decoder_sparse_step": 2}),
    ("qwen3_5", None, {}),
    ("qwen3_5", None, {"_fused_experts": True}),
    ("qwen3_5", "qwen3_5", {}),
])
def test_complete_head_of_every_layout_is_complete(tmp_path, capsys, family, tiny, extra):
    path, _, mtp_names = build(tmp_path, "ckpt", family, tiny=tiny, depths=2, **extra)
    report = inspect_checkpoint(path)
    assert report.complete, (report.missing, report.misshapen, report.unexpected, report.config_problems)
    assert {row["name"] for rows in report.groups.values() for row in rows} == mtp_names
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "complete     yes: every declared depth has every tensor" in out
    extract_mtp(path, str(tmp_path / "head"))
    stitch_mtp(path, str(tmp_path / "head"), str(tmp_path / "out"))


def test_qwen_fused_and_per_expert_layouts_do_not_mix(tmp_path):
    config, specs, _ = layout("qwen3_5", _fused_experts=True)
    fused = {n: shape for n, (shape, _) in specs.items() if n.startswith("mtp.layers.0.mlp.experts.")}
    assert set(fused) == {"mtp.layers.0.mlp.experts.gate_up_proj", "mtp.layers.0.mlp.experts.down_proj"}
    # Fused experts plus one leftover per-expert tensor: the leftover is unexpected.
    path, _, _ = build(tmp_path, "mixed", "qwen3_5", _fused_experts=True,
                       add={"mtp.layers.0.mlp.experts.0.up_proj.weight": (16, 16)})
    report = inspect_checkpoint(path)
    assert report.unexpected == ["mtp.layers.0.mlp.experts.0.up_proj.weight"] and not report.missing
    path, _, _ = build(tmp_path, "wrong", "qwen3_5", _fused_experts=True,
                       reshape={"mtp.layers.0.mlp.experts.down_proj": (4, 16, 8)})
    assert inspect_checkpoint(path).misshapen == ["mtp.layers.0.mlp.experts.down_proj [4, 16, 8], expected [4, 16, 16]"]


def test_glm_trunk_copies_are_optional_but_checked(tmp_path):
    path, _, mtp_names = build(tmp_path, "without", "glm4_moe")
    assert inspect_checkpoint(path).complete and not any("shared_head.head" in n for n in mtp_names)
    path, _, _ = build(tmp_path, "wrong", "glm4_moe", _mtp_trunk_copies=True,
                       reshape={"model.layers.3.shared_head.head.weight": (31, 16)})
    assert inspect_checkpoint(path).misshapen == ["model.layers.3.shared_head.head.weight [31, 16], expected [32, 16]"]


def test_deepseek_layer_61_with_8_of_its_32_tensors(tmp_path, capsys):
    """The issue's case: a real trunk depth (61 layers), an MTP layer holding only 8 tensors."""
    config, specs, mtp_names = layout("deepseek_v3", num_hidden_layers=61)
    assert len(mtp_names) == 32 and all(n.startswith("model.layers.61.") for n in mtp_names)
    # What the old core-name check needed and more: the fusion tensors, the copies, the layer norms.
    kept = [f"model.layers.61.{rest}" for rest in (
        "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
        "embed_tokens.weight", "input_layernorm.weight", "post_attention_layernorm.weight")]
    assert set(kept) <= mtp_names
    tensors = make_tensors({n: v for n, v in specs.items() if n not in mtp_names or n in kept}, 0)
    path = write_ckpt(tmp_path / "ckpt", config, tensors, set(kept), shards=2)
    report = inspect_checkpoint(path)
    assert not report.complete and len(report.missing) == 24
    assert sorted(report.missing + kept) == sorted(mtp_names)
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 1 and "missing     model.layers.61.mlp.experts.{0..3}.down_proj.weight" in out
    assert "missing     model.layers.61.self_attn.kv_b_proj.weight" in out
    assert "missing     model.layers.61.mlp.gate.e_score_correction_bias" in out


def test_fp8_scale_tensors_are_accepted_and_checked(tmp_path):
    """DeepSeek-V3's released FP8 layout: a ``weight_scale_inv`` per quantized linear weight,
    ceil(out / 128) x ceil(in / 128) blocks; eh_proj, norms and the router stay unquantized."""
    def fp8(config):
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [8, 8]}

    scales = {"model.layers.2.self_attn.q_b_proj.weight_scale_inv": (6, 2),
              "model.layers.2.mlp.experts.0.down_proj.weight_scale_inv": (2, 2)}
    path, _, _ = build(tmp_path, "fp8", "deepseek_v3", config_edit=fp8, add=scales)
    report = inspect_checkpoint(path)
    assert report.complete, (report.missing, report.misshapen, report.unexpected)
    bad = dict(scales, **{"model.layers.2.self_attn.o_proj.weight_scale_inv": (3, 3)})
    path, _, _ = build(tmp_path, "bad", "deepseek_v3", config_edit=fp8, add=bad)
    assert inspect_checkpoint(path).misshapen == [
        "model.layers.2.self_attn.o_proj.weight_scale_inv [3, 3], expected [2, 4] (weight [16, 32] in blocks of [8, 8])"
    ]
    # Without a quantization_config a scale tensor is not part of the head.
    path, _, _ = build(tmp_path, "plain", "deepseek_v3", add=scales)
    assert sorted(inspect_checkpoint(path).unexpected) == sorted(scales)


def test_config_without_the_sizes_the_head_needs(tmp_path, capsys):
    path, _, _ = build(tmp_path, "ckpt", "glm4_moe", config_edit=lambda c: c.pop("num_key_value_heads"))
    report = inspect_checkpoint(path)
    assert not report.complete and not report.misshapen
    assert report.config_problems == [
        "config.json has no num_key_value_heads, which the GLM-4.5 MTP layer's shapes need"
    ]
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 1 and "config      config.json has no num_key_value_heads" in out
    code, _, err = run_cli(capsys, "graft", path, path, tmp_path / "out")
    assert code == 2 and "num_key_value_heads" in err


# --- a stale model.safetensors.index.json next to model.safetensors -------------------------------


def _add_index(path, weight_map):
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_single_file_with_a_stale_index_is_refused(tmp_path, capsys):
    path, tensors, _ = build(tmp_path, "single", "mimo", shards=1)
    # An index left from an older sharded save: its shards are gone.
    _add_index(path, {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(sorted(tensors))})
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 2
    assert "both model.safetensors and model.safetensors.index.json" in err
    assert "model-00001-of-00002.safetensors" in err and "2 of them missing" in err
    assert "remove the stale one" in err
    with pytest.raises(CkptError, match="both model.safetensors and model.safetensors.index.json"):
        graft_mtp(path, path, str(tmp_path / "out"))


def test_sharded_checkpoint_with_a_stray_single_file_is_refused(tmp_path):
    path, tensors, _ = build(tmp_path, "sharded", "glm4_moe", shards=2)
    save_file({"x": torch.zeros(1)}, os.path.join(path, "model.safetensors"))
    with pytest.raises(CkptError, match=r"both model\.safetensors and model\.safetensors\.index\.json.*"
                                        r"model-00001-of-00002\.safetensors.*not to model\.safetensors"):
        open_checkpoint(path)


def test_index_that_names_the_single_file_is_consistent(tmp_path):
    path, tensors, _ = build(tmp_path, "single", "qwen3_next", shards=1)
    _add_index(path, {n: "model.safetensors" for n in tensors})
    report = inspect_checkpoint(path)
    assert report.complete and report.shards == ["model.safetensors"]


def test_stitch_carries_an_incomplete_head_only_with_the_flag(tmp_path, capsys):
    """VERIFIER and DONOR lack the same tensor: the pairwise comparison passes, the head check does not."""
    name = depth0_name("mimo", "self_attn.q_proj.weight")
    verifier, v_tensors, mtp_names = build(tmp_path, "verifier", "mimo", seed=1, drop=(name,))
    donor, d_tensors, _ = build(tmp_path, "donor", "mimo", seed=2, drop=(name,))
    code, _, err = run_cli(capsys, "stitch", verifier, donor, tmp_path / "out")
    assert code == 2 and f"refusing to stitch: DONOR {donor} has no complete" in err and f"missing {name}" in err
    code, text, err = run_cli(capsys, "stitch", verifier, donor, tmp_path / "out", "--allow-incomplete-head")
    assert code == 0, err
    assert f"--allow-incomplete-head: DONOR's MTP head was carried as it is, with problems: missing {name}" in text
    check_stitched(str(tmp_path / "out"), verifier, v_tensors, d_tensors, mtp_names, {"model-00003-of-00003.safetensors"})


def test_checking_a_head_imports_neither_torch_nor_verl(tmp_path):
    path, _, _ = build(tmp_path, "ckpt", "deepseek_v3", drop=("model.layers.2.eh_proj.weight",))
    code = (
        "import sys, verl_mtp.ckpt as c\n"
        f"r = c.inspect_checkpoint({path!r}); c.render_inspect(r)\n"
        "assert r.missing == ['model.layers.2.eh_proj.weight'], r.missing\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'verl', 'transformers', 'megatron', 'ray'})\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
