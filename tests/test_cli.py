import argparse
import inspect
import json
import logging
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sphere_fast import checkpoint, cli, data, editing, sample_set, training
from sphere_fast.checkpoint import save_checkpoint
from sphere_fast.model import PRESETS, SphereEncoder
from sphere_fast.cli import (
    PERCEPTUAL_NETWORKS,
    TRAIN_PRESETS,
    _read_images,
    build_parser,
    class_grid,
    load_model,
    main,
    plot_losses,
    save_grid,
)
from tests.files import write_fashion_mnist
from tests.tiny import TINY_CONFIG, tiny_model

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


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_passes_through_torchrun_to_the_command(command, capsys):
    """torchrun's own parser classifies every argument, its script's too: an option that is an ambiguous prefix of
    its options (sample-set's --num, of --numa-binding and --numa_binding) stopped the README's torchrun command
    before any process started."""
    from torch.distributed.run import get_args_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    options = [o for action in sub.choices[command]._actions for o in action.option_strings]
    for option in options:
        launched = get_args_parser().parse_args(["--nproc_per_node=2", "-m", "sphere_fast.cli", command, option, "1"])
        assert launched.training_script_args == [command, option, "1"], option
    assert capsys.readouterr().err == ""


def test_verbose_shows_the_library_s_log_for_the_command_only(tmp_path, capfd, monkeypatch):
    """The library's INFO records (each op's backend, once a process; a run's start and checkpoints) showed in no
    command: the CLI configured no logging. With -v they go to stderr for the command's length; without it only
    warnings show."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # the CLI's process: no logging configured
    logger = logging.getLogger("sphere_fast")
    before = (list(logger.handlers), logger.level)
    run = ["train", "--data", "synthetic", "--steps", "2", "--batch-size", "6", "--workers", "0",
           "--model-config", json.dumps(TINY_CONFIG), "--sample-steps"]
    assert main(["-v", *run, "--out", str(tmp_path / "verbose")]) == 0
    err = capfd.readouterr().err
    assert re.search(r"^sphere_fast: training \S+verbose to step 2 from step 0 on 1 process\(es\), cpu$", err, re.M)
    assert re.search(r"^sphere_fast: saved \S+step-00000002$", err, re.M)
    assert (logger.handlers, logger.level) == before  # as the command found them
    assert main([*run, "--out", str(tmp_path / "quiet")]) == 0
    assert "sphere_fast: training" not in capfd.readouterr().err
    from torch.distributed.run import get_args_parser

    launched = get_args_parser().parse_args(["--nproc_per_node=2", "-m", "sphere_fast.cli", "-v", "train"])
    assert launched.training_script_args == ["-v", "train"]


def test_the_readme_torchrun_commands_reach_sphere_fast():
    from torch.distributed.run import get_args_parser

    text = (Path(__file__).parents[1] / "README.md").read_text()
    commands = [shlex.split(c.replace("\\\n", " ").split("#")[0])
                for c in re.findall(r"^torchrun .*?(?<!\\)$", text, flags=re.M | re.S)]
    assert len(commands) >= 2
    for command in commands:
        launched = get_args_parser().parse_args(command[1:])
        assert launched.training_script == "sphere_fast.cli" and launched.training_script_args[0] in COMMANDS
        cli.build_parser().parse_args(launched.training_script_args)


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
    for extra in (["--preset", "sphere-l-imagenet"], ["--key", "ema_model"]):  # nothing to choose: refused, not ignored
        assert main(["convert", str(trained), str(tmp_path / "x.pth"), "--to-official", *extra]) == 2
    assert not (tmp_path / "x.pth").exists()
    (tmp_path / "a_folder").mkdir()  # an OSError is one line, and no full-size temporary file is left beside it
    assert main(["convert", str(trained), str(tmp_path / "a_folder"), "--to-official"]) == 2
    assert not list(tmp_path.glob(".a_folder*"))
    assert main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "ours"), "--config", json.dumps(TINY_CONFIG)]) == 0
    assert main(["sample", "--checkpoint", str(tmp_path / "ours" / "converted"), "--per-class", "1", "--out", str(tmp_path / "c.png")]) == 0

    Image.open(trained / "samples_1step.png").crop((2, 2, 18, 18)).save(tmp_path / "a.png")
    Image.open(trained / "samples_1step.png").crop((2, 20, 18, 36)).save(tmp_path / "b.png")
    ck = ["--checkpoint", str(trained)]
    assert main(["reconstruct", *ck, str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out", str(tmp_path / "r.png")]) == 0
    assert Image.open(tmp_path / "r.png").size == (38, 38)
    a_b = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert main(["manipulate", *ck, *a_b, "--target-class", "3", "--steps", "2", "--out", str(tmp_path / "m.png")]) == 0
    assert main(["crossover", *ck, *a_b, "--steps", "1", "--out", str(tmp_path / "x.png")]) == 0
    assert main(["interpolate", *ck, "--rows", "2", "--cols", "3", "--out", str(tmp_path / "i.png")]) == 0
    assert Image.open(tmp_path / "i.png").size == (2 + 3 * 18, 2 + 2 * 18)


def test_grids_hold_the_librarys_images(tmp_path):
    """The reconstruct and editing grids hold what the library makes from the same images and seeds (--seed 4),
    in their documented places, on a model whose images vary (a 3-step run's are nearly flat)."""
    model = tiny_model().eval()
    save_checkpoint(tmp_path / "ckpt", model, name="perturbed")
    rng = np.random.default_rng(0)
    a_b = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    for path, width in zip(a_b, (24, 16)):  # the first is resized and cropped to the model's 16 px
        Image.fromarray(rng.integers(0, 256, (16, width, 3), dtype=np.uint8)).save(path)
    x = _read_images(a_b, 16, "cpu")
    ck = ["--checkpoint", str(tmp_path / "ckpt"), "--seed", "4"]
    assert main(["reconstruct", *ck, *a_b, "--out", str(tmp_path / "r.png")]) == 0
    expected = torch.stack([x, editing.reconstruct_images(model, x)])  # inputs on top
    assert torch.equal(grid_tiles(tmp_path / "r.png", rows=2, cols=2), as_png(expected))
    assert main(["manipulate", *ck, *a_b, "--target-class", "3", "--steps", "2", "--out", str(tmp_path / "m.png")]) == 0
    steps = editing.manipulate(model, x, 3, steps=2, seeds=torch.tensor([4 << 32, (4 << 32) + 1]))  # image_seeds
    assert torch.equal(grid_tiles(tmp_path / "m.png", rows=3, cols=2), as_png(torch.stack([x, *steps])))
    assert main(["crossover", *ck, *a_b, "--steps", "1", "--out", str(tmp_path / "x.png")]) == 0
    composite, steps = editing.crossover(model, x[:1], x[1:], steps=1, seeds=torch.tensor([4 << 32]))
    expected = torch.stack([x[:1], x[1:], composite, *steps]).transpose(0, 1)
    assert torch.equal(grid_tiles(tmp_path / "x.png", rows=1, cols=4), as_png(expected))
    assert len({tile.numpy().tobytes() for tile in grid_tiles(tmp_path / "x.png", rows=1, cols=4)[0]}) == 4
    assert main(["interpolate", *ck, "--labels", "1", "2", "3", "4", "--rows", "2", "--cols", "3",
                 "--out", str(tmp_path / "i.png")]) == 0
    grid = editing.interpolate(model, (4 << 32) + torch.arange(4), torch.tensor([1, 2, 3, 4]), rows=2, cols=3)
    assert torch.equal(grid_tiles(tmp_path / "i.png", rows=2, cols=3), as_png(grid))


def test_convert_takes_the_config_as_json_a_file_or_a_preset(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(checkpoint, "official_to_checkpoint",
                        lambda source, dest, config, key: calls.append((source, dest, config, key)) or dest)
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    assert main(["convert", "a.pth", "out", "--config", str(tmp_path / "config.json"), "--key", "ema"]) == 0
    assert main(["convert", "a.pth", "out", "--config", json.dumps(TINY_CONFIG)]) == 0
    assert main(["convert", "a.pth", "out", "--preset", "sphere-l-imagenet"]) == 0
    assert main(["convert", "a.pth", "out", "--preset", "fashion-mnist-demo"]) == 0
    demo = TRAIN_PRESETS["fashion-mnist-demo"]["model"]
    configs = [TINY_CONFIG, TINY_CONFIG, PRESETS["sphere-l-imagenet"]["config"], demo]
    assert calls == [("a.pth", "out", c, k) for c, k in zip(configs, ["ema", "model", "model", "model"])]
    with pytest.raises(SystemExit, match="needs the model config"):
        main(["convert", "a.pth", "out"])


def as_png(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] quantised as save_grid writes them."""
    return (images * 255).round().byte()


def grid_tiles(path, rows: int, cols: int, size: int = 16) -> torch.Tensor:
    """[rows, cols, 3, size, size] uint8 images of a save_grid PNG (2 px gaps), checking the grid's size."""
    grid = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert tuple(grid.shape[1:]) == (2 + rows * (size + 2), 2 + cols * (size + 2))
    tiles = grid[:, 2:, 2:].unflatten(1, (rows, size + 2)).unflatten(3, (cols, size + 2))[:, :, :size, :, :size]
    return tiles.permute(1, 3, 0, 2, 4)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The library calls behind the commands, replaced by stand-ins that record their arguments and return
    results of the right shapes: the commands' own work is parsing and passing options on."""
    calls: dict = {}
    image = torch.zeros(1, 3, 16, 16)

    def stand_in(name: str, result: object):
        def call(*args, **kwargs):
            calls[name] = (args, kwargs)
            return result
        return call

    monkeypatch.setattr(checkpoint, "load_checkpoint", stand_in("load_checkpoint", (tiny_model().eval(), {})))
    monkeypatch.setattr(cli, "class_grid", stand_in("class_grid", (image, 1)))
    monkeypatch.setattr(editing, "crossover", stand_in("crossover", (image, [image, image])))
    monkeypatch.setattr(editing, "manipulate", stand_in("manipulate", [image]))
    monkeypatch.setattr(editing, "interpolate", stand_in("interpolate", torch.zeros(2, 3, 3, 16, 16)))
    monkeypatch.setattr(sample_set, "write_sample_set", stand_in("write_sample_set", 0))
    monkeypatch.setattr(checkpoint, "weights_sha256", lambda path, ema: f"<{path} {ema}>")
    return calls


def test_commands_pass_their_options_on(recorded, tmp_path):
    """Each option reaches the call it is for (the tests above run the commands for real, with defaults)."""
    png, out = str(tmp_path / "a.png"), str(tmp_path / "o.png")
    Image.new("RGB", (16, 16)).save(png)
    model = ["--checkpoint", "run", "--ema", "--seed", "7"]
    assert main(["sample", *model, "--steps", "3", "--cfg", "1.5", "--per-class", "2", "--out", out]) == 0
    assert recorded["load_checkpoint"] == (("run",), {"ema": True})
    assert recorded["class_grid"][1] == {"steps": 3, "cfg": 1.5, "seed": 7}
    assert main(["crossover", *model, png, png, "--mask", "horizontal", "--swap", "--steps", "2", "--out", out]) == 0
    (_, _, _, mask), kwargs = recorded["crossover"]
    assert mask == "horizontal" and kwargs.pop("seeds").tolist() == [7 << 32] and kwargs == {"swap": True, "steps": 2}
    assert main(["manipulate", *model, png, "--target-class", "3", "--steps", "2", "--noise-scaler", "0.5",
                 "--out", out]) == 0
    (_, _, target), kwargs = recorded["manipulate"]
    assert target == 3 and kwargs.pop("seeds").tolist() == [7 << 32] and kwargs == {"steps": 2, "noise_scaler": 0.5}
    assert main(["interpolate", *model, "--labels", "1", "2", "3", "4", "--rows", "2", "--cols", "3", "--method",
                 "lerp", "--steps", "2", "--cfg", "1.2", "--out", out]) == 0
    (_, seeds, labels), kwargs = recorded["interpolate"]
    assert seeds.tolist() == [(7 << 32) + i for i in range(4)] and labels.tolist() == [1, 2, 3, 4]
    assert kwargs == {"rows": 2, "cols": 3, "method": "lerp", "steps": 2, "cfg": 1.2}
    assert main(["interpolate", *model, "--seeds", "3", "1", "4", "1", "--out", out]) == 0
    assert recorded["interpolate"][0][1].tolist() == [3, 1, 4, 1]
    assert main(["sample-set", *model, "--num-images", "5", "--batch-size", "2", "--steps", "2", "--cfg", "1.4",
                 "--cfg-position", "dec", "--dtype", "fp32", "--out", str(tmp_path / "set")]) == 0
    (_, folder, num), kwargs = recorded["write_sample_set"]
    assert (folder, num) == (str(tmp_path / "set"), 5) and kwargs == {
        "batch_size": 2, "steps": 2, "cfg": 1.4, "cfg_position": "dec", "seed": 7, "weights": "sha256 <run True> (ema)",
        "rank": 0, "world_size": 1, "progress": True}


def test_train_passes_its_options_on(monkeypatch, tmp_path):
    runs: list = []
    monkeypatch.setattr(training, "fit", lambda run, resume: runs.append((run, resume)) or SimpleNamespace(
        dist=training.DistInfo(rank=1, world_size=2)))  # rank 1 plots and samples nothing
    weights = {"recon_dist": 1.0, "recon_perc": 0.5, "con_dist": 2.0, "con_perc": 0.0, "latent": 0.5}
    assert main(["train", "--out", str(tmp_path), "--data", "synthetic", "--steps", "7", "--batch-size", "12",
                 "--lr", "3e-3", "--warmup", "2", "--seed", "5", "--autocast", "off", "--loss-weights",
                 json.dumps(weights), "--checkpoint-every", "3", "--workers", "0", "--no-resume",
                 "--no-synthetic-fallback", "--perceptual-weights", "vgg16=v=1.pth", "--perceptual-weights",
                 "lpips=l.pth"]) == 0
    (run, resume), = runs
    # split at the first '='; the flag's uses add up
    assert run.train.perceptual_weights == {"vgg16": "v=1.pth", "lpips": "l.pth"}
    assert not resume and (run.data, run.out, run.checkpoint_every, run.workers) == ("synthetic", str(tmp_path), 3, 0)
    assert not run.synthetic_fallback
    recipe = run.train
    assert (recipe.total_steps, recipe.global_batch, recipe.base_lr, recipe.warmup_steps) == (7, 12, 3e-3, 2)
    assert recipe.seed == 5
    assert recipe.autocast == "off" and recipe.loss_weights == weights
    # a preset's loss weights by name; without --warmup the preset's 50 warmup steps are cut to the run's 20
    assert main(["train", "--out", str(tmp_path), "--steps", "20", "--loss-weights", "imagenet"]) == 0
    run, resume = runs[1]
    assert resume and run.synthetic_fallback and run.train.loss_weights == "imagenet" and run.train.warmup_steps == 20
    # rank 0 plots the losses and samples a grid per --sample-steps entry from the EMA weights
    ema = tiny_model().eval()
    monkeypatch.setattr(training, "fit", lambda run, resume: SimpleNamespace(
        dist=training.DistInfo(), step=3, ema=ema, model=tiny_model(seed=1)))
    (tmp_path / "losses.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0, "lr": 0.1}) + "\n")
    grids: list = []
    monkeypatch.setattr(cli, "class_grid", lambda model, per_class, **kwargs: grids.append((model, per_class, kwargs))
                        or (torch.zeros(1, 3, 4, 4), 1))
    assert main(["train", "--out", str(tmp_path), "--sample-steps", "1", "3", "--per-class", "2", "--seed", "6"]) == 0
    assert grids == [(ema, 2, {"steps": steps, "cfg": 1.0, "seed": 6}) for steps in (1, 3)]
    assert (tmp_path / "loss.png").exists() and (tmp_path / "samples_3step.png").exists()


def test_train_lr_floor_ema_and_the_hard_cases_angle(monkeypatch, tmp_path, capsys):
    """--lr alone keeps the preset's floor ratio (1/100: the cosine falls, never rises), --min-lr and --ema-decay
    set the paper's values, a floor above the peak is refused; a noise angle given in --model-config moves the hard
    cases' angle with it (min(angle + 5, 89))."""
    runs: list = []
    monkeypatch.setattr(training, "fit", lambda run, resume: runs.append(run) or SimpleNamespace(
        dist=training.DistInfo(rank=1, world_size=2)))
    assert main(["train", "--out", str(tmp_path), "--lr", "1e-5", "--steps", "100"]) == 0
    recipe = runs[-1].train
    assert recipe.min_lr == pytest.approx(1e-7)
    rates = [training.learning_rate(step, recipe) for step in range(recipe.warmup_steps, 101)]
    assert all(a >= b for a, b in zip(rates, rates[1:])) and rates[-1] == pytest.approx(1e-7 * 64 / 256)
    assert main(["train", "--out", str(tmp_path), "--lr", "1e-4", "--min-lr", "1e-6", "--ema-decay", "0.9997",
                 "--model-config", json.dumps({"noise_sigma_max_angle": 85})]) == 0
    run = runs[-1]
    assert (run.train.base_lr, run.train.min_lr, run.train.ema_decay) == (1e-4, 1e-6, 0.9997)
    assert SphereEncoder(**run.model).mix_hard_cases_max_angle == 89
    assert main(["train", "--out", str(tmp_path), "--lr", "1e-5", "--min-lr", "1e-4"]) == 2
    assert "min_lr (0.0001) must be <= base_lr (1e-05)" in capsys.readouterr().err
    assert len(runs) == 2


def test_train_refuses_unused_perceptual_weights_and_bad_intervals_before_training(monkeypatch, tmp_path, capsys):
    """--perceptual-weights with loss weights that put 0 on the perceptual terms (the demo preset's) would be
    ignored, and --checkpoint-every 0 would fail after the first step: both are refused before training."""
    monkeypatch.setattr(training, "fit", lambda run, resume: pytest.fail("refused options reached training"))
    files = ["vgg16=/nope/vgg16.pth", "lpips=/nope/vgg.pth", "convnext_small=/nope/convnext_small.pth"]
    assert main(["train", "--out", str(tmp_path), "--perceptual-weights", *files]) == 2
    assert "perceptual_weights are given but" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:
        main(["train", "--out", str(tmp_path), "--checkpoint-every", "0"])
    assert exit_code.value.code == 2
    assert "argument --checkpoint-every: must be an int >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sample", "interpolate", "sample-set", "train"])
def test_a_seed_outside_the_image_seeds_range_is_refused_by_its_flag(command, capsys):
    """Image i draws the seed seed * 2**32 + i: --seed -1 or 2**31 failed only after the model had loaded, naming
    `seed`, not the flag."""
    for seed in ("-1", str(2**31)):
        with pytest.raises(SystemExit) as exit_code:
            main([command, "--seed", seed])
        assert exit_code.value.code == 2
        assert f"argument --seed: must be an int in [0, 2**31) (image i draws seed * 2**32 + i), got {seed}" in (
            capsys.readouterr().err)


def test_train_with_missing_perceptual_weight_files_writes_nothing(tmp_path, capsys):
    """Files the loss uses are opened as the trainer is built: a missing one fails before anything is written."""
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data", "synthetic", "--batch-size", "6", "--workers", "0",
                 "--model-config", json.dumps(TINY_CONFIG), "--loss-weights", "cifar10", "--perceptual-weights",
                 "vgg16=/nope/vgg16.pth", "lpips=/nope/vgg.pth", "convnext_small=/nope/convnext_small.pth"]) == 2
    assert "not found" in capsys.readouterr().err and not out.exists()


