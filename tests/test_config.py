"""The one user-facing setting, validated once, with messages that name the field."""

from __future__ import annotations

import re

import pytest

from tova_vllm.config import (
    TovaConfigError,
    TovaRequestError,
    TovaSettings,
    resolve_request,
    settings_from_additional_config,
)
from tova_vllm.policies import EvictionPolicy


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
        ({"cache_size": 8, "policy": "sink_window", "sinks": -1}, "sinks"),
        ({"cache_size": 8, "policy": "sink_window", "sinks": 8}, "sinks"),
        ({"cache_size": 4, "policy": "sink_window"}, "sinks"),  # default 4 sinks
        ({"cache_size": 8, "sinks": 2.0}, "sinks"),
        ({"cache_size": 8, "policy": "h2o", "recent": 8}, "recent"),
        ({"cache_size": 8, "recent": "half"}, "recent"),
        ({"cache_size": 8, "recent": 9}, "recent"),  # explicit: bounds per-request h2o
    ],
)
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(TovaConfigError, match=field):
        TovaSettings.parse(raw)


def test_not_a_mapping():
    with pytest.raises(TovaConfigError, match="mapping"):
        settings_from_additional_config({"tova": 512})


def test_policy_settings():
    settings = TovaSettings.parse({"cache_size": 64, "policy": "h2o", "recent": 10, "sinks": 2})
    assert settings.eviction_policy() == EvictionPolicy("h2o", sinks=2, recent=10)
    assert settings.eviction_policy("window") == EvictionPolicy("window", sinks=2, recent=10)
    # The default sinks only constrain sink_window: TOVA with C = 2 is fine.
    assert TovaSettings.parse({"cache_size": 2}).eviction_policy().name == "tova"


def test_per_request_policy_and_budget():
    settings = TovaSettings.parse({"cache_size": 64})
    assert resolve_request(None, settings) == (64, EvictionPolicy("tova"))
    assert resolve_request({"tova_policy": "window", "tova_cache_size": 16}, settings) == (
        16, EvictionPolicy("window"))
    for extra, parameter in (
        ({"tova_policy": "random"}, "tova_policy"),
        ({"tova_policy": None}, "tova_policy"),
        ({"tova_policy": "sink_window", "tova_cache_size": 3}, "tova_policy"),
        ({"tova_cache_size": 65}, "tova_cache_size"),
    ):
        with pytest.raises(TovaRequestError, match=parameter) as info:
            resolve_request(extra, settings)
        assert info.value.parameter == parameter


@pytest.mark.parametrize("value, said", [(True, "got true (a boolean)"),
                                         (False, "got false (a boolean)")])
def test_boolean_budget_is_refused_as_sent(value, said):
    settings = TovaSettings.parse({"cache_size": 64})
    with pytest.raises(TovaRequestError, match=re.escape(said)) as info:
        resolve_request({"tova_cache_size": value}, settings)
    assert info.value.value is value


@pytest.mark.parametrize("key", ["tova_cache_sizee", "tova_sinks", "tova_recent"])
def test_unknown_request_key_is_refused_naming_the_accepted_ones(key):
    settings = TovaSettings.parse({"cache_size": 64})
    with pytest.raises(TovaRequestError) as info:
        resolve_request({key: 8, "other_plugin_arg": 1}, settings)
    assert info.value.parameter == key
    assert key in str(info.value) and "'tova_cache_size', 'tova_policy'" in str(info.value)
    # Keys of other plugins pass.
    assert resolve_request({"other_plugin_arg": 1}, settings) == (64, EvictionPolicy("tova"))
