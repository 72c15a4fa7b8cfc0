"""The one user-facing setting, validated once, with messages that name the field."""

from __future__ import annotations

import pytest

from tova_vllm.config import TovaConfigError, TovaSettings, settings_from_additional_config


@pytest.mark.parametrize("additional_config", [None, {}, {"other_plugin": {"x": 1}}])
def test_absent_key_means_disabled(additional_config):
    assert settings_from_additional_config(additional_config) is None


def test_defaults_and_full_settings():
    assert settings_from_additional_config({"tova": {"cache_size": 512}}) == TovaSettings(
        cache_size=512, policy="tova", prompt_mode="prompt", prompt_chunk=512)
    chunked = TovaSettings.parse({"cache_size": 64, "prompt_mode": "chunked", "prompt_chunk": 16})
    assert chunked.eviction_chunk == 16
    assert TovaSettings.parse({"cache_size": 64, "prompt_chunk": 16}).eviction_chunk is None


@pytest.mark.parametrize(
    "raw,field",
    [
        ({"cache_size": 0}, "cache_size"),
        ({"cache_size": -3}, "cache_size"),
        ({"cache_size": "abc"}, "cache_size"),
        ({"cache_size": 1.5}, "cache_size"),
        ({"cache_size": True}, "cache_size"),
        ({"cache_size": None}, "cache_size"),
        ({}, "cache_size"),
        ({"cache_size": 8, "prompt_mode": "streaming"}, "prompt_mode"),
        ({"cache_size": 8, "prompt_chunk": 0}, "prompt_chunk"),
        ({"cache_size": 8, "policy": "random"}, "policy"),
        ({"cache_size": 8, "cache_sise": 8}, "cache_sise"),
    ],
)
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(TovaConfigError, match=field):
        TovaSettings.parse(raw)


def test_not_a_mapping():
    with pytest.raises(TovaConfigError, match="mapping"):
        settings_from_additional_config({"tova": 512})
