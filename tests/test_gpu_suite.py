"""The GPU suite script: it parses, and its stages are the ones its usage names (it runs only on a GPU
machine, where a broken script would cost a whole lease)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_gpu_suite_parses():
    res = subprocess.run(["bash", "-n", str(SUITE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_the_flashinfer_scripts_parse():
    """fetch_flashinfer.sh and the ahead-of-time build it runs (they need network and nvcc: not run here)."""
    bench = SUITE.parent
    res = subprocess.run(["bash", "-n", str(bench / "fetch_flashinfer.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, str(bench / "flashinfer_aot.py"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "TREE" in res.stdout.upper(), res.stderr


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


def _suite(out, logs, stub, *stages, **env):
    return subprocess.run(["bash", str(SUITE), *stages], capture_output=True, text=True, timeout=120,
                          env={"OUT": str(out), "SUITE_LOGS": str(logs), "PATH": "/usr/bin:/bin", "PYTHON": str(stub),
                               **env})


def test_the_suite_returns_its_logs_as_one_archive_beside_the_results(tmp_path):
    """The device tool returns at most eight files from $OUT: the suite leaves four there (the logs as one archive,
    the results), a second run in the same command adds its logs to the archive, and a new command's (an empty
    $OUT) starts afresh."""
    import tarfile

    stub = tmp_path / "py"
    stub.write_text('#!/bin/sh\necho "stub $*"\n')
    stub.chmod(0o755)
    out, logs = tmp_path / "out", tmp_path / "logs"
    skip = "smoke tune kv beamgroup profile published spec-demo speculative long decode"
    res = _suite(out, logs, stub, "targets", TARGETS_SKIP=skip)
    assert res.returncode == 0, res.stdout + res.stderr

    def archived():
        with tarfile.open(out / "logs.tar.gz") as tar:
            return {m.name.removeprefix("./"): tar.extractfile(m).read().decode() for m in tar if m.isfile()}

    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "logs.tar.gz", "results.csv", "results.png"]
    first = archived()
    assert {"env.log", "targets_sampling.log", "targets_diagnose_top_p.log"} <= set(first)
    assert "stub benchmarks/bench_sampling.py" in first["targets_sampling.log"]
    res = _suite(out, logs, stub, "tests", GPU_TESTS="tests/test_philox.py")  # the same command: $OUT kept
    assert res.returncode == 0, res.stdout + res.stderr
    assert {"targets_sampling.log", "tests.log"} <= set(archived())
    assert len(list(out.iterdir())) == 4
    (out / "logs.tar.gz").unlink()  # a new command's $OUT is empty
    res = _suite(out, logs, stub, "tests", GPU_TESTS="tests/test_philox.py")
    assert "targets_sampling.log" not in archived() and "tests.log" in archived()


def _benchmark_commands(text: str) -> list[list[str]]:
    """Every ``"$PY" benchmarks/NAME.py ARGS`` command line of the suite, its continuation lines joined,
    ``${VAR:-default}`` read as the default and the suite's own variables as what they hold on a GPU."""
    joined = re.sub(r"\\\n\s*", " ", text)
    local = {"fi_providers": "flashinfer flashinfer-graph", "gpus": "2", "mode": "ivg", "dt": "bfloat16"}  # set by the script itself
    out = []
    for m in re.finditer(r'"\$PY" (benchmarks/\w+\.py)([^|\n]*)', joined):
        args = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", m.group(2).split("2>&1")[0].split("||")[0])
        unknown = [v for v in re.findall(r"\$(\w+)", args) if v not in local]
        assert not unknown, f"{m.group(1)}: variables {unknown} in its arguments: give them a value here"
        args = re.sub(r"\$(\w+)", lambda v: local[v.group(1)], args).replace('"', "")
        out.append([m.group(1)] + args.split())
    return out


def test_every_benchmark_command_line_parses(monkeypatch):
    """Each benchmark the suite runs accepts its arguments (a typo there would cost the lease's run)."""
    import argparse
    import runpy
    import sys

    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    commands = _benchmark_commands(SUITE.read_text())
    assert len(commands) >= 12 and {"benchmarks/bench_published.py", "benchmarks/profile_decode.py"} <= {
        c[0] for c in commands}
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    root = SUITE.parent.parent
    for cmd in commands:
        if "argparse" not in (root / cmd[0]).read_text():  # a script without options (plot_results.py)
            assert cmd[1:] == [], f"{cmd[0]} takes no arguments"
            continue
        monkeypatch.setattr(sys, "argv", cmd)
        with pytest.raises(Parsed):
            runpy.run_path(str(root / cmd[0]), run_name="__main__")


