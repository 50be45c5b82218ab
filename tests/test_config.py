"""The extended actor_rollout_ref.model.mtp config: resolution, validation, both dataclass paths."""

import dataclasses
import math
import os

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig

from verl_mtp.config import (
    PLUGIN_MTP_FIELDS,
    VerlMtpConfig,
    ExtendedMtpConfig,
    MtpConfigError,
    as_extended,
    detect_mtp_depths,
)
from verl_mtp.run_checks import validate_mtp_run_config

# --- regime resolution ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, mode, enable, enable_train, detach",
    [
        ({}, "disabled", False, False, False),  # stock verl defaults
        ({"enable": True}, "disabled", True, False, False),
        ({"enable": True, "enable_train": True}, "joint", True, True, False),
        ({"enable": True, "enable_train": True, "detach_encoder": True}, "standalone", True, True, True),
        ({"mtp_training_mode": "standalone"}, "standalone", True, True, True),
        ({"mtp_training_mode": "joint"}, "joint", True, True, False),
        ({"mtp_training_mode": "disabled", "enable": True}, "disabled", True, False, False),
        ({"mtp_training_mode": "standalone", "enable_train": True, "detach_encoder": True}, "standalone", True, True, True),
    ],
)
def test_training_mode_resolves_verl_switches(settings, mode, enable, enable_train, detach):
    cfg = ExtendedMtpConfig(**settings)
    assert (cfg.mtp_training_mode, cfg.enable, cfg.enable_train, cfg.detach_encoder) == (
        mode,
        enable,
        enable_train,
        detach,
    )
    assert isinstance(cfg, VerlMtpConfig)


def test_stock_defaults_are_unchanged():
    stock = VerlMtpConfig.__dataclass_fields__
    ours = ExtendedMtpConfig()
    for name in stock:
        if name.startswith("_"):
            continue
        default = stock[name].default
        assert getattr(ours, name) == default, name


# --- bad input: key, bad value and valid choices in the message ---------------------------------

BAD_INPUTS = [
    ({"mtp_loss_type": "kl"}, r"mtp\.mtp_loss_type='kl' is invalid: valid choices are ce, rl"),
    ({"mtp_training_mode": "frozen"}, r"mtp_training_mode='frozen' is invalid: valid choices are disabled, standalone, joint"),
    ({"mtp_coef_mode": "auto"}, r"mtp_coef_mode='auto' is invalid: valid choices are fixed, occ"),
    ({"mtp_loss_scaling_factor": -0.1}, r"mtp_loss_scaling_factor=-0.1 is invalid: expected a number >= 0"),
    ({"mtp_loss_scaling_factor": float("nan")}, r"mtp_loss_scaling_factor=nan is invalid: expected a finite number"),
    ({"mtp_loss_scaling_factor": float("inf")}, r"mtp_loss_scaling_factor=inf is invalid"),
    ({"mtp_loss_type": "rl"}, r"mtp_loss_type='rl' is invalid: the RL policy loss needs the MTP head in training"),
    ({"enable": True, "mtp_loss_type": "rl"}, r"set mtp_training_mode=standalone or joint"),
    ({"mtp_training_mode": "joint", "mtp_coef_mode": "occ"}, r"mtp_coef_mode='occ' is invalid: OCC calibrates the RL policy loss"),
    ({"mtp_training_mode": "disabled", "enable_train": True}, r"conflicts with enable_train=True"),
    ({"mtp_training_mode": "joint", "detach_encoder": True}, r"conflicts with detach_encoder=True"),
    ({"enable_train": True}, r"enable_train=True is invalid: it has no effect while enable=False"),
    ({"occ_scale": 0.0}, r"occ_scale=0.0 is invalid: expected a number > 0"),
    ({"occ_eps": float("nan")}, r"occ_eps=nan is invalid"),
    ({"occ_ema_decay": 1.0}, r"occ_ema_decay=1.0 is invalid: expected 0 <= decay < 1"),
    ({"occ_coef_min": 2.0, "occ_coef_max": 1.0}, r"occ_coef_min=2.0 is invalid: it is above occ_coef_max=1.0"),
    ({"occ_on_policy_coef": "one"}, r"occ_on_policy_coef='one' is invalid: valid choices are previous, zero, fixed"),
    ({"occ_scope": "step"}, r"occ_scope='step' is invalid: valid choices are micro_batch, mini_batch"),
    ({"mtp_step_weight_beta": 0.0}, r"mtp_step_weight_beta=0.0 is invalid: expected a number > 0"),
    ({"mtp_num_layers": 0}, r"mtp_num_layers=0 is invalid: expected a positive integer"),
    ({"mtp_num_layers": True}, r"mtp_num_layers=True is invalid"),
]


