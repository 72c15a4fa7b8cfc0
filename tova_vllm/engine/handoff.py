"""State that one vLLM hook hands to another, where vLLM 0.32 offers no explicit path.

TOVA plugs into vLLM at hooks that share no argument: an attention impl's ``__init__``, a
backend's ``customize_spec`` classmethod, a metadata builder's ``build``.  Wherever vLLM
passes what TOVA needs, it is read from there; the two hand-offs that vLLM leaves no path
for live here, as objects (no module globals elsewhere), each saying which hook writes it,
which reads it and why vLLM forces it.  A read that comes before its write raises
:class:`HandoffOrderError` instead of quietly running without TOVA, and
``tests/test_handoff.py`` fails if vLLM changes the order.

Hand-offs through declared attributes of tova-vllm's own classes (not module state):

* ``TovaManager.requests`` (``spec.py``): the scheduler's request table, written by the
  ``scheduler_shares_requests`` patch after ``Scheduler.__init__``, read by the manager's
  allocation methods, which vLLM calls with a request id only.
* ``TovaManager.stats`` (``spec.py``): the scheduler's TOVA counters (a
  ``stats_channel.StatsWriter``), written by the ``scheduler_reports_evictions`` patch
  after ``Scheduler.__init__`` and read by its ``schedule`` and ``make_stats`` wrappers;
  ``SchedulerStats`` has no field a plugin may fill (``patches/05``).

Not a hand-off but an inference, also explicit only with an upstream change:
``step_context.host_block_table`` finds the host half of the runner's block table by
matching ``data_ptr()`` (``patches/03`` adds ``CommonAttentionMetadata.block_table_cpu``).
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    from ..config import TovaSettings


class HandoffOrderError(RuntimeError):
    """A hook read state that the hook meant to write it has not written: vLLM called
    tova-vllm's hooks in an order other than vLLM 0.32's."""


_UNSET = object()


class WorkerSettings:
    """The TOVA settings (None: TOVA off) of the engine whose layers this process builds,
    and whether its prefix caching is on (TOVA then evicts copy-on-write).

    Writer: every TOVA attention impl's ``__init__`` (``layer_setup.setup_tova_impl``),
    which runs while vLLM loads the model with the engine's config current.
    Reader: the TOVA backends' ``customize_spec`` (``layer_setup.customize_tova_spec``),
    which must turn each layer's ``FullAttentionSpec`` into a ``TovaSpec`` carrying the
    budget.

    Why vLLM forces it: ``customize_spec`` is a classmethod that receives the spec only;
    vLLM 0.32 calls it from ``Worker.get_kv_cache_spec`` (and
    ``Platform.update_block_size_for_backend``) outside ``set_current_vllm_config``, so no
    config is reachable there, and ``AttentionSpec`` has no field for plugin settings.
    Both callers run after the worker loaded the model, i.e. after every impl was built;
    each engine built in the process publishes again, so no budget leaks into the next.
    """

    def __init__(self) -> None:
        self._settings: Any = _UNSET
        self.copy_on_write = False

    def publish(self, settings: Optional["TovaSettings"], copy_on_write: bool = False) -> None:
        self._settings = settings
        self.copy_on_write = copy_on_write

    def read(self) -> Optional["TovaSettings"]:
        if self._settings is _UNSET:
            raise HandoffOrderError(
                "tova-vllm: a TOVA backend's customize_spec ran before any TOVA attention "
                "impl was built in this process, so whether TOVA is on (and its budget) is "
                "unknown; vLLM 0.32 builds the layers first (see tova_vllm/engine/handoff.py)"
            )
        return self._settings


class StepRunner:
    """The model runner whose attention metadata is being built, on this thread.

    Writer: the ``runner_publishes_batch`` patch, around
    ``GPUModelRunner._build_attention_metadata``.
    Readers: ``step_context.batch_rows`` and ``step_context.host_block_table``, called by
    ``TovaPhasedBuilder.build`` inside that method.

    Why vLLM forces it: a builder gets ``CommonAttentionMetadata`` only, which has no
    prompt lengths, no per-request ``extra_args`` (budget, policy) and no host copy of the
    block table; the runner has all three, and vLLM 0.32 passes builders no reference to
    it (``patches/03`` proposes the fields).  Thread-local because the runner is published
    only while its own thread builds metadata.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def publishing(self, runner: Any) -> Iterator[None]:
        previous = getattr(self._local, "runner", None)
        self._local.runner = runner
        try:
            yield
        finally:
            self._local.runner = previous

    def current(self) -> Optional[Any]:
        """The runner, or None outside ``_build_attention_metadata``."""
        return getattr(self._local, "runner", None)

    def require(self) -> Any:
        runner = self.current()
        if runner is None:
            raise HandoffOrderError(
                "tova-vllm: attention metadata was built outside GPUModelRunner."
                "_build_attention_metadata, so the batch's prompt lengths are unknown"
            )
        return runner


#: Process-wide instances; the only state tova-vllm hands between vLLM hooks.
worker_settings = WorkerSettings()
step_runner = StepRunner()
