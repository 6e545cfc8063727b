"""Adapter folders are saved as one unit: an interrupted or crashed save leaves the old folder loadable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import batch, make

import fxadapt
from fxadapt import LoRAConfig
from fxadapt.formats import fileio

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _interrupt_at_second_fsync(monkeypatch) -> None:
    """Ctrl-C after the first file of a save is on disk (every writer fsyncs each file it writes)."""
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _lora(model, name, alpha, seed):
    torch.manual_seed(seed)
    model.add_adapter(name, LoRAConfig(r=4, alpha=alpha, init_weights="bert"), overwrite_ok=True)


def _output(model, name):
    model.set_active_adapters(name)
    model.eval()
    with torch.no_grad():
        return model(**batch()).last_hidden_state


@pytest.mark.parametrize("fmt", ["fxadapt", "adapterhub"])
def test_interrupted_save_leaves_the_old_folder(tmp_path, monkeypatch, fmt):
    """Issue 12.1: new weights with the old config (alpha 8 for an adapter saved with alpha 64)."""
    model = fxadapt.AdaptedModel(make("bert"))
    _lora(model, "a", alpha=8, seed=1)
    folder = tmp_path / "a"
    (tmp_path / "a").mkdir()
    (folder / "notes.txt").write_text("the user's own file")
    model.save_adapter(folder, "a", format=fmt)
    before = _files(folder)
    old = _output(model, "a")
    _lora(model, "a", alpha=64, seed=2)
    _interrupt_at_second_fsync(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter(folder, "a", format=fmt)
    monkeypatch.undo()
    assert _files(folder) == before
    assert os.listdir(tmp_path) == ["a"], "no temporaries left beside the folder"
    other = fxadapt.AdaptedModel(make("bert"))
    other.load_adapter(folder)
    assert torch.equal(_output(other, "a"), old)


def test_interrupted_adapterhub_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    """Issue 12.2: the old adapter.safetensors was deleted before the new files were written."""
    folder = tmp_path / "lora"
    shutil.copytree(FIXTURES / "gpt2__lora" / "adapter", folder)
    before = _files(folder)
    assert "adapter.safetensors" in before
    model = fxadapt.AdaptedModel(make("gpt2"))
    _lora(model, "lora", alpha=64, seed=3)
    _interrupt_at_second_fsync(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter(folder, "lora", format="adapterhub")
    monkeypatch.undo()
    assert _files(folder) == before
    assert os.listdir(tmp_path) == ["lora"]


@pytest.mark.parametrize("fmt", ["fxadapt", "adapterhub"])
def test_save_replaces_adapter_files_and_keeps_the_users_files(tmp_path, fmt):
    """A save over an existing folder drops every adapter file of the old save (any format)."""
    model = fxadapt.AdaptedModel(make("bert"))
    _lora(model, "a", alpha=8, seed=1)
    folder = tmp_path / "a"
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "run.txt").write_text("kept")
    (folder / "README.md").write_text("kept too")
    for stale in ("adapter.safetensors", "pytorch_adapter.bin", "adapter_model.safetensors"):
        (folder / stale).write_bytes(b"stale")
    os.chmod(folder, 0o750)
    model.save_adapter(folder, "a", format=fmt)
    written = {"fxadapt": "adapter.safetensors", "adapterhub": "pytorch_adapter.bin"}[fmt]
    assert sorted(os.listdir(folder)) == sorted(["README.md", "adapter_config.json", "logs", written])
    assert (folder / "logs" / "run.txt").read_text() == "kept"
    assert (folder / written).read_bytes() != b"stale"
    assert oct(folder.stat().st_mode & 0o777) == oct(0o750), "the folder keeps its permissions"
    assert os.listdir(tmp_path) == ["a"]


def test_save_into_the_working_directory_keeps_it_usable(tmp_path, monkeypatch):
    model = fxadapt.AdaptedModel(make("bert"))
    _lora(model, "a", alpha=8, seed=1)
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    model.save_adapter(".", "a")
    model.save_adapter(".", "a")
    assert sorted(os.listdir(".")) == ["adapter.safetensors", "adapter_config.json"]
    assert Path.cwd() == (tmp_path / "a").resolve()


def test_save_onto_a_file_is_refused(tmp_path):
    model = fxadapt.AdaptedModel(make("bert"))
    _lora(model, "a", alpha=8, seed=1)
    (tmp_path / "f").write_text("a file")
    with pytest.raises(FileExistsError, match="not a folder"):
        model.save_adapter(tmp_path / "f", "a")
    assert (tmp_path / "f").read_text() == "a file"


_CRASH = """
import os, sys
from pathlib import Path
from fxadapt.formats import fileio
target = Path(sys.argv[1])
with fileio.atomic_folder(target) as tmp:
    fileio.write_file(tmp / "adapter.safetensors", b"new weights")
    os._exit(3)  # killed before the config is written: no cleanup runs
"""


def test_a_crashed_save_leaves_the_old_folder_and_no_temporary_a_load_reads(tmp_path):
    model = fxadapt.AdaptedModel(make("bert"))
    _lora(model, "a", alpha=8, seed=1)
    folder = tmp_path / "a"
    model.save_adapter(folder, "a")
    before, old = _files(folder), _output(model, "a")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fxadapt.__file__).parents[1]), *sys.path])}
    done = subprocess.run([sys.executable, "-c", _CRASH, str(folder)], env=env, timeout=300)
    assert done.returncode == 3
    assert _files(folder) == before
    leftovers = [n for n in os.listdir(tmp_path) if n != "a"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".a."), leftovers
    other = fxadapt.AdaptedModel(make("bert"))
    other.load_adapter(folder)
    assert torch.equal(_output(other, "a"), old)
    model.save_adapter(folder, "a")  # the next save to the folder sweeps the dead process's temporary
    assert os.listdir(tmp_path) == ["a"]


def test_a_reader_sees_the_old_folder_or_the_new_one(tmp_path):
    """Loads racing saves of two different adapters: every load is one of the two, never a mix."""
    model = fxadapt.AdaptedModel(make("bert"))
    _lora(model, "x", alpha=8, seed=1)
    _lora(model, "y", alpha=64, seed=2)
    folder = tmp_path / "a"
    model.save_adapter(folder, "x")
    expected = {"x": model.adapters["x"].site_state(), "y": model.adapters["y"].site_state()}
    reader = fxadapt.AdaptedModel(make("bert"))
    reader.sites()
    stop, seen, errors = threading.Event(), [], []

    def write() -> None:
        for i in range(30):
            model.save_adapter(folder, "y" if i % 2 == 0 else "x")
        stop.set()

    writer = threading.Thread(target=write)
    writer.start()
    while not stop.is_set() or len(seen) < 3:
        try:
            adapter = fileio_load(reader, folder)
        except fxadapt.AdapterFileError as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)
            break
        name = "x" if adapter.config.alpha == 8 else "y"
        state = adapter.site_state()
        assert all(torch.equal(state[k], v) for k, v in expected[name].items()), f"a mix of x and {name}"
        seen.append(name)
    writer.join()
    assert not errors, errors
    assert os.listdir(tmp_path) == ["a"]


def fileio_load(model, folder):
    from fxadapt.formats import folder as folder_format

    return folder_format.load(model, folder)


def test_atomic_folder_cleans_up_after_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with fileio.atomic_folder(tmp_path / "new") as tmp:
            fileio.write_file(tmp / "adapter_config.json", json.dumps({}).encode())
            raise RuntimeError("refused")
    assert os.listdir(tmp_path) == []