def test_a_sample_set_is_not_finished_on_other_weights(tmp_path, capsys):
    """A rerun that forgot --ema filled the set's missing images from the live weights without a word; the set
    keeps the SHA-256 of its weights and refuses another's."""
    model = tiny_model().eval()
    save_checkpoint(tmp_path / "ckpt", model, ema_weights={k: v + 0.01 for k, v in model.state_dict().items()})
    common = ["sample-set", "--checkpoint", str(tmp_path / "ckpt"), "--steps", "1", "--out", str(tmp_path / "set")]
    assert main([*common, "--ema", "--num-images", "2"]) == 0
    capsys.readouterr()
    assert main([*common, "--num-images", "3"]) == 2
    assert re.search(r"other options \(weights 'sha256 \w+ \(ema\)' -> 'sha256 \w+ \(model\)'\)",
                     capsys.readouterr().err)
    assert main([*common, "--ema", "--num-images", "3"]) == 0 and "wrote 1 images" in capsys.readouterr().out


def test_sample_set_under_torchrun_takes_its_rank_and_local_gpu(recorded, monkeypatch, tmp_path):
    monkeypatch.setattr(training, "init_distributed", lambda: training.DistInfo(rank=1, world_size=2, local_rank=1))
    devices: list[tuple[str, int]] = []
    monkeypatch.setattr(cli, "load_model",
                        lambda args, rank: devices.append((args.device, rank)) or tiny_model().eval())
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(sample_set, "pack_npz", lambda *a, **k: pytest.fail("only rank 0 packs the .npz"))
    assert main(["sample-set", "--device", "cuda", "--num-images", "4", "--npz", "--out", str(tmp_path)]) == 0
    (model, _, _), kwargs = recorded["write_sample_set"]
    assert devices == [("cuda:1", 1)] and (kwargs["rank"], kwargs["world_size"]) == (1, 2)
    assert kwargs["progress"] is False  # rank 0's bar alone: on one terminal the processes' bars overwrote each other
    assert next(model.parameters()).dtype == torch.bfloat16  # the default on a GPU


