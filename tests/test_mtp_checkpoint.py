"""MTP-aware Megatron checkpoints (verl_mtp.ckpt.mtp_manifest + the ``mtp_checkpoint`` patch).

Real parts: verl's ``MegatronCheckpointManager`` (save_checkpoint / _finalize_save /
load_checkpoint, wrapped by the patch) writing and reading megatron-core ``dist_checkpointing``
directories (torch_dist, gloo, world size 1) of a tiny megatron-core GPTModel with MTP depths;
verl's ``MegatronEngine.load_checkpoint`` (called on a stand-in object: the engine itself needs
CUDA); training steps through verl's ``BaseEngine.train_batch`` and the installed actor loss
(``CpuStandInEngine``, see verl_mtp/local_megatron/engine_step.py).

CPU boundary (what these tests do NOT exercise):
- the optimizer content: megatron-core's optimizer hard-codes CUDA (``FP32Optimizer.__init__``
  allocates its scale with ``device='cuda'``, ``get_grad_norm_fp32`` too), so managers here save
  and load ``['model', 'extra']``. The fresh-head check that refuses loading ``optimizer`` is tested.
- megatron's async save (``async_save=True``), Megatron-FSDP, Megatron-Bridge (non-vanilla) and
  PEFT. The Hugging Face model path (verl's default, ``use_dist_checkpointing=False``) runs through
  mbridge with verl-mtp's bridges on a tiny MiMo checkpoint (verl_mtp.testing.tiny_hf).
- pipeline parallelism (MTP on the last stage only; the manifest gathers from all ranks, which
  the TP=2 test exercises with two ranks).
- two more hard-coded CUDA calls are redirected for the test only: ``torch.cuda.synchronize`` in
  dist_checkpointing's write preload, and the CUDA RNG tracker's (never seeded on CPU) states,
  which verl's ``extra`` content saves and restores: the tests give it a CPU generator state
  (verl_mtp/testing/ckpt_ranks.py).
"""

import functools
import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch

from verl_mtp.ckpt import mtp_manifest
from verl_mtp.ckpt.mtp_manifest import MANIFEST_NAME, MtpCheckpointError
from verl_mtp.config import ExtendedMtpConfig, MtpConfigError
from verl_mtp.local_megatron import engine_step
from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt
from verl_mtp.testing.ckpt_ranks import (
    cpu_checkpointing,
    dropping,
    load,
    make_hf_manager,
    make_manager,
    save,
    save_without_checks,
)
from verl_mtp.testing.engine_step import in_update_step

pytestmark = pytest.mark.megatron

DEPTHS = 2
OCC_MTP = {"mtp_training_mode": "joint", "mtp_loss_type": "rl", "mtp_coef_mode": "occ", "occ_ema_decay": 0.5}


def mtp_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("mtp.")}


def all_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def mini_batch(seed):
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [3, 2, 4, 3], [4, 5, 2, 6]
    return {
        "prompts": [torch.randint(0, 64, (p,), generator=g) for p in prompts],
        "responses": [torch.randint(0, 64, (r,), generator=g) for r in responses],
        "old_log_probs": [-torch.rand(r, generator=g) * 5 - 2 for r in responses],
        "advantages": [torch.randn(r, generator=g) for r in responses],
    }


def fresh_policy_loss(monkeypatch):
    """A new process's actor loss: a fresh MtpPolicyLoss installed where the plugin puts it."""
    from verl.workers import engine_workers

    import verl_mtp.loss as loss_module

    installed = loss_module.MtpPolicyLoss(engine_workers.ppo_loss.stock_loss)
    monkeypatch.setattr(loss_module, "_installed", installed)
    return installed


