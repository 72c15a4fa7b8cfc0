"""Every diff in ``patches/`` applies cleanly to the installed vLLM 0.32.0, so each runtime
patch's documented upstream replacement stays exact."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PATCHES = Path(__file__).resolve().parent.parent / "patches"
DIFFS = sorted(PATCHES.glob("*.diff"))


def test_every_runtime_patch_has_a_diff():
    assert len(DIFFS) == 9, DIFFS


@pytest.mark.parametrize("diff", DIFFS, ids=lambda p: p.name)
def test_diff_applies_to_installed_vllm(diff, tmp_path):
    import vllm

    site = Path(vllm.__file__).resolve().parent.parent
    paths = sorted(set(re.findall(r"^--- a/(\S+)", diff.read_text(), flags=re.M)))
    assert paths, f"{diff.name} names no file"
    for rel in paths:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site / rel, tmp_path / rel)
    proc = subprocess.run(["git", "apply", "--check", "-p1", str(diff)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