def test_models_from_a_preset_follow_the_seed():
    def preset_model(seed: str) -> dict:
        return load_model(build_parser().parse_args(["sample", "--seed", seed, "--device", "cpu"])).state_dict()

    first = preset_model("1")
    assert all(torch.equal(v, first[k]) for k, v in preset_model("1").items())
    assert not all(torch.equal(v, first[k]) for k, v in preset_model("2").items())


def test_save_grid_and_plot_losses(tmp_path):
    path = save_grid(torch.rand(3, 3, 4, 4), tmp_path / "new" / "grid.png", nrow=2)  # the folder is made
    assert Image.open(path).size == (2 + 2 * 6, 2 + 2 * 6)  # the last row holds one image
    # values past [0, 1] are clamped, not wrapped around by the uint8 conversion
    path = save_grid(torch.tensor([1.5, -0.5]).view(1, 1, 1, 2).expand(1, 3, 1, 2), tmp_path / "clamped.png", nrow=1)
    assert np.asarray(Image.open(path))[2, 2:4].tolist() == [[255] * 3, [0] * 3]
    (tmp_path / "losses.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no losses"):
        plot_losses(tmp_path / "losses.jsonl", tmp_path / "loss.png")


def test_a_grid_that_fails_to_write_leaves_the_old_one_whole(tmp_path, monkeypatch):
    """The grid was written in place: a write that failed part way (a full disk) left a truncated PNG."""
    path = save_grid(torch.rand(2, 3, 4, 4), tmp_path / "grid.png", nrow=2)
    old = path.read_bytes()

    def disk_full(image, fp, *args, **kwargs):
        Path(fp).write_bytes(old[:18])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_grid(torch.rand(2, 3, 4, 4), path, nrow=2)
    assert path.read_bytes() == old and list(tmp_path.iterdir()) == [path]


