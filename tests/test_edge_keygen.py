"""`patchwatch edge keygen` keeps private keys out of git work trees unless told otherwise."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest
from click.testing import CliRunner

from edge.signing import git_work_tree, load_private_key
from patchwatch.cli import main


def make_repository(folder):
    """A real git work tree where git is installed (else the `.git` folder git would make)."""
    folder.mkdir()
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(folder)], check=True)
    else:
        (folder / ".git").mkdir()
    return folder


def keygen(*args):
    return CliRunner().invoke(main, ["edge", "keygen", *args])


def test_keygen_refuses_a_folder_inside_a_git_work_tree(tmp_path):
    repository = make_repository(tmp_path / "repo")
    target = repository / "keys" / "fleet"  # not there yet: its nearest existing folder is what is asked
    result = keygen("--out", str(target))
    assert result.exit_code == 1
    assert str(target) in result.output and str(repository) in result.output and "--inside-repo" in result.output
    assert not (repository / "keys").exists()


def test_keygen_writes_inside_a_work_tree_when_told_to(tmp_path):
    repository = make_repository(tmp_path / "repo")
    result = keygen("--out", str(repository / "keys"), "--inside-repo")
    assert result.exit_code == 0, result.output
    private = repository / "keys" / "signing.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    load_private_key(private)


def test_keygen_writes_outside_a_work_tree(tmp_path):
    assert git_work_tree(tmp_path) is None  # pytest's folders lie in no repository
    result = keygen("--out", str(tmp_path / "keys"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "keys" / "signing.key").is_file() and (tmp_path / "keys" / "signing.pub").is_file()


def test_without_git_a_work_tree_is_found_by_its_dot_git(tmp_path, monkeypatch):
    repository = tmp_path / "repo"
    (repository / ".git").mkdir(parents=True)  # what git leaves at a work tree's top
    (repository / "src").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert git_work_tree(repository / "src" / "keys") == repository
    assert git_work_tree(tmp_path / "elsewhere") is None
    result = keygen("--out", str(repository / "src" / "keys"))
    assert result.exit_code == 1 and "--inside-repo" in result.output


@pytest.mark.skipif(not shutil.which("git"), reason="git is not installed")
def test_git_names_the_top_of_the_work_tree(tmp_path):
    repository = make_repository(tmp_path / "repo")
    (repository / "a" / "b").mkdir(parents=True)
    assert git_work_tree(repository / "a" / "b" / "keys").resolve() == repository.resolve()