@pytest.mark.parametrize("settings, message", BAD_INPUTS)
def test_bad_input_is_rejected_with_a_clear_message(settings, message):
    with pytest.raises(MtpConfigError, match=message):
        ExtendedMtpConfig(**settings)


def test_good_occ_config():
    cfg = ExtendedMtpConfig(
        mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ", occ_coef_min=-1.0, occ_coef_max=1.0
    )
    assert cfg.is_training and cfg.occ_scale == 1.0 and cfg.occ_eps == 1e-8 and cfg.occ_ema_decay == 0.0


def test_step_weights():
    assert ExtendedMtpConfig().step_weights(3) == [1.0, 1.0, 1.0]
    weights = ExtendedMtpConfig(mtp_step_weight_beta=0.6).step_weights(3)
    assert weights == pytest.approx([1.0, 0.6, 0.36])


def test_as_extended_upgrades_plain_verl_config_and_rejects_unknown_keys():
    import verl.workers.config.model as model_mod

    plain = VerlMtpConfig(enable=True, enable_train=True, detach_encoder=True)
    assert type(plain) is not ExtendedMtpConfig
    upgraded = as_extended(plain)
    assert upgraded.mtp_training_mode == "standalone" and upgraded.mtp_loss_type == "ce"
    with pytest.raises(MtpConfigError, match=r"unknown key\(s\) actor_rollout_ref\.model\.mtp\.mtp_los_type"):
        as_extended({"mtp_los_type": "rl"})
    assert model_mod.MtpConfig is ExtendedMtpConfig


def test_unknown_keys_name_the_closest_valid_key():
    with pytest.raises(MtpConfigError) as info:
        as_extended({"occ_scal": 1, "detach_encodr": True, "zzz": 1})
    message = str(info.value)
    assert "actor_rollout_ref.model.mtp.occ_scal (did you mean occ_scale?)" in message
    assert "actor_rollout_ref.model.mtp.detach_encodr (did you mean detach_encoder?)" in message
    assert "actor_rollout_ref.model.mtp.zzz;" in message  # nothing close: no guess
    assert "valid keys are adaptive_spec_hysteresis," in message and "_target_" not in message


def test_misspelt_key_through_verl_config_conversion(make_checkpoint):
    # The driver: verl's validate_config (the plugin puts the MTP check first) on a composed run
    # config; stock verl's config needs '+' for a key it does not declare.
    cfg = _run_config(["+actor_rollout_ref.model.mtp.occ_scal=1"], "ppo_megatron_trainer", "verl.trainer.config")
    from verl.utils.config import validate_config

    with pytest.raises(MtpConfigError, match=r"mtp\.occ_scal \(did you mean occ_scale\?\)"):
        validate_config(cfg, use_reference_policy=False, use_critic=False)
    # The workers: verl's omega_conf_to_dataclass on the model node (Hydra `_target_` path).
    node = _model_node(make_checkpoint())
    node.mtp["occ_scal"] = 1
    with pytest.raises(Exception, match=r"mtp\.occ_scal \(did you mean occ_scale\?\)"):
        omega_conf_to_dataclass(node)
    with pytest.raises(MtpConfigError, match=r"did you mean mtp_loss_type\?"):
        ExtendedMtpConfig(mtp_los_type="rl")