@pytest.fixture
def plotted_axes(monkeypatch) -> list:
    """The axes of each figure plot_losses makes."""
    import matplotlib.pyplot as plt

    axes = []
    subplots = plt.subplots

    def keep_axes(*args, **kwargs):
        fig, ax = subplots(*args, **kwargs)
        axes.append(ax)
        return fig, ax

    monkeypatch.setattr(plt, "subplots", keep_axes)
    return axes


def test_the_loss_plot_shows_each_loss_term_smoothed(tmp_path, plotted_axes):
    """One smoothed line per loss term (not the lr or the gradient norm), averaged over a thirtieth of the run;
    a term at exactly 0 (a consistency loss at a zero-initialised start) does not put the log axis at 0."""
    rows = [{"step": i, "loss": 1.0 + i, "recon": 0.5, "pix_con": 0.0, "lr": 0.1, "grad_norm": 3.0} for i in range(60)]
    (tmp_path / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_losses(tmp_path / "losses.jsonl", tmp_path / "loss.png")
    ax, = plotted_axes
    smoothed = {line.get_label(): line.get_ydata() for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert list(smoothed) == ["loss", "recon", "pix_con"]
    assert len(smoothed["loss"]) == 59 and smoothed["loss"][0] == 1.5  # window 60 // 30 = 2
    assert ax.get_ylim()[0] == 1e-12


def test_bench_runs_the_gpu_check_script(monkeypatch, tmp_path, capsys):
    """OUT is the caller's (the script runs from the source tree, where a relative OUT would land), and the
    options after -- go on to the script."""
    calls: list = []
    monkeypatch.setattr(cli.subprocess, "call", lambda args: calls.append(args) or 0)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--out", "results", "--", "--budget", "300", "--phases", "tests"]) == 0
    script = str(Path(cli.__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh")
    assert calls == [["bash", script, str((tmp_path / "results").resolve()), "--budget", "300", "--phases", "tests"]]
    # an installed package: no script, or another distribution's top-level benchmarks/ beside it
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "sphere_fast" / "cli.py"))
    assert main(["bench"]) == 2 and "runs from a source checkout" in capsys.readouterr().out
    (tmp_path / "site-packages" / "benchmarks").mkdir(parents=True)
    (tmp_path / "site-packages" / "benchmarks" / "gpu_check.sh").write_text("exit 0\n")
    assert main(["bench"]) == 2 and "runs from a source checkout" in capsys.readouterr().out
    assert len(calls) == 1


def test_plot_losses_takes_nan_and_changed_terms(tmp_path, plotted_axes):
    """A skipped step logs null (an older log NaN; axis limits refuse it), and a resume with other loss weights drops
    or adds terms: each term is drawn where it was logged, the axis set from the finite values (or left alone
    without any). The step's time and skipped flag are not losses."""
    rows = [{"step": 0, "time": 1e9, "loss": 1.0, "recon_perc": 0.3, "skipped": False},
            {"step": 1, "time": 1e9, "loss": None, "latent": 0.2, "skipped": True},
            {"step": 2, "loss": 0.5, "latent": float("inf")}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_losses(tmp_path / "l.jsonl", tmp_path / "l.png").exists()
    ax = plotted_axes[-1]
    smoothed = {line.get_label(): line.get_xdata().tolist() for line in ax.get_lines()
                if not line.get_label().startswith("_")}
    assert smoothed == {"loss": [0, 1, 2], "recon_perc": [0], "latent": [1, 2]}
    assert ax.get_ylim()[0] == 0.1  # half the lowest finite value
    (tmp_path / "l.jsonl").write_text(json.dumps({"step": 0, "loss": float("nan")}) + "\n")
    assert plot_losses(tmp_path / "l.jsonl", tmp_path / "l.png").exists()


def test_train_still_writes_the_grids_when_the_plot_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(training, "fit", lambda run, resume: SimpleNamespace(
        dist=training.DistInfo(), step=3, ema=tiny_model().eval()))
    def failing_plot(log_path, png):
        raise RuntimeError("no backend")

    monkeypatch.setattr(cli, "plot_losses", failing_plot)
    monkeypatch.setattr(cli, "class_grid", lambda model, per_class, **kwargs: (torch.zeros(1, 3, 4, 4), 1))
    assert main(["train", "--out", str(tmp_path), "--sample-steps", "1"]) == 0
    assert "sphere-fast train: warning: no loss plot (RuntimeError: no backend)" in capsys.readouterr().err
    assert (tmp_path / "samples_1step.png").exists()


@pytest.mark.parametrize("args, message", [
    (["train", "--model-config", "{x"], "argument --model-config: '{x' is not valid JSON"),
    (["train", "--model-config", "[1]"], "argument --model-config: must be a JSON object {...}, '[1]' holds a list"),
    (["train", "--loss-weights", '{"recon_dist": 1'], "argument --loss-weights: '{\"recon_dist\": 1' is not valid"),
    (["train", "--loss-weights", "cifar"], "argument --loss-weights: loss weights preset must be one of"),
    (["train", "--loss-weights", '{"recon_dist": 1}'], "argument --loss-weights: custom loss weights need"),
    (["train", "--perceptual-weights", "vgg16.pth"],
     "argument --perceptual-weights: must be NAME=PATH with NAME one of vgg16, lpips, convnext_small, got 'vgg16.pth'"),
    (["train", "--perceptual-weights", "vgg16=a.pth", "vgg=b.pth"], "argument --perceptual-weights: must be NAME=PATH"),
    (["train", "--perceptual-weights", "lpips=a.pth", "vgg16=b.pth", "lpips=c.pth"],
     "argument --perceptual-weights: lpips named more than once"),
    (["train", "--perceptual-weights", "lpips=a.pth", "--perceptual-weights", "lpips=c.pth"],
     "argument --perceptual-weights: lpips named more than once"),
    (["convert", "a.pth", "out", "--config", "{bad"], "argument --config: '{bad' is not valid JSON"),
    (["convert", "a.pth", "out", "--config", "/nowhere/config.json"],
     "argument --config: must be a JSON object or a JSON file; cannot read '/nowhere/config.json'"),
    (["convert", "a.pth", "out", "--preset", "sphere-q"], "argument --preset: invalid choice: 'sphere-q' (choose from"),
])
def test_options_parsed_from_text_name_their_flag(args, message, monkeypatch, capsys):
    """JSON and NAME=PATH options are parsed by argparse, so a bad one is named by its flag (and an unknown
    perceptual network is an error, not dropped); convert --preset lists the presets as the other commands do."""
    monkeypatch.setattr(training, "fit", lambda run, resume: pytest.fail("a bad option reached training"))
    monkeypatch.setattr(checkpoint, "official_to_checkpoint", lambda *a, **k: pytest.fail("converted"))
    with pytest.raises(SystemExit) as exit_code:
        main(args)
    assert exit_code.value.code == 2 and message in capsys.readouterr().err


def test_perceptual_networks_are_the_files_the_loss_takes():
    params = inspect.signature(training.PerceptualLoss.from_files).parameters.values()
    assert PERCEPTUAL_NETWORKS == tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def test_a_model_without_checkpoint_is_said_to_be_untrained(recorded, monkeypatch, tmp_path, capsys):
    """sample and the edit commands at a preset's random init write flat grey images and succeed: they say so."""
    monkeypatch.setattr(editing, "manipulate", lambda model, x, target, **kwargs: [x])  # the demo's 32 px
    png, out = str(tmp_path / "a.png"), str(tmp_path / "o.png")
    Image.new("RGB", (16, 16)).save(png)
    for args in (["sample"], ["manipulate", png, "--target-class", "1"]):
        assert main([*args, "--device", "cpu", "--out", out]) == 0
        assert (f"sphere-fast {args[0]}: warning: no --checkpoint: the model is an untrained fashion-mnist-demo at "
                "random init") in capsys.readouterr().err
    load_model(build_parser().parse_args(["sample-set", "--device", "cpu"]), rank=1)  # torchrun: rank 0 says it
    assert "warning" not in capsys.readouterr().err
    assert main(["sample", "--checkpoint", "run", "--out", out]) == 0
    assert "warning" not in capsys.readouterr().err


def test_train_after_a_resume_reports_its_own_steps_and_keeps_the_warmup(tmp_path, capsys):
    """Resumed at step 2 with --steps 4 it trained 2 steps; the first run's warmup (the preset's, cut to its 2
    steps) stays, where the new --steps had moved it to 4 (back into warmup) and the resume warning blamed it."""
    run = ["train", "--data", "synthetic", "--out", str(tmp_path), "--batch-size", "6", "--workers", "0",
           "--model-config", json.dumps(TINY_CONFIG), "--sample-steps"]
    assert main([*run, "--steps", "2"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="resuming with another recipe") as warned:
        assert main([*run, "--steps", "4"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert "total_steps 2 -> 4" in str(warned[0].message) and "warmup" not in str(warned[0].message)
    assert json.loads((tmp_path / "run_config.json").read_text())["train"]["warmup_steps"] == 2
    with pytest.warns(UserWarning, match="warmup_steps 2 -> 3"):  # given, it is taken
        assert main([*run, "--steps", "5", "--warmup", "3"]) == 0
    assert json.loads((tmp_path / "run_config.json").read_text())["train"]["warmup_steps"] == 3
    # without --model-config it resumes its run's model, not the preset's (refused as another model before), and
    # a partial one changes the run's model, not the preset's
    assert main([*run[:-3], "--sample-steps", "--steps", "6", "--warmup", "3"]) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    same = json.dumps({"num_classes": TINY_CONFIG["num_classes"]})
    assert main([*run[:-3], "--model-config", same, "--sample-steps", "--steps", "7", "--warmup", "3"]) == 0
    assert "trained 1 steps" in capsys.readouterr().out


def test_train_resumes_on_its_runs_data(tmp_path, capsys):
    """Without --data a resume reads its run's data, not the preset's (Fashion-MNIST, or synthetic shapes where its
    files are missing); other data given is taken, with a warning, as is another batch size, which reads the data in
    another order."""
    images = tmp_path / "images"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (80 * i, 40, 200 if label == "a" else 10)).save(images / label / f"{i}.png")
    run = ["train", "--out", str(tmp_path / "run"), "--batch-size", "6", "--workers", "0", "--model-config",
           json.dumps(TINY_CONFIG), "--sample-steps"]
    assert main([*run, "--data", str(images), "--steps", "1"]) == 0
    with pytest.warns(UserWarning, match="resuming with another recipe") as warned:
        assert main([*run, "--steps", "2"]) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    assert not any("other data" in str(w.message) or "Fashion-MNIST" in str(w.message) for w in warned)
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["data"] == str(images)
    with pytest.warns(UserWarning) as warned:  # both: pytest would show the one a match leaves out
        assert main([*run, "--data", "synthetic", "--steps", "3"]) == 0
    messages = {str(w.message) for w in warned}
    assert f"resuming on other data than the checkpoint's: '{images}' -> 'synthetic'" in messages
    assert "resuming with another recipe than the checkpoint's: total_steps 2 -> 3" in messages
    smaller = [*run[:4], "3", *run[5:]]  # --batch-size 3
    with pytest.warns(UserWarning, match="global_batch 6 -> 3, total_steps 3 -> 4; the data is read in another order"):
        assert main([*smaller, "--steps", "4"]) == 0


def test_train_resumes_a_run_that_fell_back_to_synthetic_data_on_synthetic_data(tmp_path, monkeypatch):
    """The preset's Fashion-MNIST missing, the run trains on synthetic shapes and records them: a resume without
    --data keeps them, silently, though Fashion-MNIST is there now (the record said "fashion-mnist", and the resume
    read Fashion-MNIST without a word)."""
    fashion = tmp_path / "fashion-mnist"
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", fashion)
    run = ["train", "--out", str(tmp_path / "run"), "--batch-size", "6", "--workers", "0", "--model-config",
           json.dumps(TINY_CONFIG), "--sample-steps"]
    with pytest.warns(UserWarning, match="falling back to synthetic shapes"):
        assert main([*run, "--steps", "1"]) == 0
    write_fashion_mnist(fashion)
    with pytest.warns(UserWarning) as warned:
        assert main([*run, "--steps", "2"]) == 0
    messages = [str(w.message) for w in warned]
    assert messages and not any("other data" in m or "falling back" in m for m in messages)  # the recipe's only
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["data"] == "synthetic"


def test_train_passes_the_workers_start_method(monkeypatch, tmp_path):
    runs = []

    def record(run, resume):
        runs.append(run)
        raise KeyboardInterrupt  # stops the command once the run config is made

    monkeypatch.setattr(training, "fit", record)
    for given, expected in ((["--start-method", "spawn"], "spawn"), ([], None)):
        with pytest.raises(KeyboardInterrupt):
            main(["train", "--out", str(tmp_path), "--data", "synthetic", *given])
        assert runs.pop().start_method == expected
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--start-method", "thread"])


def test_train_names_a_corrupt_checkpoint_it_would_resume_from(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(training, "fit", lambda run, resume: pytest.fail("a corrupt checkpoint reached training"))
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002" / "manifest.json").write_text("{")
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002\n")
    assert main(["train", "--out", str(tmp_path)]) == 2
    assert f"checkpoint {tmp_path / 'checkpoints' / 'step-00000002'} is corrupt" in capsys.readouterr().err


def test_class_grid_seeds_its_samples():
    """A grid's images follow --seed: the same seed gives the same grid, another seed another one."""
    model = tiny_model().eval()
    first, nrow = class_grid(model, 1, steps=1, cfg=1.0, seed=0)
    assert nrow == 1 and first.shape == (10, 3, 16, 16)
    assert torch.equal(class_grid(model, 1, steps=1, cfg=1.0, seed=0)[0], first)
    assert not torch.equal(class_grid(model, 1, steps=1, cfg=1.0, seed=1)[0], first)
    # at most 16 class rows; an unconditional model's grid is square
    images, nrow = class_grid(tiny_model(num_classes=20).eval(), 1, steps=1, cfg=1.0, seed=0)
    assert nrow == 1 and images.shape[0] == 16
    images, nrow = class_grid(tiny_model(num_classes=0).eval(), 3, steps=1, cfg=1.0, seed=0)
    assert nrow == 3 and images.shape[0] == 9


def test_bad_input_is_a_clear_error(tmp_path, capsys, monkeypatch):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--model-config", json.dumps(TINY_CONFIG)]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s.png")]) == 2
    assert "not a sphere_fast checkpoint" in capsys.readouterr().err
    assert main(["sample", "--ema", "--out", str(tmp_path / "s.png")]) == 2
    assert "--ema needs --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:  # argparse: the choices named, exit status 2
        main(["sample", "--preset", "sphere-q-mnist"])
    assert exit_code.value.code == 2 and "invalid choice: 'sphere-q-mnist'" in capsys.readouterr().err
    for command, flag in (("sample", "--per-class"), ("sample", "--steps"), ("sample-set", "--batch-size"),
                          ("interpolate", "--cols"), ("train", "--sample-steps")):
        with pytest.raises(SystemExit) as exit_code:  # named by its flag, not by the library's parameter
            main([command, flag, "0"])
        assert exit_code.value.code == 2 and f"argument {flag}: must be an int >= 1, got 0" in capsys.readouterr().err
    # a backend that cannot run here is one line, not a traceback
    monkeypatch.setenv("SPHERE_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["sample", "--device", "cpu", "--per-class", "1", "--out", str(tmp_path / "s.png")]) == 2
    assert "backend 'triton' is not available" in capsys.readouterr().err


def test_edit_commands_default_to_the_librarys_steps():
    """The CLI's defaults are the Python functions' (crossover: one edit step), and its help says what a step is."""
    parser = build_parser()
    crossover = parser.parse_args(["crossover", "a.png", "b.png"])
    assert crossover.steps == inspect.signature(editing.crossover).parameters["steps"].default == 1
    manipulate = parser.parse_args(["manipulate", "a.png", "--target-class", "1"])
    assert manipulate.steps == inspect.signature(editing.manipulate).parameters["steps"].default
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("crossover", "manipulate"):
        assert "edit steps" in sub.choices[name].format_help()
