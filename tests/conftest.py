"""Shared test fixtures.

Everything here is offline: tiny checkpoints are written on first use into a
session-scoped temporary directory (see ``tests/tiny_models.py``).

Fixtures:

* ``tiny_models``: session-scoped lazy mapping ``arch -> Path`` of a checkpoint directory,
  loadable by transformers and vLLM.  ``tiny_models["llama_gqa"]`` builds on first access.
* ``hf_models``: session-scoped lazy mapping ``arch -> model``: the checkpoint loaded with
  ``AutoModelForCausalLM`` (fp32, eager attention so ``output_attentions`` works, eval
  mode).  Shared between tests: do not modify the models.
* ``torch_single_thread``: module-scoped; runs torch on one intra-op thread for the
  module.  Tiny-model tests are all small ops, and with more threads than free cores
  (other jobs on the box) OpenMP spin-waiting made them 10x-40x slower.  Opt in with
  ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``.
* ``k_reader``: runs a test twice, with the CPU scorer's C reader of K and without it
  (``TOVA_VLLM_NATIVE=0``: torch copies K, as on a machine without a C compiler).

Engine fixtures belong in their own sections below (or in a plugin module listed in
``pytest_plugins``) so that this file stays a thin index.
"""

from __future__ import annotations

import os

# Before anything imports transformers or huggingface_hub: never reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402
from typing import Callable, Generic, TypeVar  # noqa: E402

import pytest  # noqa: E402

from tiny_models import ARCHS, EXTRA_ARCHS, build_tiny_model  # noqa: E402

T = TypeVar("T")


class LazyMap(Generic[T]):
    """A read-only mapping whose values are made on first access and then cached."""

    def __init__(self, keys, make: Callable[[str], T]):
        self._keys = tuple(keys)
        self._make = make
        self._cache: dict[str, T] = {}

    def __getitem__(self, key: str) -> T:
        if key not in self._keys:
            raise KeyError(f"{key!r}; known: {self._keys}")
        if key not in self._cache:
            self._cache[key] = self._make(key)
        return self._cache[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self):
        return self._keys


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> LazyMap[Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return LazyMap(ARCHS + EXTRA_ARCHS, lambda arch: build_tiny_model(arch, root / arch))


@pytest.fixture(scope="session")
def hf_models(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    def load(arch: str):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_models[arch], dtype=torch.float32, attn_implementation="eager"
        )
        return model.eval()

    return LazyMap(tiny_models.keys(), load)


@pytest.fixture(scope="module")
def torch_single_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["in place", "torch copy"])
def k_reader(request, monkeypatch):
    """Both ways the CPU scorer reads K: the C reader (``native.py``) and, as without a
    C compiler, torch's block copy."""
    from tova_vllm.engine import native

    if request.param == "torch copy":
        monkeypatch.setenv("TOVA_VLLM_NATIVE", "0")
    native.library.cache_clear()
    assert (native.library() is None) == (request.param == "torch copy")
    yield request.param
    monkeypatch.undo()
    native.library.cache_clear()