# --- booleans: what OmegaConf accepts, converted before the regime is resolved -------------------

BOOL_INPUTS = [
    True, False, 0, 1, 2, -1, "true", "False", "TRUE", "yes", "Yes", "no", "NO", "on", "off", "OFF", "y", "N",
    "1", "0", " 1 ", "2", "1_0", "-0", "maybe", "", "t", "f", " yes", "nope", "None", "null", 1.0, 0.0, None, [1],
]


@dataclasses.dataclass
class _OneBool:
    flag: bool = False


def _omegaconf_bool(value):
    """What OmegaConf's structured path makes of ``value`` for a ``bool`` field (None = refused)."""
    from omegaconf.errors import ValidationError

    try:
        return OmegaConf.merge(OmegaConf.structured(_OneBool), {"flag": value}).flag
    except ValidationError:
        return None


@pytest.mark.parametrize("value", BOOL_INPUTS, ids=repr)
@pytest.mark.parametrize("key", ["enable", "enable_rollout", "mtp_allow_fresh_head_on_resume", "spec_step_metrics"])
def test_booleans_accept_exactly_what_omegaconf_accepts(key, value):
    expected = _omegaconf_bool(value)
    if expected is None:
        with pytest.raises(MtpConfigError) as info:
            ExtendedMtpConfig(**{key: value})
        assert str(info.value) == (
            f"actor_rollout_ref.model.mtp.{key}={value!r} is invalid: expected a boolean: true or false "
            f"(also yes/no, on/off, y/n in any case, or an integer: 0 = false)"
        )
    else:
        kwargs = {key: value, "enable": True} if key == "enable_rollout" else {key: value}
        got = getattr(ExtendedMtpConfig(**kwargs), key)
        assert got is expected


@pytest.mark.parametrize(
    "settings, mode",
    [
        ({"enable": "yes", "enable_train": "no"}, "disabled"),
        ({"enable": True, "enable_train": "False", "detach_encoder": "on"}, "disabled"),
        ({"enable": "on", "enable_train": "yes", "detach_encoder": "off"}, "joint"),
        ({"enable": 1, "enable_train": "1", "detach_encoder": "0"}, "joint"),
        ({"enable": "true", "enable_train": "Y", "detach_encoder": "on"}, "standalone"),
    ],
)
def test_boolean_words_resolve_the_regime_as_booleans(settings, mode):
    cfg = ExtendedMtpConfig(**settings)
    assert cfg.mtp_training_mode == mode
    assert all(type(getattr(cfg, k)) is bool for k in ("enable", "enable_train", "enable_rollout", "detach_encoder"))


@pytest.mark.parametrize("key, value", [("enable_train", "maybe"), ("detach_encoder", "offf"),
                                        ("enable_rollout", "maybe"), ("enable", None), ("adaptive_speculation", 1.5)])
def test_bad_boolean_is_refused(key, value):
    with pytest.raises(MtpConfigError, match=rf"mtp\.{key}={value!r} is invalid: expected a boolean: true or false"):
        ExtendedMtpConfig(**{"enable": True, key: value})


def test_boolean_words_from_the_command_line_through_verl(make_checkpoint):
    # Hydra hands `enable_train=no` through as the string 'no' (the wrapper declares no types).
    overrides = ["actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=no",
                 "actor_rollout_ref.model.mtp.detach_encoder=off"]
    cfg = _run_config(overrides)
    assert cfg.actor_rollout_ref.model.mtp.enable_train == "no"
    assert validate_mtp_run_config(cfg).mtp_training_mode == "disabled"
    # verl's model-node conversion on both paths: Hydra `_target_` and OmegaConf.structured.
    for dataclass_type in (None, HFModelConfig):
        node = _model_node(make_checkpoint(name=f"m{dataclass_type is None}"))
        node.mtp = {"_target_": "verl.workers.config.MtpConfig", "enable": True, "enable_train": "no",
                    "enable_rollout": "off"}
        mtp = omega_conf_to_dataclass(node, dataclass_type=dataclass_type).mtp
        assert (mtp.mtp_training_mode, mtp.enable_train, mtp.enable_rollout) == ("disabled", False, False)
        node.mtp.enable_rollout = "maybe"
        with pytest.raises(Exception, match="enable_rollout"):
            omega_conf_to_dataclass(node, dataclass_type=dataclass_type)