def train_step(model, config, policy_loss, seed):
    """One step of verl's train_batch; ``config`` is the run's one actor config (verl binds it once)."""
    engine = engine_step.CpuStandInEngine(model, micro_batch_size=2)
    loss_function = functools.partial(policy_loss, config=config)
    with in_update_step(loss_function, mini_batch_index=1):  # off-policy: OCC measures
        engine.train_batch(mini_batch(seed), loss_function)
    return [m[f"actor/mtp_{k}/coef"] for m in engine.micro_batch_metrics for k in range(1, DEPTHS + 1)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A joint rl+OCC run trained two steps and saved at step 2; then continued one more step."""
    mp = pytest.MonkeyPatch()
    try:
        mtp = ExtendedMtpConfig(**OCC_MTP)
        torch.manual_seed(0)
        model = engine_step.build_engine_model(mtp, TinyGPTSpec(mtp_num_layers=DEPTHS))
        policy_loss, config = fresh_policy_loss(mp), engine_step.actor_config(mtp)
        for seed in (1, 2):
            train_step(model, config, policy_loss, seed)
        path = tmp_path_factory.mktemp("ckpt") / "global_step_2"
        save(make_manager(model, mtp), path, step=2)
        saved = {"weights": all_params(model), "occ": policy_loss.occ_state_dict()}
        continued = {"coefs": train_step(model, config, policy_loss, 3), "weights": all_params(model),
                     "occ": policy_loss.occ_state_dict()}
    finally:
        mp.undo()
    return SimpleNamespace(mtp=mtp, path=path, saved=saved, continued=continued,
                           manifest=json.loads((path / MANIFEST_NAME).read_text()))


def test_resume_restores_mtp_weights_and_occ_and_continues_identically(trained, monkeypatch):
    import verl.workers.engine.megatron.transformer_impl as engine_module

    mtp = trained.mtp
    torch.manual_seed(0)
    model = engine_step.build_engine_model(mtp, TinyGPTSpec(mtp_num_layers=DEPTHS, seed=99))
    assert any(not torch.equal(p, trained.saved["weights"][n]) for n, p in mtp_params(model).items())
    policy_loss = fresh_policy_loss(monkeypatch)
    assert policy_loss.occ_state_dict() is None

    # verl's real MegatronEngine.load_checkpoint (patched: attaches the MTP config) on a stand-in engine
    manager = make_manager(model)
    stand_in = SimpleNamespace(checkpoint_mananager=manager, model_config=SimpleNamespace(mtp=mtp),
                               _is_offload_param=False, _is_offload_optimizer=False)
    with cpu_checkpointing():
        engine_module.MegatronEngine.load_checkpoint(stand_in, str(trained.path), del_local_after_load=False)
    assert getattr(manager, mtp_manifest.MTP_CONFIG_ATTR) is mtp

    for name, value in all_params(model).items():
        assert torch.equal(value, trained.saved["weights"][name]), name
    occ = trained.saved["occ"]
    assert occ is not None and occ[0]["ema"] is not None and occ[0]["last_off_policy"] != 0.0
    assert policy_loss.occ_state_dict() == occ

    coefs = train_step(model, engine_step.actor_config(mtp), policy_loss, 3)
    assert coefs == trained.continued["coefs"]
    assert policy_loss.occ_state_dict() == trained.continued["occ"]
    for name, value in all_params(model).items():
        assert torch.equal(value, trained.continued["weights"][name]), name


def test_resume_without_occ_state_would_diverge(trained, monkeypatch):
    """The OCC state matters: continuing with OCC fresh gives other lambdas than the resumed run."""
    mtp = trained.mtp
    model = engine_step.build_engine_model(mtp, TinyGPTSpec(mtp_num_layers=DEPTHS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(trained.saved["weights"][name])
    coefs = train_step(model, engine_step.actor_config(mtp), fresh_policy_loss(monkeypatch), 3)
    assert coefs != trained.continued["coefs"]


def test_manifest_content(trained):
    import megatron.core

    from verl_mtp.version import __version__

    manifest, path = trained.manifest, trained.path
    assert manifest["format"] == "verl-mtp/mtp-manifest" and manifest["schema_version"] == 1
    assert manifest["global_step"] == 2 and manifest["num_depths"] == DEPTHS
    mtp_names = {n: p for n, p in trained.saved["weights"].items() if n.startswith("mtp.")}
    # Checkpoint keys are megatron's, not always the parameter names (the local layer spec stores
    # input_layernorm.weight as self_attention.linear_qkv.layer_norm_weight): one key per parameter,
    # per depth, with the parameter's shape (TP=1: global shape = local shape).
    params = manifest["parameters"]
    for depth in range(DEPTHS):
        names = [n for n in mtp_names if n.startswith(f"mtp.layers.{depth}.")]
        keys = [k for k in params if mtp_manifest.depth_of(k) == depth]
        assert len(keys) == len(names) > 0
        assert sorted(params[k]["shape"] for k in keys) == sorted(list(mtp_names[n].shape) for n in names)
    assert params["mtp.layers.1.eh_proj.weight"] == {"shape": [32, 64], "dtype": "torch.float32"}
    # (the layer inside a depth is transformer_layer on megatron-core 0.16, mtp_model_layer on 0.18)
    assert any(k.endswith("self_attention.linear_qkv.layer_norm_weight") for k in params)
    assert any(n.endswith("input_layernorm.weight") for n in mtp_names)
    assert not any(k.endswith("input_layernorm.weight") for k in params)
    config = manifest["config"]
    assert (config["mtp_training_mode"], config["mtp_loss_type"], config["mtp_coef_mode"]) == ("joint", "rl", "occ")
    assert config["occ_ema_decay"] == 0.5 and config["detach_encoder"] is False
    assert manifest["occ"] == trained.saved["occ"]
    assert manifest["saved_in"] == {"dist_ckpt": "model/dist_ckpt", "huggingface": None}
    assert manifest["versions"]["megatron-core"] == megatron.core.__version__
    assert manifest["versions"]["verl-mtp"] == __version__
    # the files really hold what the manifest lists
    on_disk = mtp_manifest.dist_ckpt_tensors(str(path / "model" / "dist_ckpt"))
    assert {k: list(v) for k, v in on_disk.items() if k.startswith("mtp.")} == {
        k: v["shape"] for k, v in manifest["parameters"].items()
    }
    assert (path / "ckpt_contents.json").is_file()
    assert not [f for f in os.listdir(path) if ".tmp" in f]


def test_depth_count_mismatch_fails(trained):
    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=1))
    before = all_params(model)
    with pytest.raises(MtpCheckpointError, match=r"saved with 2 MTP depth\(s\) but this model has 1.*mtp_num_layers"):
        load(make_manager(model, ExtendedMtpConfig(enable=True)), trained.path)
    assert all(torch.equal(before[n], p) for n, p in all_params(model).items())


# --- checkpoints with a missing / mis-shaped MTP tensor -----------------------------------------


DROPPED = "mtp.layers.1.eh_proj.weight"
RESHAPED = "mtp.layers.0.enorm.weight"


def reshaped(key):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    def edit(sd):
        sd[key] = ShardedTensor.from_rank_offsets(key, torch.zeros(7), replica_id=0)
        return sd

    return edit


@pytest.mark.parametrize("with_manifest", [False, True])
def test_checkpoint_missing_an_mtp_tensor_fails_naming_it(trained, tmp_path, with_manifest):
    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS))
    save_without_checks(make_manager(model), tmp_path / "ckpt", dropping(DROPPED))
    if with_manifest:  # a manifest that claims the tensor does not make it load
        (tmp_path / "ckpt" / MANIFEST_NAME).write_text(json.dumps(trained.manifest))
    target = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS, seed=7))
    before = all_params(target)
    with pytest.raises(MtpCheckpointError, match=rf"{DROPPED} \(missing\)"):
        load(make_manager(target, ExtendedMtpConfig(enable=True)), tmp_path / "ckpt")
    assert all(torch.equal(before[n], p) for n, p in all_params(target).items())  # nothing half-loaded


def test_checkpoint_with_a_mis_shaped_mtp_tensor_fails_naming_it(tmp_path):
    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS))
    save_without_checks(make_manager(model), tmp_path / "ckpt", reshaped(RESHAPED))
    with pytest.raises(MtpCheckpointError, match=rf"{RESHAPED}: expected \[32\], found \[7\]"):
        load(make_manager(build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS))), tmp_path / "ckpt")


# --- save side: never claim a save that lacks MTP tensors ---------------------------------------


def test_save_refuses_when_the_sharded_state_dict_lacks_an_mtp_parameter(tmp_path):
    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS))
    manager = make_manager(model)
    build = manager._build_model_sharded_state_dict
    manager._build_model_sharded_state_dict = lambda md: {"model": dropping(DROPPED)(dict(build(md)["model"]))}
    with pytest.raises(MtpCheckpointError, match=rf"{DROPPED} are not in the model's sharded state dict"):
        save(manager, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "model" / "dist_ckpt" / ".metadata").exists()
    assert not (tmp_path / "ckpt" / MANIFEST_NAME).exists()


def test_failed_write_leaves_no_manifest_claiming_success(trained, tmp_path):
    """Shards written without an MTP tensor (the sharded state dict was complete): the finalize
    check raises, so neither mtp_manifest.json nor verl's ckpt_contents.json appear, and the stale
    manifest of an earlier save to the same directory is gone."""
    path = tmp_path / "global_step_1"
    path.mkdir()
    (path / MANIFEST_NAME).write_text(json.dumps(trained.manifest))  # from an earlier save here
    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS))
    manager = make_manager(model)
    schedule = manager._schedule_dist_checkpoint_saves

    def losing_a_tensor(items):
        edited = [(p, {"model": dropping(DROPPED)(dict(sd["model"]))} if "model" in sd else sd) for p, sd in items]
        return schedule(edited)

    manager._schedule_dist_checkpoint_saves = losing_a_tensor
    with pytest.raises(MtpCheckpointError, match=rf"{DROPPED} \(missing from .*model/dist_ckpt\)"):
        save(manager, path)
    assert (path / "model" / "dist_ckpt" / ".metadata").exists()  # the shards were written...
    assert not (path / MANIFEST_NAME).exists()  # ...but nothing claims the save is complete
    assert not (path / "ckpt_contents.json").exists()


def test_each_save_commits_its_own_manifest_when_finalizes_run_out_of_order(tmp_path):
    """With async_save a save's finalize can run after the next save started: the manifest a
    finalize writes is the one prepared for its own directory."""
    manager = make_manager(build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS)))
    first, second = tmp_path / "global_step_1", tmp_path / "global_step_2"
    mtp_manifest.prepare_mtp_save(manager, str(first), 1)
    mtp_manifest.prepare_mtp_save(manager, str(second), 2)
    for path in (second, first):  # verl's save; its (patched) finalize commits that directory's manifest
        save_without_checks(manager, path, lambda sharded: sharded)
    assert json.loads((first / MANIFEST_NAME).read_text())["global_step"] == 1
    assert json.loads((second / MANIFEST_NAME).read_text())["global_step"] == 2


def test_atomic_write_leaves_old_file_or_nothing(tmp_path):
    target = tmp_path / MANIFEST_NAME
    with pytest.raises(TypeError):
        mtp_manifest.write_json_atomic(str(target), {"bad": object()})
    assert os.listdir(tmp_path) == []
    mtp_manifest.write_json_atomic(str(target), {"a": 1})
    with pytest.raises(TypeError):
        mtp_manifest.write_json_atomic(str(target), {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1} and os.listdir(tmp_path) == [MANIFEST_NAME]


# --- a checkpoint saved without MTP -------------------------------------------------------------


@pytest.fixture(scope="module")
def no_mtp_checkpoint(tmp_path_factory):
    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=0, seed=5))
    path = tmp_path_factory.mktemp("nomtp") / "global_step_1"
    save(make_manager(model, ExtendedMtpConfig()), path)
    return SimpleNamespace(path=path, weights=all_params(model))


def test_no_mtp_checkpoint_writes_no_manifest(no_mtp_checkpoint):
    assert not (no_mtp_checkpoint.path / MANIFEST_NAME).exists()
    assert (no_mtp_checkpoint.path / "ckpt_contents.json").is_file()


def test_no_mtp_checkpoint_into_mtp_run_needs_the_opt_in(no_mtp_checkpoint):
    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS))
    before = all_params(model)
    with pytest.raises(MtpCheckpointError, match="has no MTP tensors.*mtp_allow_fresh_head_on_resume=True"):
        load(make_manager(model, ExtendedMtpConfig(enable=True)), no_mtp_checkpoint.path)
    assert all(torch.equal(before[n], p) for n, p in all_params(model).items())


def test_no_mtp_checkpoint_with_opt_in_keeps_fresh_head(no_mtp_checkpoint, caplog):
    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS))
    fresh = mtp_params(model)
    manager = make_manager(model, ExtendedMtpConfig(enable=True, mtp_allow_fresh_head_on_resume=True))
    with caplog.at_level(logging.WARNING, logger=mtp_manifest.__name__):
        load(manager, no_mtp_checkpoint.path)
    assert any("keeps its fresh initialisation" in r.getMessage() for r in caplog.records)
    after = all_params(model)
    for name, value in no_mtp_checkpoint.weights.items():  # the trunk comes from the checkpoint
        assert torch.equal(after[name], value), name
    assert set(fresh) and all(torch.equal(after[n], v) for n, v in fresh.items())  # the head stays fresh
    # instance overrides are gone: the next load is a normal one again
    assert "_build_model_sharded_state_dict" not in vars(manager) and "load_state_dict" not in vars(model)


def test_opt_in_refuses_loading_the_optimizer(no_mtp_checkpoint):
    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS))
    manager = make_manager(model, ExtendedMtpConfig(enable=True, mtp_allow_fresh_head_on_resume=True),
                           load=("model", "optimizer", "extra"))
    with pytest.raises(MtpCheckpointError, match=r"optimizer state.*load_contents to \['model', 'extra'\]"):
        load(manager, no_mtp_checkpoint.path)


# --- config and patch -------------------------------------------------------------------------


def test_opt_in_key_is_validated():
    assert ExtendedMtpConfig().mtp_allow_fresh_head_on_resume is False
    expected = r"mtp\.mtp_allow_fresh_head_on_resume='maybe' is invalid: expected a boolean: true or false"
    with pytest.raises(MtpConfigError, match=expected):
        ExtendedMtpConfig(mtp_allow_fresh_head_on_resume="maybe")


def test_patch_is_applied_and_undoable():
    import verl.workers.engine.megatron.transformer_impl as engine_module
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager

    from verl_mtp import plugin
    from verl_mtp.patches.catalog import MTP_CHECKPOINT

    assert plugin.status()["mtp_checkpoint"] == "applied"
    methods = ("save_checkpoint", "_finalize_save", "load_checkpoint")
    wrapped = {m: getattr(MegatronCheckpointManager, m) for m in methods}
    assert all(hasattr(f, "__verl_mtp_original__") for f in wrapped.values())
    assert hasattr(engine_module.MegatronEngine.load_checkpoint, "__verl_mtp_original__")
    MTP_CHECKPOINT.undo()
    try:
        for name, f in wrapped.items():
            assert getattr(MegatronCheckpointManager, name) is f.__verl_mtp_original__
        assert not hasattr(engine_module.MegatronEngine.save_checkpoint, "__verl_mtp_original__")
    finally:
        MTP_CHECKPOINT.apply()
    assert all(hasattr(getattr(MegatronCheckpointManager, m), "__verl_mtp_original__") for m in wrapped)


# --- tensor parallel: global shapes, consistent failure on every rank ----------------------------


def test_tensor_parallel_checkpoint_has_global_shapes_and_fails_on_every_rank(tmp_path):
    """Two gloo ranks at TP=2: the manifest's shapes are global (equal to a TP=1 model's), the
    checkpoint reloads at TP=2 and at TP=1 (dist_checkpointing reshards), and a checkpoint lacking
    an MTP tensor fails on both ranks with the same message (the decision is made from gathered
    information, so no rank is left waiting in a collective)."""
    from verl_mtp.testing.ckpt_ranks import tensor_parallel_checkpoint_rank
    from verl_mtp.testing.gloo import run_on_gloo_ranks

    ranks = run_on_gloo_ranks(tensor_parallel_checkpoint_rank, [(str(tmp_path), 2, DEPTHS, DROPPED)] * 2)
    assert all(r["reloaded"] for r in ranks)
    assert ranks[0]["error"] is not None and ranks[0]["error"] == ranks[1]["error"]
    assert f"{DROPPED} (missing)" in ranks[0]["error"]

    full = {}  # the TP=2 model's parameters, unsharded
    for name, (shard, dim) in ranks[0]["shards"].items():
        full[name] = shard if dim is None else torch.cat([r["shards"][name][0] for r in ranks], dim=dim)
    reference = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=DEPTHS, seed=3))  # TP=1, this process
    manifest = json.loads((tmp_path / "tp" / MANIFEST_NAME).read_text())
    expected = mtp_manifest.live_mtp_tensors(make_manager(reference))[0]
    assert {k: v["shape"] for k, v in manifest["parameters"].items()} == {k: list(t.shape) for k, t in expected.items()}
    assert any(ranks[0]["shards"][n][1] is not None for n in full if n.startswith("mtp."))  # really split

    # model only: verl's rng_state is a (pp, tp)-grid object, not reshardable to another TP size
    load(make_manager(reference, ExtendedMtpConfig(enable=True), load=("model",)), tmp_path / "tp")
    for name, value in all_params(reference).items():
        assert torch.equal(value, full[name]), name


# --- the Hugging Face model path (verl's default: use_dist_checkpointing=False, mbridge) ---------

MIMO_MTP_NORM = "model.mtp_layers.0.token_layernorm.weight"


@pytest.fixture(scope="module")
def mimo(tmp_path_factory):
    """Tiny MiMo checkpoints (1 MTP depth; and one without MTP) in the real HF layout."""
    pytest.importorskip("mbridge")
    from verl_mtp.local_megatron.hf_model import load_hf_model
    from verl_mtp.testing.tiny_hf import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("mimo")
    tensors = {name: write_tiny_checkpoint(str(root / name), "mimo", depths, seed=seed)
               for name, depths, seed in (("a", 1, 1), ("b", 1, 2), ("no_mtp", 0, 3))}
    return SimpleNamespace(root=root, tensors=tensors, load=lambda name: load_hf_model(str(root / name)))


def as_checkpoint(hf_dir, path):
    """A verl checkpoint directory whose model/huggingface is ``hf_dir``."""
    import shutil

    shutil.copytree(hf_dir, path / "model" / "huggingface")
    return path


def test_hf_path_save_writes_a_verified_manifest_and_resumes(mimo, tmp_path):
    saved = mimo.load("a")
    save(make_hf_manager(saved, ExtendedMtpConfig(enable=True)), tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST_NAME).read_text())
    assert manifest["saved_in"] == {"dist_ckpt": None, "huggingface": "model/huggingface"}
    assert manifest["num_depths"] == 1 and len(manifest["parameters"]) == len(mtp_params(saved.model))

    target = mimo.load("b")
    assert any(not torch.equal(p, mtp_params(saved.model)[n]) for n, p in mtp_params(target.model).items())
    load(make_hf_manager(target, ExtendedMtpConfig(enable=True)), tmp_path / "ckpt")
    for name, value in all_params(saved.model).items():
        assert torch.equal(all_params(target.model)[name], value), name


@pytest.mark.parametrize("dropped", [MIMO_MTP_NORM, "model.mtp_layers.0.mlp.down_proj.weight"])
def test_hf_checkpoint_missing_an_mtp_tensor_fails_naming_it(mimo, tmp_path, dropped):
    """A core tensor of the depth (the family's completeness rule) and one only the bridge's exact
    list of MTP tensors names."""
    from verl_mtp.testing.tiny_hf import tiny_config, write_checkpoint

    broken = {n: t for n, t in mimo.tensors["a"].items() if n != dropped}
    write_checkpoint(str(tmp_path / "hf"), tiny_config("mimo", 1), broken)
    target = mimo.load("b")
    before = all_params(target.model)
    with pytest.raises(MtpCheckpointError, match=rf"cannot seed this model's MTP head: .*{dropped}"):
        load(make_hf_manager(target, ExtendedMtpConfig(enable=True)), as_checkpoint(tmp_path / "hf", tmp_path / "ckpt"))
    assert all(torch.equal(before[n], p) for n, p in all_params(target.model).items())


def test_hf_no_mtp_checkpoint_needs_the_opt_in_and_then_keeps_fresh_head(mimo, tmp_path, caplog):
    ckpt = as_checkpoint(mimo.root / "no_mtp", tmp_path / "ckpt")
    target = mimo.load("b")
    fresh = mtp_params(target.model)
    with pytest.raises(MtpCheckpointError, match="has no MTP tensors.*mtp_allow_fresh_head_on_resume=True"):
        load(make_hf_manager(target, ExtendedMtpConfig(enable=True)), ckpt)

    manager = make_hf_manager(target, ExtendedMtpConfig(enable=True, mtp_allow_fresh_head_on_resume=True))
    with caplog.at_level(logging.WARNING, logger=mtp_manifest.__name__):
        load(manager, ckpt)
    assert any("keeps its fresh initialisation" in r.getMessage() for r in caplog.records)
    source = mimo.tensors["no_mtp"]
    weights = all_params(target.model)
    assert torch.equal(weights["embedding.word_embeddings.weight"], source["model.embed_tokens.weight"])
    assert torch.equal(weights["output_layer.weight"], source["lm_head.weight"])
    assert all(torch.equal(weights[n], v) for n, v in fresh.items())
    assert mtp_manifest._BRIDGE_NAME_MAP not in vars(target.bridge)  # the bridge is itself again
