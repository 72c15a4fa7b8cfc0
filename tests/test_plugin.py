"""The plugin as vLLM loads it: inert unless enabled, strict when enabled."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

import engine_harness  # noqa: F401  (in-process engine settings)
from tova_vllm import _patches
from tova_vllm.config import TovaConfigError
from tova_vllm.engine.config_check import IncompatibleWithTova

GENERATE = textwrap.dedent("""
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=512, block_size=32,
                  enforce_eager=True, seed=0)
        prompts = [{"prompt_token_ids": [3 + (i * 37) % 256 for i in range(n)]} for n in (5, 100, 300)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        import tova_vllm
        print("RESULT", json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                    "plugin_loaded": tova_vllm._registered}))
""")


def _generate(model_dir, tmp_path, env_updates):
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    env = {**os.environ, **env_updates}
    env.pop("VLLM_PLUGINS", None) if "VLLM_PLUGINS" not in env_updates else None
    proc = subprocess.run([sys.executable, str(script), str(model_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_installed_but_not_enabled_changes_nothing(tiny_models, tmp_path):
    with_plugin = _generate(tiny_models["llama_gqa"], tmp_path, {})
    without_plugin = _generate(tiny_models["llama_gqa"], tmp_path, {"VLLM_PLUGINS": ""})
    assert with_plugin["plugin_loaded"] is True
    assert without_plugin["plugin_loaded"] is False
    assert with_plugin["tokens"] == without_plugin["tokens"]


@pytest.mark.parametrize("bad", [0, -3, "abc"])
def test_bad_cache_size_fails_at_startup(bad, tiny_models):
    from vllm import LLM

    with pytest.raises(TovaConfigError, match=r'\["cache_size"\] must be an integer >= 1'):
        LLM(model=str(tiny_models["llama_gqa"]), additional_config={"tova": {"cache_size": bad}})


def test_unknown_key_fails_at_startup(tiny_models):
    from vllm import LLM

    with pytest.raises(TovaConfigError, match="unknown key"):
        LLM(model=str(tiny_models["llama_gqa"]),
            additional_config={"tova": {"cache_size": 8, "window": 4}})


def test_quantized_kv_cache_is_rejected(tiny_models):
    from vllm import LLM

    # The refusal names the setting to change.
    with pytest.raises(IncompatibleWithTova, match="kv_cache_dtype.*unset --kv-cache-dtype"):
        LLM(model=str(tiny_models["llama_gqa"]), kv_cache_dtype="fp8",
            additional_config={"tova": {"cache_size": 8}})


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_caching_stays_as_set(caching, tiny_models):
    """TOVA evicts copy-on-write when prefix caching is on, so it leaves the setting alone
    and its start-up line says which way it runs."""
    from vllm.engine.arg_utils import EngineArgs

    from tova_vllm.config import settings_from_additional_config
    from tova_vllm.engine.config_check import startup_line

    tova = {"tova": {"cache_size": 8}}
    args = EngineArgs(model=str(tiny_models["llama_gqa"]), enable_prefix_caching=caching,
                      additional_config=tova)
    assert args.create_engine_config().cache_config.enable_prefix_caching is caching
    line = startup_line(settings_from_additional_config(tova), caching, "K read in place")
    assert ("prefix caching on (copy-on-write" in line) == caching, line
    assert ("prefix caching off" in line) != caching, line
    assert "; CPU scoring: K read in place." in line, line


def test_version_gate(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    monkeypatch.delenv(_patches.VERSION_OVERRIDE_ENV, raising=False)
    with pytest.raises(_patches.UnsupportedVllmVersion, match="supports vLLM 0.32"):
        _patches.check_vllm_version()
    monkeypatch.setenv(_patches.VERSION_OVERRIDE_ENV, "1")
    _patches.check_vllm_version()  # loud warning, no error
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    monkeypatch.delenv(_patches.VERSION_OVERRIDE_ENV)
    _patches.check_vllm_version()


def test_patches_are_idempotent_and_documented():
    from vllm.config import VllmConfig

    for name, patch in _patches.PATCHES.items():
        assert patch.why and patch.touches and patch.removal, name
        _patches.apply_patch(name)
    wrapped = VllmConfig.__post_init__
    _patches.apply_patch("config_validates_tova")
    assert VllmConfig.__post_init__ is wrapped
    assert getattr(wrapped.__tova_original__, "__tova_original__", None) is None


def test_patches_are_applied_by_stage():
    """Each patch runs at exactly its stage; a stage no patch names is a typo, refused."""
    assert {p.stage for p in _patches.PATCHES.values()} <= set(_patches.STAGES)
    for stage in _patches.STAGES:
        ran = []
        saved = dict(_patches.PATCHES)
        try:
            for name, patch in saved.items():
                _patches.PATCHES[name] = dataclasses.replace(patch, apply=ran.append)
            _patches.apply_patches(stage)
        finally:
            _patches.PATCHES.clear()
            _patches.PATCHES.update(saved)
        assert ran == [n for n, p in saved.items() if p.stage == stage], stage
    with pytest.raises(ValueError, match="unknown patch stage"):
        _patches.apply_patches("tova worker ")


def test_vllm_command_starts_on_the_cpu_build():
    """vllm-cpu's `vllm` command crashes unless the install step added the version alias."""
    proc = subprocess.run(["vllm", "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0.32.0" in proc.stdout


def test_sliding_window_model_is_rejected_naming_the_layer_kind(tiny_models, tmp_path):
    import shutil

    from vllm import LLM

    model_dir = tmp_path / "mistral_swa"
    shutil.copytree(tiny_models["mistral"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["sliding_window"] = 64
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleWithTova, match="sliding-window attention"):
        LLM(model=str(model_dir), additional_config={"tova": {"cache_size": 8}})


def test_layer_reading_another_layers_kv_cache_is_refused(tiny_models):
    """Cross-layer KV sharing: the sharing layer would evict its target's cache a second
    time, so TOVA refuses the layer when it is built (before any memory is planned)."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    from tova_vllm.engine.cpu_backend import TovaCPUImpl
    from tova_vllm.engine.layer_setup import UnsupportedLayerError

    config = VllmConfig(model_config=ModelConfig(model=str(tiny_models["llama_gqa"]),
                                                 dtype="float32"),
                        additional_config={"tova": {"cache_size": 8}})
    with set_current_vllm_config(config):
        with pytest.raises(UnsupportedLayerError, match="KV cache shared between layers"):
            TovaCPUImpl(num_heads=8, head_size=32, scale=0.1, num_kv_heads=2,
                        alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto",
                        kv_sharing_target_layer_name="model.layers.0.self_attn.attn")