# --- MTP depth detection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, depths",
    [
        ({"num_nextn_predict_layers": 1}, 1),  # MiMo, DeepSeek-V3, GLM-4.5
        ({"mtp_num_hidden_layers": 2}, 2),  # Qwen3-Next
        ({"text_config": {"mtp_num_hidden_layers": 1}}, 1),  # Qwen3.5 (multimodal wrapper)
        ({"num_nextn_predict_layers": 0}, 0),
        ({}, 0),
    ],
)
def test_detect_mtp_depths(config, depths):
    assert detect_mtp_depths(config) == depths


def test_detect_mtp_depths_on_transformers_config(make_checkpoint):
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(make_checkpoint(depths=2))
    assert detect_mtp_depths(hf) == 2


# --- both of verl's config-to-dataclass paths --------------------------------------------------

NEW_KEYS = {
    "mtp_training_mode": "joint",
    "mtp_loss_type": "rl",
    "mtp_coef_mode": "occ",
    "occ_scale": 0.5,
    "mtp_step_weight_beta": 0.8,
    "mtp_num_layers": 1,
}


def _model_node(path):
    return OmegaConf.create(
        {
            "_target_": "verl.workers.config.HFModelConfig",
            "path": path,
            "load_tokenizer": False,
            "mtp": {"_target_": "verl.workers.config.MtpConfig", "enable": False, **NEW_KEYS},
        }
    )


def _assert_new_keys(mtp):
    assert isinstance(mtp, ExtendedMtpConfig)
    for key, value in NEW_KEYS.items():
        assert getattr(mtp, key) == value
    assert mtp.enable and mtp.enable_train and not mtp.detach_encoder


def test_instantiate_path_accepts_new_keys(make_checkpoint):
    model = omega_conf_to_dataclass(_model_node(make_checkpoint(depths=2)))  # hydra `_target_` path
    _assert_new_keys(model.mtp)
    assert model.hf_config.num_nextn_predict_layers == 2  # MTP on: verl keeps the HF depth count


def test_structured_path_accepts_new_keys(make_checkpoint):
    # The path the vLLM / SGLang server actors take: OmegaConf.structured(HFModelConfig), no _target_.
    model = omega_conf_to_dataclass(_model_node(make_checkpoint(depths=2)), dataclass_type=HFModelConfig)
    _assert_new_keys(model.mtp)


def test_structured_path_rejects_bad_values_at_config_time(make_checkpoint):
    node = _model_node(make_checkpoint())
    node.mtp.mtp_loss_type = "bogus"
    with pytest.raises(MtpConfigError, match="valid choices are ce, rl"):
        omega_conf_to_dataclass(node, dataclass_type=HFModelConfig)


def test_structured_path_still_rejects_unknown_keys(make_checkpoint):
    node = _model_node(make_checkpoint())
    node.mtp["mtp_los_type"] = "rl"
    with pytest.raises(Exception, match="mtp_los_type"):
        omega_conf_to_dataclass(node, dataclass_type=HFModelConfig)


def test_rollout_config_structured_path():
    rollout = OmegaConf.structured(RolloutConfig)
    assert set(PLUGIN_MTP_FIELDS) <= set(rollout.mtp.keys())


