"""Shell completion (``kasou completion bash|zsh`` and the answers the shell gets) and the manual pages generated from
the command line (``kasou man --out DIR``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kasou.cli import common, completion, manpages
from kasou.cli import main as cli
from kasou.cli.output import subcommands
from kasou.errors import Unauthorized


def run(*args: str) -> Any:
    return CliRunner().invoke(cli.app, list(args), catch_exceptions=True)


def test_the_scripts_for_bash_and_zsh_and_no_other_shell() -> None:
    bash = run("completion", "bash")
    assert bash.exit_code == 0 and "complete -o default -F _kasou_completion kasou" in bash.output
    assert "_KASOU_COMPLETE=complete_bash" in bash.output
    zsh = run("completion", "zsh")
    assert zsh.exit_code == 0 and "#compdef kasou" in zsh.output and "_KASOU_COMPLETE=complete_zsh" in zsh.output
    bad = run("completion", "tcsh")
    assert bad.exit_code == 2 and "no completion for the shell 'tcsh': bash or zsh" in bad.output


def _complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash gets back from ``kasou`` for the command line ``words`` (the cursor at its end)."""
    parts = words.split(" ")
    r = subprocess.run(
        [sys.executable, "-m", "kasou"],
        env={**os.environ, **(env or {}), "_KASOU_COMPLETE": "complete_bash", "COMP_WORDS": words,
             "COMP_CWORD": str(len(parts) - 1)},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_the_shell_gets_commands_and_options() -> None:
    assert _complete("kasou vm st") == ["start", "stop"]
    assert "backup" in _complete("kasou ")
    assert "--no-wait" in _complete("kasou vm start --")


def test_names_come_from_the_api_and_nothing_when_it_cannot_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    class Api:
        def get(self, path: str, **kw: Any) -> Any:
            return {"/v1/vms": [{"name": "emr-db1"}, {"name": "emr-ap1"}, {"name": "pacs1"}],
                    "/v1/hosts": [{"name": "h1"}, {"name": "h2"}]}[path]  # fmt: skip

    monkeypatch.setattr(common, "client_factory", lambda: Api())
    assert completion.names("vms") == ["emr-ap1", "emr-db1", "pacs1"]
    cmd = completion.with_names(cli.typer.main.get_command(cli.app))
    groups = dict(subcommands(cmd))  # the groups load as they are asked for, and get their names then
    start = groups["vm"].commands["start"]
    arg = next(p for p in start.params if p.param_type_name == "argument")
    assert [c.value for c in arg.shell_complete(None, "emr")] == ["emr-ap1", "emr-db1"]
    host = groups["host"].commands["maintenance"]
    harg = next(p for p in host.params if p.param_type_name == "argument")
    assert [c.value for c in harg.shell_complete(None, "")] == ["h1", "h2"]

    def down() -> Any:
        raise Unauthorized("no API token at /var/lib/kasou/api.token")

    monkeypatch.setattr(common, "client_factory", down)
    assert completion.names("vms") == []
    # And through the real command with no kasou to ask (a port nothing listens on): no names, no error.
    assert _complete("kasou vm start e", {"KASOU_API": "127.0.0.1:9", "KASOU_TOKEN": "x"}) == []


def test_a_manual_page_for_every_command_as_its_help_says(tmp_path: Path) -> None:
    r = run("man", "--out", str(tmp_path / "man1"))
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "man1").iterdir())
    assert {"kasou.1", "kasou-vm.1", "kasou-vm-start.1", "kasou-backup-policy-set.1"} <= set(files)
    assert len(files) == len(manpages.pages(cli.app)) > 100
    page = (tmp_path / "man1" / "kasou-vm-start.1").read_text()
    assert page.startswith('.TH "KASOU-VM-START" "1"') and "\\-\\-no\\-wait" in page and "kasou\\-vm(1)" in page
    groff = shutil.which("groff")
    assert groff, "groff (Debian's groff-base) is needed to check the pages"
    for name in files:
        g = subprocess.run([groff, "-k", "-man", "-Tutf8", "-ww", "-z", str(tmp_path / "man1" / name)],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        assert g.returncode == 0 and not g.stderr, (name, g.stderr)
    bad = run("man", "--out", "/proc/kasou-no")
    assert bad.exit_code == 1 and "cannot write the manual pages into /proc/kasou-no" in bad.output
