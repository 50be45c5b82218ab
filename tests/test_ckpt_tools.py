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

VERL_MTP = os.path.join(os.path.dirname(sys.executable), "verl-mtp")
V, I = 32, 24  # vocabulary, MLP width
FAMILY_NAMES = [f.name for f in FAMILIES]
TRUNK_LAYERS = {"mimo": 2, "deepseek_v3": 2, "glm4_moe": 3, "qwen3_next": 2, "qwen3_5": 2}
DEPTH_KEY = {"mimo": "num_nextn_predict_layers", "deepseek_v3": "num_nextn_predict_layers",
             "glm4_moe": "num_nextn_predict_layers", "qwen3_next": "mtp_num_hidden_layers",
             "qwen3_5": "mtp_num_hidden_layers"}


# --- tiny checkpoints -----------------------------------------------------------------------------


def _layer(prefix, hidden, inter=I):
    """A transformer layer's own tensors (attention, a two-expert MoE, norms)."""
    return {
        f"{prefix}input_layernorm.weight": ((hidden,), torch.float32),
        f"{prefix}self_attn.q_proj.weight": ((hidden, hidden), torch.bfloat16),
        f"{prefix}self_attn.o_proj.weight": ((hidden, hidden), torch.bfloat16),
        f"{prefix}post_attention_layernorm.weight": ((hidden,), torch.float32),
        f"{prefix}mlp.gate.weight": ((2, hidden), torch.float32),
        **{
            f"{prefix}mlp.experts.{e}.{p}.weight": ((inter, hidden), torch.bfloat16)
            for e in (0, 1)
            for p in ("gate_proj", "up_proj")
        },
    }


def layout(family, hidden=16, depths=1, mtp=True, mtp_inter=I):
    """(config, {name: (shape, dtype)}, set of MTP names) for a tiny checkpoint of ``family``."""
    L = TRUNK_LAYERS[family]
    lm = "model.language_model." if family == "qwen3_5" else "model."
    specs = {f"{lm}embed_tokens.weight": ((V, hidden), torch.bfloat16)}
    for j in range(L):
        specs.update(_layer(f"{lm}layers.{j}.", hidden))
    specs[f"{lm}norm.weight"] = ((hidden,), torch.float32)
    specs["lm_head.weight"] = ((V, hidden), torch.bfloat16)
    base = {"hidden_size": hidden, "num_hidden_layers": L, "vocab_size": V, DEPTH_KEY[family]: depths}
    mtp_specs = {}
    for i in range(depths):
        if family == "mimo":
            p = f"model.mtp_layers.{i}."
            mtp_specs.update({
                f"{p}token_layernorm.weight": ((hidden,), torch.float32),
                f"{p}hidden_layernorm.weight": ((hidden,), torch.float32),
                f"{p}input_proj.weight": ((hidden, 2 * hidden), torch.bfloat16),
                f"{p}final_layernorm.weight": ((hidden,), torch.float32),
                **_layer(p, hidden, mtp_inter),
            })
        elif family in ("deepseek_v3", "glm4_moe"):
            p = f"model.layers.{L + i}."
            mtp_specs.update({
                f"{p}enorm.weight": ((hidden,), torch.float32),
                f"{p}hnorm.weight": ((hidden,), torch.float32),
                f"{p}eh_proj.weight": ((hidden, 2 * hidden), torch.bfloat16),
                f"{p}shared_head.norm.weight": ((hidden,), torch.float32),
                f"{p}shared_head.head.weight": ((V, hidden), torch.bfloat16),
                f"{p}embed_tokens.weight": ((V, hidden), torch.bfloat16),
                **_layer(p, hidden, mtp_inter),
            })
        else:
            mtp_specs.update(_layer(f"mtp.layers.{i}.", hidden, mtp_inter))
    if family in ("qwen3_next", "qwen3_5") and depths:
        mtp_specs.update({
            "mtp.fc.weight": ((hidden, 2 * hidden), torch.bfloat16),
            "mtp.pre_fc_norm_embedding.weight": ((hidden,), torch.float32),
            "mtp.pre_fc_norm_hidden.weight": ((hidden,), torch.float32),
            "mtp.norm.weight": ((hidden,), torch.float32),
        })
    if family == "mimo":
        config = {"architectures": ["MiMoForCausalLM"], "model_type": "mimo", **base}
    elif family == "deepseek_v3":
        config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **base}
    elif family == "glm4_moe":
        config = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", **base}
    elif family == "qwen3_next":
        config = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", **base}
    else:
        specs["model.visual.patch_embed.proj.weight"] = ((hidden, 3 * 2 * 2), torch.bfloat16)
        config = {
            "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "text_config": {"model_type": "qwen3_5_moe_text", **base}, "vision_config": {"depth": 1},
        }
    if mtp:
        specs.update(mtp_specs)
    return config, specs, set(mtp_specs) if mtp else set()


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
    """Write a checkpoint; returns (path, tensors, mtp_names)."""
    shards = kw.pop("shards", 3)
    spread = kw.pop("spread_mtp", False)
    drop = kw.pop("drop", ())
    config_edit = kw.pop("config_edit", None)
    config, specs, mtp_names = layout(family, **kw)
    if config_edit:
        config_edit(config)
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
    assert code == 0 and "complete     yes" in out and "model.mtp_layers.0.mlp.experts.{0..1}.gate_proj.weight" in out


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
    donor, _, _ = build(tmp_path, "donor", "deepseek_v3", seed=2, mtp_inter=20)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "stitch", verifier, donor, out)
    assert code == 2 and "refusing to stitch" in err
    assert "model.layers.2.mlp.experts.0.gate_proj.weight: VERIFIER [24, 16] BF16 vs DONOR [20, 16] BF16" in err
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
    assert "does not fit RL's hidden size 24" in err
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