def test_mtp_off_keeps_verl_behaviour(make_checkpoint):
    node = OmegaConf.create({"_target_": "verl.workers.config.HFModelConfig", "path": make_checkpoint(depths=1),
                             "load_tokenizer": False})
    model = omega_conf_to_dataclass(node)
    # No mtp node at all: dataclass __init__ uses verl's baked-in default; verl-mtp reads it
    # through as_extended(), which gives the (MTP-off) defaults.
    assert model.mtp.enable is False and as_extended(model.mtp).mtp_training_mode == "disabled"
    assert model.hf_config.num_nextn_predict_layers == 0  # verl zeroes it when MTP is off


# --- the wrapper config shipped in the package -------------------------------------------------


def test_wrapper_yaml_declares_every_plugin_key_with_the_dataclass_default():
    import verl_mtp.conf

    with open(os.path.join(os.path.dirname(verl_mtp.conf.__file__), "ppo_megatron_mtp.yaml")) as f:
        declared = yaml.safe_load(f)["actor_rollout_ref"]["model"]["mtp"]
    assert set(declared) == set(PLUGIN_MTP_FIELDS)
    defaults = {f.name: f.default for f in dataclasses.fields(ExtendedMtpConfig)}
    for key, value in declared.items():
        assert value == defaults[key] or (isinstance(value, float) and math.isclose(value, defaults[key])), key


def _compose(module, name, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=module, version_base=None):
        return compose(config_name=name, overrides=overrides)


def test_wrapper_composes_without_plus_and_stock_needs_plus():
    cfg = _compose("verl_mtp.conf", "ppo_megatron_mtp", ["actor_rollout_ref.model.mtp.mtp_loss_type=rl"])
    assert cfg.actor_rollout_ref.model.mtp.mtp_loss_type == "rl"
    assert cfg.actor_rollout_ref.actor.strategy == "megatron"
    # The rollout's view of the MTP config is the same node (verl interpolates it).
    assert cfg.actor_rollout_ref.rollout.mtp.mtp_loss_type == "rl"
    overrides = ["+actor_rollout_ref.model.mtp.mtp_training_mode=joint", "+actor_rollout_ref.model.mtp.mtp_loss_type=rl"]
    cfg = _compose("verl.trainer.config", "ppo_megatron_trainer", overrides)
    assert as_extended(cfg.actor_rollout_ref.model.mtp).mtp_loss_type == "rl"
    with pytest.raises(Exception, match=r"\+actor_rollout_ref\.model\.mtp\.mtp_loss_type"):
        _compose("verl.trainer.config", "ppo_megatron_trainer", ["actor_rollout_ref.model.mtp.mtp_loss_type=rl"])


# --- whole-run validation (driver) --------------------------------------------------------------


def _run_config(overrides, name="ppo_megatron_mtp", module="verl_mtp.conf"):
    return _compose(module, name, overrides)


def test_run_validation_rejects_non_megatron_strategy():
    cfg = _run_config(["+actor_rollout_ref.model.mtp.mtp_training_mode=joint"], "ppo_trainer", "verl.trainer.config")
    with pytest.raises(MtpConfigError, match=r"needs the Megatron engine, but actor_rollout_ref\.actor\.strategy='fsdp'"):
        validate_mtp_run_config(cfg)


def test_run_validation_rejects_model_without_mtp_layers(make_checkpoint):
    path = make_checkpoint(key=None)
    cfg = _run_config([f"actor_rollout_ref.model.path={path}", "actor_rollout_ref.model.mtp.enable=True"])
    with pytest.raises(MtpConfigError, match="the model declares no MTP layers"):
        validate_mtp_run_config(cfg)


def test_run_validation_rejects_too_many_depths(make_checkpoint):
    path = make_checkpoint(depths=1, key="mtp_num_hidden_layers", text_config=True)
    cfg = _run_config([f"actor_rollout_ref.model.path={path}", "actor_rollout_ref.model.mtp.mtp_training_mode=joint",
                       "actor_rollout_ref.model.mtp.mtp_num_layers=2"])
    with pytest.raises(MtpConfigError, match=r"mtp_num_layers=2 is invalid: the checkpoint has only 1 MTP depth"):
        validate_mtp_run_config(cfg)


