"""Atomic output folders: all or nothing, with the permissions of an ordinary folder."""

from __future__ import annotations

import os
import stat

import pytest
from safetensors.torch import save_file
import torch

from mptool.io import atomic_dir


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_result_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "a.txt").write_text("x")
            os.chmod(tmp / "sub" / "a.txt", 0o600)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)
    finally:
        os.umask(umask)
    out = tmp_path / "out"
    assert mode(out) == 0o755 and mode(out / "sub") == 0o755
    assert mode(out / "model.safetensors") == 0o644 and mode(out / "sub" / "a.txt") == 0o644
    assert mode(out / "run.sh") == 0o755


def test_failure_leaves_the_old_folder_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
