"""The OpenMP wait policy every product process runs with (quantyard/native_env.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from quantyard.native_env import NATIVE_DEFAULTS, tune_native_runtimes


def test_defaults_fill_only_what_the_operator_left_unset():
    env: dict[str, str] = {}
    tune_native_runtimes(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"} == NATIVE_DEFAULTS
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    tune_native_runtimes(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def _cli_env(extra: dict[str, str]) -> str:
    """OMP_WAIT_POLICY as a `quantyard` command's process sees it by the time the command runs
    (the group's callback has run; the subcommand then reads the environment)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | extra
    code = ("import os, click, quantyard.cli as c\n"
            "@c.main.command('print-omp')\n"
            "def _p():\n"
            "    click.echo(os.environ.get('OMP_WAIT_POLICY', '<unset>'))\n"
            "c.main(['print-omp'])\n")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_every_cli_command_runs_with_a_passive_wait_policy_unless_set():
    assert _cli_env({}) == "PASSIVE"
    assert _cli_env({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_the_cli_sets_it_before_torch_or_llama_cpp_can_load():
    code = "import sys, quantyard.cli; print(sorted({'torch', 'llama_cpp'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
