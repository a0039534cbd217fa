"""Hugging Face Hub folders: ``simclrv2 export --format hf`` and ``simclrv2.load("hf://ORG/NAME")``, offline.

The round trip puts the exported folder into a local Hub cache (the layout ``snapshot_download``
keeps: ``models--ORG--NAME/refs/main`` naming a ``snapshots/<commit>/`` folder) and loads it in a
fresh process with ``HF_HUB_OFFLINE=1``, so nothing can be downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import simclrv2
from simclrv2 import cli
from simclrv2.engine.checkpoint import CheckpointError, save_checkpoint
from simclrv2.hub import is_export_folder, parse_reference
from model_checks import randomize_

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(10)]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _finetune_run(root: Path) -> tuple[Path, torch.nn.Module]:
    """A run folder as ``simclrv2 finetune`` leaves it: a checkpoint, config.json and eval.json."""
    model = randomize_(simclrv2.create_model("r18_0p25x_sk0_cifar"), seed=5, scale=0.2)
    model.mode = "finetune"
    run = root / "finetune"
    save_checkpoint(run, {"stage": "finetune", "model": model.state_dict(), "model_spec": asdict(model.spec),
                          "mode": model.mode, "image_size": 28, "classes": CLASSES}, step=4, keep=1)
    (run / "config.json").write_text(json.dumps({"data": {"dataset": "embedded", "eval_split": "test"}}))
    (run / "eval.json").write_text(json.dumps({"top1": 73.04, "top5": 97.91, "num_examples": 10000,
                                               "num_labelled": 100, "labels": "10 per class"}))
    return run, model.eval()


def _into_hub_cache(folder: Path, cache: Path, repo_id: str) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_export_hf_folder_and_load_it_offline_through_the_hub_cache(tmp_path, capsys):
    pytest.importorskip("huggingface_hub")
    run, model = _finetune_run(tmp_path)
    out = tmp_path / "tiny-fmnist"
    assert cli.main(["export", str(run), str(out), "--format", "hf"]) == 0
    assert "upload_folder" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    spec = json.loads((out / "config.json").read_text())
    assert spec["model_name"] == "r18_0p25x_sk0_cifar" and spec["image_size"] == 28 and spec["classes"] == CLASSES
    assert spec["model_spec"] == asdict(model.spec) and spec["mode"] == model.mode
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: simclrv2\n")
    assert "| embedded | test | 10 per class | 73.04 | 97.91 | 10000 |" in card
    assert 'simclrv2.load("hf://ORG/tiny-fmnist")' in card
    assert not list(tmp_path.glob(".tiny-fmnist*"))  # no temporary folder left behind

    cache = tmp_path / "hub-cache"
    _into_hub_cache(out, cache, "someone/tiny-fmnist")
    x = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save({"features": model.embed(x), "probabilities": model.predict(x)}, tmp_path / "expected.pt")
    script = (
        "import sys, torch, simclrv2\n"
        "from simclrv2.api import load_with_classes\n"
        "x = torch.load(sys.argv[1]); expected = torch.load(sys.argv[2])\n"
        "model = simclrv2.load('hf://someone/tiny-fmnist')\n"
        "named = simclrv2.create_model('r18_0p25x_sk0_cifar', pretrained='hf://someone/tiny-fmnist@main')\n"
        "with torch.no_grad():\n"
        "    for m in (model, named):\n"
        "        torch.testing.assert_close(m.embed(x), expected['features'], rtol=0, atol=0)\n"
        "        torch.testing.assert_close(m.predict(x), expected['probabilities'], rtol=0, atol=0)\n"
        "assert model.mode == 'finetune' and model.image_size == 28\n"
        "assert load_with_classes('hf://someone/tiny-fmnist')[1][-1] == 'class9'\n"
        "print('ok')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "expected.pt")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_local_export_folder_loads_directly(tmp_path):
    run, model = _finetune_run(tmp_path)
    assert cli.main(["export", str(run), str(tmp_path / "m"), "--format", "hf"]) == 0
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(simclrv2.load(tmp_path / "m").predict(x), model.predict(x), rtol=0, atol=0)


def test_hub_errors_are_one_line(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"^hf://someone/absent: cannot get the model from the Hugging Face Hub: "
                                              r"[^\n]+$"):
        simclrv2.load("hf://someone/absent")
    for bad in ("hf://no-org", "hf://a/b/c", "hf://a/b@"):
        with pytest.raises(CheckpointError, match="is not a Hugging Face model reference; write hf://ORG/NAME"):
            parse_reference(bad)
    assert parse_reference("hf://google/r50_1x_sk0@v1.0") == ("google/r50_1x_sk0", "v1.0")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # the package is not installed
    with pytest.raises(CheckpointError, match=r"^hf:// models need the huggingface_hub package: "
                                              r"pip install 'simclrv2\[hub\]'$"):
        simclrv2.load("hf://someone/tiny")


def test_hf_export_replaces_only_its_own_folders_and_only_with_force(tmp_path, capsys):
    run, _ = _finetune_run(tmp_path)
    out = tmp_path / "m"
    assert cli.main(["export", str(run), str(out), "--format", "hf"]) == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["export", str(run), str(out), "--format", "hf"]) == 2
    assert f"output {out} already exists; pass --force to replace it" in capsys.readouterr().err
    assert cli.main(["export", str(run), str(out), "--format", "hf", "--force"]) == 0
    assert is_export_folder(out) and (out / "model.safetensors").stat().st_mtime_ns != first
    for taken in (run, tmp_path / "file.txt"):
        if not taken.exists():
            taken.write_text("keep me")
        before = sorted(p.name for p in taken.rglob("*")) if taken.is_dir() else taken.read_text()
        assert cli.main(["export", str(run), str(taken), "--format", "hf", "--force"]) == 2
        assert (sorted(p.name for p in taken.rglob("*")) if taken.is_dir() else taken.read_text()) == before
    err = capsys.readouterr().err
    assert "is a folder that simclrv2 export did not write; choose a new folder" in err
    assert "is a file; --format hf writes a folder" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_hf_export_leaves_no_folder(tmp_path, monkeypatch):
    run, _ = _finetune_run(tmp_path)
    from simclrv2 import hub

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["export", str(run), str(tmp_path / "m"), "--format", "hf"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune"]


def test_an_export_cleans_up_after_a_killed_one_and_restores_a_folder_set_aside(tmp_path):
    run, _ = _finetune_run(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "m"
    assert cli.main(["export", str(run), str(out), "--format", "hf"]) == 0
    # Killed after setting the old folder aside and before renaming the new one into place:
    os.replace(out, tmp_path / f".m.old-{dead.pid}")
    (tmp_path / f".m.tmp-{dead.pid}").mkdir()
    (tmp_path / f".m.tmp-{dead.pid}" / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".m.tmp-{os.getppid()}"  # another export still at work
    live.mkdir()
    assert cli.main(["export", str(run), str(out), "--format", "hf"]) == 2  # the next export to m
    assert out.is_dir() and is_export_folder(out)  # the export set aside is back, not lost
    assert not (tmp_path / f".m.tmp-{dead.pid}").exists() and live.exists()
    (tmp_path / f".m.old-{dead.pid}").mkdir()  # killed after the new folder was in place
    assert cli.main(["export", str(run), str(out), "--format", "hf", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live.name]
