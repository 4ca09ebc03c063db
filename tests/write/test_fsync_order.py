"""kill -9 cannot reveal a missing fsync (the page cache survives), so record the calls of a save."""

import builtins
import io
import os
from pathlib import Path

from conftest import saver_for
from open_instruct_ckpt import FullModel


def record_calls(monkeypatch, events: list) -> None:
    real_fsync, real_rename, real_open = os.fsync, os.rename, builtins.open

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        result = real_rename(src, dst, *args, **kwargs)
        events.append(("rename", str(src), str(dst)))
        return result

    def open_(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and set("wax+") & set(mode):
            events.append(("write", os.path.abspath(file)))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


def test_every_file_is_fsynced_before_the_manifest_and_the_rename(tmp_path, llama, tokenizer, monkeypatch):
    saver = saver_for(tokenizer, tmp_path)
    saver.save(llama, "step_1", 1, FullModel())  # a first save, so the second replaces it
    events: list = []
    record_calls(monkeypatch, events)
    path = saver.save(llama, "step_1", 1, FullModel()).path
    monkeypatch.undo()
    rename_in = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(path))
    staging = events[rename_in][1]
    manifest_write = events.index(("write", f"{staging}/checkpoint.json"))
    fsynced = {e[1]: i for i, e in enumerate(events) if e[0] == "fsync"}
    for name in sorted(p.name for p in path.iterdir() if p.name != "checkpoint.json"):
        assert fsynced[f"{staging}/{name}"] < manifest_write, f"{name} not fsynced before the manifest"
    assert manifest_write < fsynced[f"{staging}/checkpoint.json"] < fsynced[staging] < rename_in
    parent_syncs = [i for i, e in enumerate(events) if e == ("fsync", str(tmp_path))]
    assert any(i > rename_in for i in parent_syncs), "parent directory not fsynced after the rename"
    aside = next(e for e in events if e[0] == "rename" and e[1] == str(path))
    assert Path(aside[2]).name.startswith(".old-step_1-") and events.index(aside) < rename_in
