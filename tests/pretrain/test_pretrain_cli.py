"""The ``ssl-pretrain`` command line, end to end, including the errors a user will hit."""

import json
import subprocess
import sys

import pytest

from ssl_pretrain.cli import main

from digit_files import write_digit_images

FAST = ["--set", "model.backbone=smallconv", "--set", "augment.input_size=16", "--set", "augment.min_scale=0.25",
        "--set", "simclr.hidden_dim=64", "--set", "data.num_workers=0", "--no-progress"]


@pytest.fixture
def messy_folder(tmp_path):
    """Real digit images in nested folders, plus a corrupt JPEG, an empty file and a stray text file."""
    folder = tmp_path / "images"
    write_digit_images(folder / "batch1", 70, with_classes=True)
    (folder / "batch2").mkdir()
    (folder / "batch2" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "batch2" / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_end_to_end_on_a_messy_folder(messy_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--data", str(messy_folder), "--out", str(out), "--epochs", "2", "--batch-size", "24",
                 "--seed", "1", "--device", "cpu", *FAST])
    assert code == 0
    log = (out / "train.log").read_text()
    assert "skipped unreadable image batch2/corrupt.jpg" in log and "batch2/empty.png: empty file" in log
    assert "2 unreadable files skipped" in log
    epochs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "loss_mean" in l]
    assert len(epochs) == 2 and epochs[-1]["skipped_files"] == 2
    assert (out / "backbone.safetensors").is_file()
    assert main(["--data", str(messy_folder), "--out", str(out), "--epochs", "2", "--batch-size", "24",
                 "--seed", "1", *FAST]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["--data", str(messy_folder), "--out", str(out), "--epochs", "3", "--batch-size", "24",
                 "--seed", "1", "--resume", *FAST]) == 0
    assert "resumed from" in (out / "train.log").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/nothing"], "data not found"),
        (["--data", "{tmp}/empty"], "no image files under"),
        (["--data", "builtin:digits", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'lr'?"),
        (["--data", "builtin:digits", "--config", "{tmp}/missing.yaml"], "config file not found"),
        (["--data", "builtin:digits", "--set", "model.backbone=resnet19", "--epochs", "1"], "bad value for 'model.backbone': Value error, unknown backbone; available:"),
        (["--epochs", "1"], "no data given"),
        (["--data", "builtin:digits", "--device", "cuda:7"], "sees no CUDA GPU"),
        (["--data", "builtin:digits", "--device", "gpu-please"], "is not a torch device"),
    ],
)
def test_errors_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_print_config_list_backbones_and_module_entry_point(capsys):
    assert main(["--print-config", "--epochs", "3", "--set", "optim.lr=0.2"]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 3" in printed and "lr: 0.2" in printed
    assert main(["--list-backbones"]) == 0 and "resnet50" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "ssl_pretrain", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--resume" in result.stdout and "--set KEY=VALUE" in result.stdout
