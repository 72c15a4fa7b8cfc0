"""TEST-ONLY: puts ``flash_attn_on_cpu``'s stand-ins into every process of a multi-process
vLLM engine (the test's driver, engine core and spawned workers), which do not inherit
monkeypatches.  Active only where this directory is on PYTHONPATH *and*
``TOVA_TEST_FLASH_ATTN_ON_CPU=1``; nothing in ``tova_vllm`` imports it."""

import os
import sys

if os.environ.get("TOVA_TEST_FLASH_ATTN_ON_CPU") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from flash_attn_on_cpu import flash_attention_on_cpu

    # Kept referenced: a collected context manager would undo its patches.
    _ACTIVE = flash_attention_on_cpu()
    _ACTIVE.__enter__()
