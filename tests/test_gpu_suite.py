"""The GPU suite script: it parses, and its stages are the ones its usage names (it runs only on a GPU
machine, where a broken script would cost a whole lease)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_gpu_suite_parses():
    res = subprocess.run(["bash", "-n", str(SUITE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_every_stage_in_the_usage_has_a_branch_and_a_description():
    text = SUITE.read_text()
    usage = re.search(r'usage: \$0 \[([a-z|]+)\]', text).group(1).split("|")
    branches = re.findall(r"^\s+([a-z]+)\) ", text, flags=re.M)
    assert sorted(usage) == sorted(branches)
    header = text.split("set -uo pipefail")[0]
    for stage in usage:
        if stage not in ("build", "tests", "sanitize", "all"):  # described inside "check" and the default
            assert re.search(rf"^#   {stage}\s", header, flags=re.M), f"stage {stage} is not described in the header"


def test_an_unknown_stage_prints_the_usage_and_fails(tmp_path):
    res = subprocess.run(["bash", str(SUITE), "no-such-stage"], capture_output=True, text=True,
                         env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHON": "true"}, timeout=60)
    assert res.returncode == 2
    assert "usage:" in res.stderr and "targets" in res.stderr
