"""The verl.plugins entry point: activation, opt-out, idempotence, undo, loud failures."""

import json

import pytest

STATUS_SNIPPET = """
import json, sys
import verl
from verl.workers.config import MtpConfig
state = {
    "plugin_loaded": "verl_mtp.plugin" in sys.modules,
    "mtp_config_class": MtpConfig.__module__ + "." + MtpConfig.__qualname__,
    "megatron_imported": any(m == "megatron" or m.startswith("megatron.") for m in sys.modules),
}
if state["plugin_loaded"]:
    state["status"] = sys.modules["verl_mtp.plugin"].status()
print("STATE=" + json.dumps(state))
"""


def _state(proc):
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("STATE=")][-1]
    return json.loads(line[len("STATE="):])


def test_import_verl_alone_activates_plugin(run_python):
    state = _state(run_python(STATUS_SNIPPET))
    assert state["plugin_loaded"]
    assert state["mtp_config_class"] == "verl_mtp.config.ExtendedMtpConfig"
    assert set(state["status"].values()) == {"applied"}
    # Cheap at import: megatron-side patches are deferred until verl imports megatron itself.
    assert not state["megatron_imported"]


def test_external_plugins_none_disables_it(run_python):
    state = _state(run_python(STATUS_SNIPPET, env={"VERL_USE_EXTERNAL_PLUGINS": "none"}))
    assert not state["plugin_loaded"]
    assert state["mtp_config_class"] == "verl.workers.config.model.MtpConfig"


