import json

import pytest
from PIL import Image

from sphere_fast.cli import build_parser, main
from tests.tiny import TINY_CONFIG

COMMANDS = ["train", "sample", "sample-set", "reconstruct", "interpolate", "crossover", "manipulate", "convert", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"sphere-fast {command}" in capsys.readouterr().out


def test_every_command_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = ["train", "--data", "synthetic", "--out", str(out), "--steps", "3", "--batch-size", "6", "--workers", "0",
            "--accumulation-steps", "2", "--activation-checkpointing",
            "--model-config", json.dumps(TINY_CONFIG), "--per-class", "2", "--sample-steps", "1", "2"]
    assert main(args) == 0
    return out


def test_train_writes_checkpoint_plot_and_sample_grids(trained):
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert len((trained / "losses.jsonl").read_text().splitlines()) == 3
    recipe = json.loads((trained / "run_config.json").read_text())["train"]
    assert recipe["accumulation_steps"] == 2 and recipe["activation_checkpointing"] is True
    assert Image.open(trained / "loss.png").size[0] > 300
    for steps in (1, 2):
        grid = Image.open(trained / f"samples_{steps}step.png")
        assert grid.size == (2 + 2 * 18, 2 + 10 * 18)  # 10 classes x 2 samples of 16 px, 2 px gaps


def test_sample_convert_and_editing_commands(trained, tmp_path):
    assert main(["sample", "--checkpoint", str(trained), "--ema", "--steps", "2", "--per-class", "1", "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size == (20, 182)
    assert main(["convert", str(trained), str(tmp_path / "official.pth"), "--to-official"]) == 0
    assert main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "ours"), "--config", json.dumps(TINY_CONFIG)]) == 0
    assert main(["sample", "--checkpoint", str(tmp_path / "ours" / "converted"), "--per-class", "1", "--out", str(tmp_path / "c.png")]) == 0

    Image.open(trained / "samples_1step.png").crop((2, 2, 18, 18)).save(tmp_path / "a.png")
    Image.open(trained / "samples_1step.png").crop((2, 20, 18, 36)).save(tmp_path / "b.png")
    ck = ["--checkpoint", str(trained)]
    assert main(["reconstruct", *ck, str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out", str(tmp_path / "r.png")]) == 0
    assert Image.open(tmp_path / "r.png").size == (38, 38)
    assert main(["manipulate", *ck, str(tmp_path / "a.png"), "--target-class", "3", "--steps", "2", "--out", str(tmp_path / "m.png")]) == 0
    assert main(["crossover", *ck, str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--steps", "1", "--out", str(tmp_path / "x.png")]) == 0
    assert main(["interpolate", *ck, "--rows", "2", "--cols", "3", "--out", str(tmp_path / "i.png")]) == 0
    assert Image.open(tmp_path / "i.png").size == (2 + 3 * 18, 2 + 2 * 18)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--model-config", json.dumps(TINY_CONFIG)]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s.png")]) == 2
    assert "not a sphere_fast checkpoint" in capsys.readouterr().err