def test_every_test_file_the_suite_names_exists():
    text = re.sub(r"\\\n\s*", " ", SUITE.read_text())
    named = set(re.findall(r"tests/\w+\.py", text))
    root = SUITE.parent.parent
    assert len(named) >= 10
    assert [n for n in sorted(named) if not (root / n).exists()] == []


def test_every_part_of_targets_can_be_skipped_by_the_name_the_header_gives():
    """``TARGETS_SKIP`` takes the names the header lists; each part the targets stage runs is one of them."""
    text = SUITE.read_text()
    header = text.split("set -uo pipefail")[0]
    listed = re.search(r"TARGETS_SKIP names parts to leave out \(([^)]*)\)", re.sub(r"\n#\s+", " ", header)).group(1)
    parts = re.findall(r"wanted ([a-z-]+)", text.split("run_targets() {")[1])
    assert parts and sorted(parts) == sorted(listed.split())


PLAN = SUITE.parent / "lease_plan.sh"


def _plan_dry_run(call: str) -> str:
    res = subprocess.run(["bash", str(PLAN), call], capture_output=True, text=True,
                         env={"LEASE_DRY_RUN": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    return res.stdout


CALLS = ("1", "2", "3", "4", "5", "6", "7")


def test_the_lease_plan_names_the_suites_parts_and_existing_test_files():
    """benchmarks/lease_plan.sh (the owed GPU work as short leases' calls): it parses, its list of parts is the suite's,
    each call runs the suite with parts and test files that exist, and an unknown call is refused."""
    assert subprocess.run(["bash", "-n", str(PLAN)], capture_output=True).returncode == 0
    text = SUITE.read_text()
    suite_parts = sorted(re.findall(r"wanted ([a-z-]+)", text.split("run_targets() {")[1]))
    plan_parts = re.search(r'^PARTS="([^"]*)"', PLAN.read_text(), flags=re.M).group(1).split()
    assert sorted(plan_parts) == suite_parts
    root = SUITE.parent.parent
    ran = set()
    for call in CALLS:
        out = _plan_dry_run(call)
        assert "bash benchmarks/gpu_suite.sh" in out
        skipped = re.search(r"^TARGETS_SKIP=(.*)$", out, flags=re.M)
        if skipped:
            assert set(skipped.group(1).split()) <= set(suite_parts)
            ran |= set(suite_parts) - set(skipped.group(1).split())
        files = re.findall(r"tests/test_[a-z_]+\.py", out)
        assert [f for f in files if not (root / f).exists()] == []
    # every part runs in some call but the gpt2-xl-sized speculative rows, already measured, and bench_kv (kv), which
    # the third call's flashinfer stage runs with --record
    assert ran == set(suite_parts) - {"speculative", "kv"}
    assert "gpu_suite.sh flashinfer" in _plan_dry_run("3")
    assert subprocess.run(["bash", str(PLAN), "8"], capture_output=True).returncode == 2


# each part of `gpu_suite.sh targets` -> the variable that caps it (its default is read from the suite)
PART_LIMITS = {"smoke": "SMOKE_TIMEOUT", "sampler": "T_SAMPLING_TIMEOUT", "diagnose": "T_DIAG_TIMEOUT",
               "tune": "T_TUNE_TIMEOUT", "kv": "T_KV_TIMEOUT", "beamgroup": "T_BEAM_TIMEOUT",
               "profile": "T_PROFILE_TIMEOUT", "published": "T_PUBLISHED_TIMEOUT",
               "spec-demo": "T_SPEC_DEMO_TIMEOUT", "speculative": "T_SPEC_TIMEOUT", "long": "T_LONG_TIMEOUT",
               "invariance": "T_INVARIANCE_TIMEOUT", "decode": "T_DECODE_PROFILE_TIMEOUT"}
LEASE_S, START_S = 900, 120  # device time a lease; what a machine's start and the transfers may take


def test_the_lease_plans_calls_fit_their_budgets_and_one_lease():
    """Each call's parts, at their limits, fit its TARGETS_BUDGET, the budget and the other stages fit the call's
    timeout, and the calls of each lease (1-2, 3-4, 5-6, 7) fit 15 minutes with a two-minute start: a plan that
    overruns loses its last part's rows, or the lease's second call."""
    text = SUITE.read_text()
    assert sorted(PART_LIMITS) == sorted(re.findall(r"wanted ([a-z-]+)", text.split("run_targets() {")[1]))

    def setting(out, name):
        found = re.search(rf"^{name}=(.*)$", out, flags=re.M)
        if found:
            return found.group(1)
        return re.search(rf"\$\{{{name}:-(\d+)\}}", text).group(1)  # the suite's default

    timeouts = {}
    for call in CALLS:
        out = _plan_dry_run(call)
        timeouts[call] = int(re.match(r"timeout_s=(\d+)\n", out).group(1))
        assert timeouts[call] <= 600
        used = 0
        if "gpu_suite.sh targets" in out:
            skipped = setting(out, "TARGETS_SKIP").split()
            budget = int(setting(out, "TARGETS_BUDGET"))
            caps = {p: int(setting(out, v)) for p, v in PART_LIMITS.items() if p not in skipped}
            if "decode" in caps:
                caps["decode"] *= len(setting(out, "PROFILE_MODES").split()) if "PROFILE_MODES=" in out else 1
            if "invariance" in caps:
                caps["invariance"] *= 2  # bf16, then float32
            assert sum(caps.values()) <= budget, (call, caps, budget)
            used += budget
        if "gpu_suite.sh flashinfer" in out:
            used += int(setting(out, "FI_SAMPLING_TIMEOUT")) + int(setting(out, "FI_KV_TIMEOUT"))
        if "gpu_suite.sh tests" in out:
            used += int(setting(out, "TESTS_TIMEOUT"))
        assert 0 < used <= timeouts[call] - 20, (call, used, timeouts[call])
    for lease in (("1", "2"), ("3", "4"), ("5", "6"), ("7",)):  # the calls of one lease
        assert START_S + sum(timeouts[c] for c in lease) <= LEASE_S, lease


def test_every_gpu_test_file_runs_in_some_call_of_the_lease_plan():
    """A call that names its test files (T_KERNEL_TESTS for part smoke, GPU_TESTS for stage tests) replaces the
    suite's lists: every file of those lists must still run in some call, or a kernel's GPU tests are dropped."""
    text = SUITE.read_text()
    suite_files = set(re.findall(r"tests/test_[a-z_]+\.py", text.split('GPU_TESTS="${GPU_TESTS:-')[1].split('}"')[0]))
    smoke = text.split('timed "GPU tests"')[1].split("|| echo")[0]
    smoke_always = set(re.findall(r"tests/test_[a-z_]+\.py", smoke.split("${T_KERNEL_TESTS:-")[0]))
    run = set()
    for call in CALLS:
        out = _plan_dry_run(call)
        named = re.search(r"^T_KERNEL_TESTS=(.*?)\n[A-Z_]+=|^T_KERNEL_TESTS=(.*?)\nbash", out, flags=re.M | re.S)
        skipped = re.search(r"^TARGETS_SKIP=(.*)$", out, flags=re.M)
        if "gpu_suite.sh targets" in out and not (skipped and "smoke" in skipped.group(1).split()):
            run |= smoke_always | set(re.findall(r"tests/test_[a-z_]+\.py", (named.group(1) or named.group(2))
                                                   if named else smoke))
        if "gpu_suite.sh tests" in out:
            gpu_tests = re.search(r"^GPU_TESTS=(.*?)\n[A-Z_]+=", out, flags=re.M | re.S)
            run |= set(re.findall(r"tests/test_[a-z_]+\.py", gpu_tests.group(1))) if gpu_tests else suite_files
    assert sorted(suite_files - run) == []


def test_the_lease_plans_profiled_modes_are_decoding_modes():
    """The fifth call profiles one prompt's decoding per mode: each name is one profile_decode.py accepts."""
    from ivg.demo.run import METHODS

    modes = re.search(r"^PROFILE_MODES=(.*)$", _plan_dry_run("5"), flags=re.M).group(1).split()
    assert modes and set(modes) <= set(METHODS) and "eft" not in modes
