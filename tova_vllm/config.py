"""The user-facing setting: ``additional_config={"tova": {...}}``, parsed and validated once.

Nothing else in the package reads ``additional_config`` directly; every process that needs
the settings calls :func:`settings_from_additional_config` on the config it was handed.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from .policies.eviction import DEFAULT_SINKS, POLICY_NAMES, EvictionPolicy

CONFIG_KEY = "tova"
# Per-request budget: SamplingParams(extra_args={...}) offline, vllm_xargs over HTTP.
REQUEST_CACHE_SIZE_ARG = "tova_cache_size"
REQUEST_POLICY_ARG = "tova_policy"
REQUEST_ARGS = (REQUEST_CACHE_SIZE_ARG, REQUEST_POLICY_ARG)
REQUEST_ARG_PREFIX = "tova_"
PROMPT_MODES = ("prompt", "chunked")


class TovaConfigError(Exception):
    """A bad ``additional_config["tova"]`` value; the message names the field.

    Deliberately not a ValueError: it is raised inside ``VllmConfig.__post_init__``, and
    pydantic would wrap a ValueError into a ValidationError that buries the message.
    """


class TovaRequestError(ValueError):
    """A bad per-request TOVA argument (HTTP 400 on the server)."""

    def __init__(self, message: str, parameter: str, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value


@dataclass(frozen=True)
class TovaSettings:
    cache_size: int
    """C: the most tokens of KV cache each request keeps per layer."""
    policy: str = "tova"
    """A registered policy name (``policies.POLICY_NAMES``): ``tova`` (the paper) or a
    baseline."""
    sinks: int = DEFAULT_SINKS
    """``sink_window``: the sequence's first tokens that are always kept."""
    recent: Optional[int] = None
    """``h2o``: the most recent tokens that are always kept (default: half the budget)."""
    prompt_mode: str = "prompt"
    """``prompt``: the paper (whole prompt, then top C); ``chunked``: evict after every
    ``prompt_chunk`` prompt tokens, so peak memory is C + prompt_chunk."""
    prompt_chunk: int = 512

    @property
    def eviction_chunk(self) -> Optional[int]:
        """The fixed prompt stride between evictions, or None for the paper's mode."""
        return self.prompt_chunk if self.prompt_mode == "chunked" else None

    def eviction_policy(self, name: Optional[str] = None) -> EvictionPolicy:
        """The server's policy, or the named one with the server's sinks/recent settings."""
        return _eviction_policy(name or self.policy, self.sinks, self.recent)

    @classmethod
    def parse(cls, raw: Any) -> "TovaSettings":
        if not isinstance(raw, Mapping):
            raise TovaConfigError(
                f'additional_config["{CONFIG_KEY}"] must be a mapping such as '
                f'{{"cache_size": 512}}, got {raw!r}'
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TovaConfigError(
                f'additional_config["{CONFIG_KEY}"]: unknown key(s) {unknown}; '
                f"valid keys are {sorted(known)}"
            )
        if "cache_size" not in raw:
            raise TovaConfigError(
                f'additional_config["{CONFIG_KEY}"]["cache_size"] is required '
                "(the number of tokens each request keeps per layer)"
            )
        settings = cls(
            cache_size=_positive_int("cache_size", raw["cache_size"]),
            policy=_choice("policy", raw.get("policy", "tova"), POLICY_NAMES),
            sinks=_non_negative_int("sinks", raw.get("sinks", DEFAULT_SINKS)),
            recent=(None if raw.get("recent") is None
                    else _non_negative_int("recent", raw["recent"])),
            prompt_mode=_choice("prompt_mode", raw.get("prompt_mode", "prompt"), PROMPT_MODES),
            prompt_chunk=_positive_int("prompt_chunk", raw.get("prompt_chunk", 512)),
        )
        # Explicit sinks/recent also bound per-request policies, so check them whatever
        # the server's default policy is; the default sinks only matter for sink_window.
        for name in ("sinks", "recent"):
            value = getattr(settings, name)
            explicit = name in raw or (name == "sinks" and settings.policy == "sink_window")
            if explicit and value is not None and value >= settings.cache_size:
                raise TovaConfigError(
                    f'additional_config["{CONFIG_KEY}"]["{name}"] ({value}) must be smaller '
                    f"than cache_size ({settings.cache_size}): those tokens are always kept"
                )
        return settings


def _int_at_least(minimum: int, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TovaConfigError(
            f'additional_config["{CONFIG_KEY}"]["{name}"] must be an integer >= {minimum}, '
            f"got {value!r}"
        )
    return value


def _positive_int(name: str, value: Any) -> int:
    return _int_at_least(1, name, value)


def _non_negative_int(name: str, value: Any) -> int:
    return _int_at_least(0, name, value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise TovaConfigError(
            f'additional_config["{CONFIG_KEY}"]["{name}"] must be one of {list(allowed)}, '
            f"got {value!r}"
        )
    return value


def settings_from_additional_config(additional_config: Any) -> Optional[TovaSettings]:
    """The validated settings, or None when TOVA is not enabled."""
    if not additional_config or CONFIG_KEY not in additional_config:
        return None
    return TovaSettings.parse(additional_config[CONFIG_KEY])


def request_cache_size(extra_args: Optional[Mapping[str, Any]], server_cache_size: int) -> int:
    """The budget of one request: ``extra_args["tova_cache_size"]`` or the server's.

    A request may only lower the budget: the server's ``cache_size`` is the memory plan
    (blocks per request, admission, maximum concurrency) and is never exceeded.
    """
    if not extra_args or REQUEST_CACHE_SIZE_ARG not in extra_args:
        return server_cache_size
    value = extra_args[REQUEST_CACHE_SIZE_ARG]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= server_cache_size:
        raise TovaRequestError(
            f"{REQUEST_CACHE_SIZE_ARG} must be an integer from 1 to {server_cache_size} "
            f"(the server's cache_size), got {_sent(value)}",
            REQUEST_CACHE_SIZE_ARG, value,
        )
    return value


def request_policy(extra_args: Optional[Mapping[str, Any]], settings: TovaSettings,
                   cache_size: int) -> EvictionPolicy:
    """The policy of one request: ``extra_args["tova_policy"]`` or the server's.

    ``cache_size`` is the request's budget (see :func:`request_cache_size`); a lowered
    budget must still leave room past the sinks / recent window.
    """
    name = settings.policy
    if extra_args and REQUEST_POLICY_ARG in extra_args:
        name = extra_args[REQUEST_POLICY_ARG]
        if not isinstance(name, str) or name not in POLICY_NAMES:
            raise TovaRequestError(
                f"{REQUEST_POLICY_ARG} must be one of {list(POLICY_NAMES)}, got {_sent(name)}",
                REQUEST_POLICY_ARG, name,
            )
    policy = settings.eviction_policy(name)
    try:
        policy.check_budget(cache_size)
    except ValueError as err:
        raise TovaRequestError(f"{REQUEST_POLICY_ARG}={name}: {err}", REQUEST_POLICY_ARG,
                               name) from None
    return policy


def _sent(value: Any) -> str:
    """A value as the client wrote it: JSON spells booleans true/false, Python True/False."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return repr(value)


@functools.lru_cache(maxsize=64)
def _eviction_policy(name: str, sinks: int, recent: Optional[int]) -> EvictionPolicy:
    # The worker resolves every request of every step: build each policy object once.
    return EvictionPolicy(name, sinks=sinks, recent=recent)


def resolve_request(extra_args: Optional[Mapping[str, Any]], settings: TovaSettings
                    ) -> tuple[int, EvictionPolicy]:
    """A request's budget and policy; raises :class:`TovaRequestError` naming the argument."""
    if not extra_args:  # the common case, resolved by the worker per request and step
        return settings.cache_size, settings.eviction_policy()
    unknown = sorted(k for k in (extra_args or {})
                     if isinstance(k, str) and k.startswith(REQUEST_ARG_PREFIX)
                     and k not in REQUEST_ARGS)
    if unknown:
        raise TovaRequestError(
            f"unknown per-request TOVA argument(s) {unknown}; the accepted ones are "
            f"{list(REQUEST_ARGS)} (sinks, recent and the prompt mode are server settings)",
            unknown[0], extra_args[unknown[0]],
        )
    cache_size = request_cache_size(extra_args, settings.cache_size)
    return cache_size, request_policy(extra_args, settings, cache_size)