def test_importing_verl_mtp_before_verl_works(run_python):
    proc = run_python(
        """
        import verl_mtp.config, verl_mtp.plugin as plugin
        from verl.workers.config import MtpConfig
        assert MtpConfig is verl_mtp.config.ExtendedMtpConfig, MtpConfig
        assert set(plugin.status().values()) == {"applied"}, plugin.status()
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "FAILED" not in proc.stderr


def test_config_imported_first_gets_its_patch_when_its_import_finishes(run_python):
    # verl_mtp.config applies nothing itself: the plugin (loaded by the config's own `import verl`)
    # waits for the config module to finish, then patches verl, and stops watching the package.
    proc = run_python(
        """
        import sys, types
        import verl_mtp.config
        import verl.workers.config.model as model_mod
        print("FIELD=" + model_mod.HFModelConfig.__dataclass_fields__["mtp"].type.__qualname__)
        print("PACKAGE_CLASS=" + str(type(sys.modules["verl_mtp"]) is types.ModuleType))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "FIELD=ExtendedMtpConfig" in proc.stdout and "PACKAGE_CLASS=True" in proc.stdout
    with open(verl_mtp_file("config.py")) as source:
        assert "apply_patches" not in source.read()


def verl_mtp_file(name):
    import os

    import verl_mtp

    return os.path.join(os.path.dirname(verl_mtp.__file__), name)


DENY_SNIPPET = """
import json
import verl
from verl_mtp import plugin
from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.patches.core import require_patches
result = {"status": plugin.status()}
for name, mtp in {"ce": ExtendedMtpConfig(mtp_training_mode="standalone"), "off": ExtendedMtpConfig()}.items():
    try:
        require_patches(mtp, "test")
        result[name] = "ok"
    except Exception as exc:
        result[name] = type(exc).__name__ + ": " + str(exc)
print("RESULT=" + json.dumps(result))
"""


def _result(proc):
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT=")][-1]
    return json.loads(line[len("RESULT="):])


def test_env_var_denies_a_patch_and_a_run_that_needs_it_names_the_env_var(run_python):
    result = _result(run_python(DENY_SNIPPET, env={"VERL_MTP_PATCHES": "-mtp_checkpoint, -spec_step_metrics"}))
    status = result["status"]
    assert status["mtp_checkpoint"] == status["spec_step_metrics"] == (
        "switched off by VERL_MTP_PATCHES='-mtp_checkpoint, -spec_step_metrics'")
    assert {v for k, v in status.items() if k not in ("mtp_checkpoint", "spec_step_metrics")} == {"applied"}
    assert result["ce"].startswith("PatchNotActiveError")
    assert "patch 'mtp_checkpoint' is switched off by VERL_MTP_PATCHES" in result["ce"]
    assert "patch 'spec_step_metrics'" not in result["ce"]  # not a patch the trainer needs
    assert result["off"] == "ok"


def test_env_var_allows_only_the_named_patches(run_python):
    result = _result(run_python(DENY_SNIPPET, env={"VERL_MTP_PATCHES": "extended_mtp_config,driver_mtp_validation"}))
    applied = {k for k, v in result["status"].items() if v == "applied"}
    assert applied == {"extended_mtp_config", "driver_mtp_validation"}
    assert "patch 'mtp_forward' is switched off by VERL_MTP_PATCHES" in result["ce"]


def test_env_var_with_an_unknown_name_is_refused_naming_the_patches(run_python):
    from verl_mtp import plugin
    from verl_mtp.errors import MtpConfigError

    for bad in ("mtp_forwrd", "-mtp_forward,bogus", "mtp_forward,-mtp_checkpoint"):
        with pytest.raises(MtpConfigError, match=r"VERL_MTP_PATCHES=.* is invalid: .*patch names: extended_mtp_config, "
                                                 r"driver_mtp_validation, .*mtp_complete_export"):
            plugin.selected_patches(bad)
    assert [p.name for p in plugin.selected_patches(" all ")] == [p.name for p in plugin.selected_patches("")]
    # At plugin load (inside `import verl`, which would hide an exception): loud, nothing applied,
    # and a run with MTP stops naming the setting.
    proc = run_python(DENY_SNIPPET, env={"VERL_MTP_PATCHES": "mtp_forwrd"})
    result = _result(proc)
    assert "VERL_MTP_PATCHES='mtp_forwrd' is invalid" in proc.stderr and "patch names: extended_mtp_config" in proc.stderr
    assert not any(v == "applied" for v in result["status"].values())
    assert "switched off by an invalid VERL_MTP_PATCHES" in result["ce"]
    assert result["off"] == "ok"


def test_broken_host_is_reported_loudly_and_import_survives(run_python):
    # verl without the dataclass field the config patch extends: the patch must refuse, say so
    # on stderr with the versions found, and leave `import verl` working.
    proc = run_python(
        """
        import verl
        from verl.workers.config.model import HFModelConfig
        del HFModelConfig.__dataclass_fields__["mtp"]
        import verl_mtp.plugin as plugin
        print("STATUS=" + plugin.status()["extended_mtp_config"])
        """,
        env={"VERL_USE_EXTERNAL_PLUGINS": "none"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "[verl-mtp] ERROR" in proc.stderr
    assert "extended_mtp_config" in proc.stderr
    assert "has no dataclass field 'mtp'" in proc.stderr
    assert "verl 0.9.1" in proc.stderr and "megatron-core" in proc.stderr
    assert "STATUS=verl-mtp: patch 'extended_mtp_config' FAILED" in proc.stdout


def test_untested_verl_version_is_refused_loudly(run_python):
    proc = run_python(
        """
        import verl
        verl.__version__ = "0.99.0"
        import verl_mtp.plugin as plugin
        from verl.workers.config import MtpConfig
        print("CLASS=" + MtpConfig.__module__)
        """,
        env={"VERL_USE_EXTERNAL_PLUGINS": "none"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "verl 0.99.0 is not a version verl-mtp was tested with" in proc.stderr
    assert "VERL_MTP_ALLOW_UNTESTED_VERL=1" in proc.stderr
    assert "CLASS=verl.workers.config.model" in proc.stdout


def test_apply_is_idempotent_and_undo_restores_verl():
    import verl.utils.config as verl_config
    import verl.workers.config as config_pkg
    import verl.workers.config.model as model_mod
    import verl.workers.config.rollout as rollout_mod

    from verl_mtp import plugin
    from verl_mtp.config import ExtendedMtpConfig

    import verl.utils.megatron_utils as megatron_utils
    import verl.workers.engine.megatron.transformer_impl as engine_module
    import verl.workers.engine_workers as engine_workers
    from verl.workers.utils.losses import ppo_loss

    from verl_mtp.loss import MtpPolicyLoss

    def deferred_patched():
        return (
            isinstance(engine_workers.ppo_loss, MtpPolicyLoss),
            hasattr(megatron_utils.check_mtp_config, "__verl_mtp_original__"),
            hasattr(engine_module.MegatronEngineWithLMHead._lm_head_logits_processor, "__verl_mtp_original__"),
            hasattr(engine_module.patch_engine_mtp, "__verl_mtp_original__"),
        )

    assert deferred_patched() == (True, True, True, True)
    wrapped = verl_config.validate_config
    original = wrapped.__verl_mtp_original__
    assert plugin.apply_patches()
    assert verl_config.validate_config is wrapped  # no double wrapping

    plugin.deactivate()
    try:
        assert deferred_patched() == (False, False, False, False)
        assert engine_workers.ppo_loss is ppo_loss
        assert verl_config.validate_config is original
        assert config_pkg.MtpConfig is model_mod.MtpConfig is rollout_mod.MtpConfig
        assert config_pkg.MtpConfig is not ExtendedMtpConfig
        for owner in (model_mod.HFModelConfig, rollout_mod.RolloutConfig):
            assert owner.__dataclass_fields__["mtp"].type is model_mod.MtpConfig
        assert not any(plugin.status()[name] == "applied" for name in plugin.status())
    finally:
        assert plugin.apply_patches()
    assert config_pkg.MtpConfig is ExtendedMtpConfig
    assert verl_config.validate_config.__verl_mtp_original__ is original
    assert deferred_patched() == (True, True, True, True)
    assert engine_workers.ppo_loss.stock_loss is ppo_loss  # re-applied on the original, not nested


def test_a_failing_patch_is_reported_and_others_still_apply(capsys):
    from verl_mtp import plugin
    from verl_mtp.patches.core import Patch

    def boom():
        raise RuntimeError("target moved")

    broken = Patch("deliberately_broken", "test patch", apply_fn=boom, undo_fn=lambda saved: None)
    applied = Patch("works", "test patch", apply_fn=lambda: {"ok": True}, undo_fn=lambda saved: None)
    with pytest.warns(plugin.VerlMtpPluginWarning, match="deliberately_broken.*target moved"):
        assert not plugin.apply_patches((broken, applied))
    assert applied.applied and not broken.applied
    err = capsys.readouterr().err
    assert "[verl-mtp] ERROR" in err and "deliberately_broken" in err and "verl 0.9.1" in err
    assert "Traceback (most recent call last)" in err and "in boom" in err


def test_deferred_megatron_patch_wraps_check_mtp_config_on_import(run_python):
    proc = run_python(
        """
        import sys, verl
        assert "verl.utils.megatron_utils" not in sys.modules
        import verl.utils.megatron_utils as mu
        print("WRAPPED=" + str(hasattr(mu.check_mtp_config, "__verl_mtp_original__")))
        from verl.workers.engine.megatron import transformer_impl
        print("ENGINE_SEES=" + str(transformer_impl.check_mtp_config is mu.check_mtp_config))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "WRAPPED=True" in proc.stdout
    assert "ENGINE_SEES=True" in proc.stdout