def test_run_validation_rejects_speculative_rollout_on_unsupported_engine(make_checkpoint):
    cfg = _run_config([f"actor_rollout_ref.model.path={make_checkpoint()}", "actor_rollout_ref.model.mtp.enable=True",
                       "actor_rollout_ref.model.mtp.enable_rollout=True", "actor_rollout_ref.rollout.name=hf"])
    with pytest.raises(MtpConfigError, match=r"rollout\.name='hf'; valid choices are vllm, sglang"):
        validate_mtp_run_config(cfg)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["distillation.distillation_loss.use_task_rewards=False"], r"use_task_rewards=False: verl's distillation loss then drops"),
        (["actor_rollout_ref.model.mtp.occ_scope=mini_batch"], r"occ_scope='mini_batch' is not supported with distillation\.enabled=True"),
    ],
)
def test_run_validation_rejects_rl_loss_that_distillation_would_drop(make_checkpoint, extra, message):
    overrides = [f"actor_rollout_ref.model.path={make_checkpoint()}", "actor_rollout_ref.model.mtp.mtp_training_mode=joint",
                 "actor_rollout_ref.model.mtp.mtp_loss_type=rl", "actor_rollout_ref.model.mtp.mtp_coef_mode=occ",
                 "distillation.enabled=True"]
    with pytest.raises(MtpConfigError, match=message):
        validate_mtp_run_config(_run_config(overrides + extra))
    # micro-batch OCC (the default) with task rewards is accepted
    validate_mtp_run_config(_run_config(overrides))


def test_verl_validate_config_runs_mtp_validation_first():
    from verl.utils.config import validate_config

    cfg = _run_config(["actor_rollout_ref.model.mtp.mtp_loss_type=nope"])
    with pytest.raises(MtpConfigError, match="nope"):
        validate_config(cfg, use_reference_policy=False, use_critic=False)


# --- the engine applies mtp_num_layers ------------------------------------------------------


def _engine_config():
    from verl.workers.config import McoreEngineConfig

    return McoreEngineConfig(override_transformer_config={})


def _hf_model(path, **mtp):
    node = _model_node(path)
    node.mtp = {"_target_": "verl.workers.config.MtpConfig", **mtp}
    return omega_conf_to_dataclass(node)


def test_engine_check_applies_depth_override(make_checkpoint):
    from verl.utils.megatron_utils import check_mtp_config

    model = _hf_model(make_checkpoint(depths=2), mtp_training_mode="joint", mtp_num_layers=1)
    engine = _engine_config()
    check_mtp_config(model, engine)
    assert engine.override_transformer_config["mtp_num_layers"] == 1
    assert engine.override_transformer_config["mtp_loss_scaling_factor"] == 0.1  # verl's own behaviour kept

    model = _hf_model(make_checkpoint(depths=2, name="m2"), mtp_training_mode="joint")
    engine = _engine_config()
    check_mtp_config(model, engine)
    assert "mtp_num_layers" not in engine.override_transformer_config  # no override: the checkpoint's count


def test_engine_check_rejects_override_beyond_checkpoint(make_checkpoint):
    from verl.utils.megatron_utils import check_mtp_config

    model = _hf_model(make_checkpoint(depths=1), mtp_training_mode="standalone", mtp_num_layers=3)
    with pytest.raises(MtpConfigError, match="the checkpoint has only 1 MTP depth"):
        check_mtp_config(model, _engine_config())


def test_engine_check_when_mtp_off_is_verl_behaviour(make_checkpoint):
    from verl.utils.megatron_utils import check_mtp_config

    model = _hf_model(make_checkpoint(depths=1), enable=False)
    engine = _engine_config()
    check_mtp_config(model, engine)
    assert engine.override_transformer_config["mtp_num_layers"] is None
