"""Sample sets for evaluation: the files hold the Sampler's images for the set's seeds and labels, whatever the
batch size and process count; reruns resume; the .npz packs them; bad arguments are refused."""

import os
import re
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from sphere_fast import Sampler, sample_set, sampling
from sphere_fast.checkpoint import save_checkpoint
from sphere_fast.cli import main
from sphere_fast.sample_set import (
    batches_of,
    image_labels,
    image_path,
    image_seeds,
    pack_npz,
    to_uint8,
    write_sample_set,
)
from tests.cuda_graph_emulator import CudaGraphEmulator, emulated_cuda_graphs  # noqa: F401 (fixture)
from tests.test_distributed import free_port
from tests.tiny import tiny_model

NUM, STEPS, CFG, SEED = 7, 2, 1.4, 3


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def read_set(folder: Path, num: int = NUM) -> np.ndarray:
    return np.stack([np.asarray(Image.open(image_path(folder, i, num))) for i in range(num)])


def write(model, folder: Path, **kwargs) -> int:
    return write_sample_set(model, folder, NUM, steps=STEPS, cfg=CFG, seed=SEED, **kwargs)


def test_seeds_labels_and_batches():
    assert image_seeds(2, range(3)).tolist() == [2 * 2**32, 2 * 2**32 + 1, 2 * 2**32 + 2]
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2147483648\)"):
        image_seeds(2**31, range(3))  # its seeds would pass 2**63
    assert image_labels(3, range(5)).tolist() == [0, 1, 2, 0, 1] and image_labels(0, range(5)) is None
    assert [list(b) for b in batches_of(7, 2)] == [[0, 1], [2, 3], [4, 5], [6]]
    shares = [[list(b) for b in batches_of(7, 2, rank, 3)] for rank in range(3)]
    assert shares == [[[0, 1], [6]], [[2, 3]], [[4, 5]]]


def test_file_names_sort_by_index_and_pixels_round_to_nearest(tmp_path):
    """Names are zero-padded to six digits, more where the set needs them (so they sort by index); a pixel
    value is rounded to the nearest of 0..255, as image files store it."""
    assert image_path(tmp_path, 7, 1000).name == "000007.png"
    assert image_path(tmp_path, 7, 10**7).name == "0000007.png"
    assert image_path(tmp_path, 9999999, 10**7).name == "9999999.png"
    pixels = torch.tensor([0.0, 0.4, 0.6, 254.4, 254.6, 300.0]) / 255
    rounded = [[[[v] * 3 for v in (0, 0, 1, 254, 255, 255)]]]  # [B, H, W, 3]
    assert to_uint8(pixels.view(1, 1, 1, 6).expand(1, 3, 1, 6)).tolist() == rounded


def test_the_files_hold_the_samplers_images(model, tmp_path):
    assert write(model, tmp_path, batch_size=3) == NUM
    indices = range(NUM)
    expected = Sampler(model, NUM, STEPS, cfg=CFG, dtype=torch.float32)(
        labels=image_labels(model.num_classes, indices), seeds=image_seeds(SEED, indices))
    assert np.array_equal(read_set(tmp_path), to_uint8(expected))
    names = sorted(p.name for p in tmp_path.iterdir())  # no partial files
    assert names == [f"{i:06d}.png" for i in indices] + ["sample_set.json"]


def test_the_set_is_the_same_from_captured_graphs(model, tmp_path, emulated_cuda_graphs: CudaGraphEmulator):
    """The GPU path: each batch is a replay of the loop captured for its bucket (3, 3, then 1 for the last)."""
    write(model, tmp_path / "graphs", batch_size=3)
    assert emulated_cuda_graphs.captures == 2 and emulated_cuda_graphs.replays == 3
    with mock.patch.object(sampling, "cuda_graphs_usable", lambda device: False):
        write(model, tmp_path / "plain", batch_size=3)
    assert emulated_cuda_graphs.captures == 2 and emulated_cuda_graphs.replays == 3  # that one ran un-captured
    assert np.array_equal(read_set(tmp_path / "graphs"), read_set(tmp_path / "plain"))


def test_the_set_does_not_depend_on_batch_size_or_processes(model, tmp_path):
    write(model, tmp_path / "one", batch_size=4)
    for rank in range(3):
        write(model, tmp_path / "three", batch_size=2, rank=rank, world_size=3)
    assert np.array_equal(read_set(tmp_path / "one"), read_set(tmp_path / "three"))
    write_sample_set(model, tmp_path / "other", NUM, steps=STEPS, cfg=CFG, seed=SEED + 1, batch_size=4)
    assert not np.array_equal(read_set(tmp_path / "one"), read_set(tmp_path / "other"))


def test_a_rerun_writes_only_the_missing_images(model, tmp_path):
    write(model, tmp_path, batch_size=3)
    complete = read_set(tmp_path)
    for i in (1, 5):
        image_path(tmp_path, i, NUM).unlink()
    kept = image_path(tmp_path, 0, NUM)
    Image.fromarray(np.zeros_like(complete[0])).save(kept)  # a file on disk is taken as done, never redone
    assert write(model, tmp_path, batch_size=3) == 2
    again = read_set(tmp_path)
    assert np.array_equal(again[1:], complete[1:]) and not again[0].any()


def test_a_rerun_with_other_options_is_refused(model, tmp_path):
    """Filling in a set with other steps, cfg, seed, dtype or another model would mix two sets: refused before
    anything is written, naming what changed. Batch size and the count may change (they do not change an image)."""
    write(model, tmp_path, batch_size=3)
    image_path(tmp_path, 2, NUM).unlink()
    refused = [
        ({"steps": 1}, "steps 2 -> 1"),
        ({"cfg": 1.0, "seed": 4}, "cfg 1.4 -> 1.0, seed 3 -> 4"),
        ({"dtype": torch.bfloat16}, "dtype 'torch.float32' -> 'torch.bfloat16'"),
    ]
    for change, named in refused:
        with pytest.raises(ValueError, match=re.escape(f"made with other options ({named}): finish it with those")):
            write_sample_set(model, tmp_path, NUM, **{"steps": STEPS, "cfg": CFG, "seed": SEED, **change})
    other = tiny_model(num_classes=5).eval()
    with pytest.raises(ValueError, match="model .* -> "):
        write(other, tmp_path)
    assert not image_path(tmp_path, 2, NUM).exists()
    assert write_sample_set(model, tmp_path, NUM + 2, steps=STEPS, cfg=CFG, seed=SEED, batch_size=4) == 3


def test_a_folder_with_images_but_no_options_file_is_refused(model, tmp_path):
    """Another tool's images (or another set's without its sample_set.json) would be kept as this set's and packed
    into it: refused before anything is written. Other files (a README, a grid) are fine, and a set's own folder
    always has the file: it is written before any image."""
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "000000.png")
    foreign = (tmp_path / "000000.png").read_bytes()
    with pytest.raises(ValueError, match=f"{tmp_path} holds images \\(000000.png\\) but no sample_set.json"):
        write(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.png"]
    assert (tmp_path / "000000.png").read_bytes() == foreign
    (tmp_path / "000000.png").rename(tmp_path / "grid.png")
    assert write(model, tmp_path) == NUM


def test_pack_npz_names_an_image_of_another_size(model, tmp_path):
    write(model, tmp_path, batch_size=4)
    Image.new("RGB", (24, 16)).save(image_path(tmp_path, 3, NUM))
    with pytest.raises(ValueError, match=f"{image_path(tmp_path, 3, NUM)} is 24x16 px where image 0 is 16x16"):
        pack_npz(tmp_path, NUM)


def test_the_weights_name_is_compared_where_the_set_keeps_one(model, tmp_path):
    """A set names its weights when given (the CLI: their SHA-256, EMA or not), and a rerun naming others is
    refused; a set from before the name was kept is finished with any (the images are the same)."""
    write(model, tmp_path / "named", weights="a")
    image_path(tmp_path / "named", 0, NUM).unlink()
    with pytest.raises(ValueError, match=re.escape("other options (weights 'a' -> 'b')")):
        write(model, tmp_path / "named", weights="b")
    assert write(model, tmp_path / "named", weights="a") == 1
    write(model, tmp_path / "unnamed")  # as an older version wrote it: no weights in its options
    image_path(tmp_path / "unnamed", 0, NUM).unlink()
    assert write(model, tmp_path / "unnamed", weights="b") == 1


def test_a_failed_write_stops_the_job_within_a_few_batches(model, tmp_path):
    """Writes are waited for BATCHES_IN_FLIGHT batches behind the sampler: a full disk ends the job early, and
    the PNGs queued in memory stay bounded."""
    sampled, write_png = [], sample_set._write_png

    def fail_on_image_2(image, path):
        if path == image_path(tmp_path, 2, NUM):
            raise OSError("no space left on device")
        write_png(image, path)

    with mock.patch.object(sample_set, "_write_png", fail_on_image_2), \
            mock.patch.object(sample_set, "to_uint8", lambda images: sampled.append(1) or to_uint8(images)):
        with pytest.raises(OSError, match="no space left"):
            write(model, tmp_path, batch_size=1)
    assert len(sampled) == 3 + sample_set.BATCHES_IN_FLIGHT  # batches 0..2, then the ones sampled meanwhile


def test_pack_npz(model, tmp_path):
    write(model, tmp_path, batch_size=4)
    packed = np.load(pack_npz(tmp_path, NUM, num_classes=model.num_classes))
    assert packed["arr_0"].dtype == np.uint8 and packed["arr_0"].shape == (NUM, 16, 16, 3)
    assert np.array_equal(packed["arr_0"], read_set(tmp_path))
    assert packed["arr_1"].tolist() == [i % 10 for i in range(NUM)]
    elsewhere = pack_npz(tmp_path, NUM, tmp_path / "elsewhere.npz")
    assert elsewhere == tmp_path / "elsewhere.npz"
    Image.new("L", (16, 16), 77).save(image_path(tmp_path, 1, NUM))  # a grey image packs as three equal channels
    assert (np.load(pack_npz(tmp_path, NUM))["arr_0"][1] == 77).all()
    for bad, error in ((-3, ValueError), (2.0, TypeError)):  # labels i % -3 would be negative
        with pytest.raises(error, match="num_classes must be an int >= 0"):
            pack_npz(tmp_path, NUM, num_classes=bad)
    image_path(tmp_path, 4, NUM).unlink()
    with pytest.raises(FileNotFoundError, match="1 of 7 images are missing .* index 4"):
        pack_npz(tmp_path, NUM)


def test_two_packs_of_one_folder_at_once(model, tmp_path, monkeypatch):
    """A second pack of the folder runs while the first is between writing its file and renaming it (two scripts
    at once): each writes a temporary file of its own, so both finish and the packed set is whole (with one
    fixed temporary name the second renamed the first's file away)."""
    write(model, tmp_path, batch_size=4)
    savez, calls = np.savez, []

    def savez_then_another_pack(file, **arrays):
        savez(file, **arrays)
        calls.append(file)
        if len(calls) == 1:  # the first pack has written its file: the second packs now, all through
            pack_npz(tmp_path, NUM - 1)

    monkeypatch.setattr(np, "savez", savez_then_another_pack)
    path = pack_npz(tmp_path, NUM)
    assert len(calls) == 2 and np.load(path)["arr_0"].shape[0] == NUM
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_pack_npz_labels_the_set_as_its_options_file_says(model, tmp_path):
    """The labels follow the num_classes the folder's sample_set.json records (the README's Python route passes
    none); another given value would mislabel the images and is refused, naming both. A folder without the file
    needs num_classes."""
    write(model, tmp_path, batch_size=4)
    assert np.load(pack_npz(tmp_path, NUM))["arr_1"].tolist() == [i % 10 for i in range(NUM)]
    with pytest.raises(ValueError, match=r"num_classes 3 differs from the 10 the set in .* was sampled with"):
        pack_npz(tmp_path, NUM, num_classes=3)
    unconditional = tiny_model(num_classes=0).eval()
    write_sample_set(unconditional, tmp_path / "unconditional", NUM, steps=1, batch_size=4)
    assert "arr_1" not in np.load(pack_npz(tmp_path / "unconditional", NUM))
    with pytest.raises(ValueError, match="num_classes 10 differs from the 0"):
        pack_npz(tmp_path / "unconditional", NUM, num_classes=10)
    (tmp_path / "sample_set.json").unlink()  # images from elsewhere: the caller says how they are labelled
    with pytest.raises(ValueError, match="has no sample_set.json .*: give num_classes"):
        pack_npz(tmp_path, NUM)
    assert np.load(pack_npz(tmp_path, NUM, num_classes=4))["arr_1"].tolist() == [i % 4 for i in range(NUM)]
    assert "arr_1" not in np.load(pack_npz(tmp_path, NUM, num_classes=0))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num": 0}, ValueError, "num must be an int"),
        ({"batch_size": 0}, ValueError, "batch_size must be an int"),
        ({"rank": 2, "world_size": 2}, ValueError, r"rank must be an int in \[0, 2\)"),
        ({"world_size": 0}, ValueError, "world_size must be an int"),
        ({"seed": -1}, ValueError, "seed must be an int"),
        ({"seed": 2**31}, ValueError, "seed must be an int"),
        ({"seed": True}, TypeError, r"seed must be an int in \[0, 2147483648\), got True"),
        ({"num": 2.0}, TypeError, "num must be an int"),
    ],
)
def test_bad_arguments_are_refused(model, tmp_path, kwargs, error, message):
    """The library's int convention: a wrong type (bool too) is a TypeError, an int out of range a ValueError."""
    args = {"num": NUM, "steps": STEPS, **kwargs}
    with pytest.raises(error, match=message):
        write_sample_set(model, tmp_path / "set", args.pop("num"), **args)
    assert not (tmp_path / "set").exists()  # refused before the folder is made


def test_out_must_be_a_folder_and_the_model_in_eval_mode(model, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="out must be a folder"):
        write_sample_set(model, tmp_path / "file", NUM)
    with pytest.raises(ValueError, match="training mode"):
        write_sample_set(tiny_model().train(), tmp_path / "set", NUM)


def cli_worker(rank: int, world: int, port: int, args: list[str], rank0_checks_late: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank0_checks_late and rank == 0:  # a slower node: the other process is ready to write first
        check = sample_set._check_or_write_options
        sample_set._check_or_write_options = lambda *a: time.sleep(3) or check(*a)
    assert main(args) == 0  # the group init_distributed made is left at exit


def test_the_command_under_two_processes_matches_one(model, tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", model, name="perturbed")
    common = ["sample-set", "--checkpoint", str(tmp_path / "ckpt"), "--num-images", "5", "--batch-size", "2", "--steps",
              "1", "--cfg", "1.2", "--device", "cpu", "--npz"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    mp.spawn(cli_worker, args=(2, free_port(), [*common, "--out", str(tmp_path / "two")]), nprocs=2, join=True)
    one, two = (np.load(tmp_path / name / "samples.npz") for name in ("one", "two"))
    assert one["arr_0"].shape == (5, 16, 16, 3) and one["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert len({one["arr_0"][i].tobytes() for i in range(5)}) == 5  # five different images
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])


def test_no_process_writes_an_image_before_rank_0_has_checked_the_folder(model, tmp_path):
    """Rank 0 refuses a folder with images but no options file; a process that wrote its first image before rank 0
    made that check had the set refused as another tool's (and the other processes then waited at the end for
    ever). Every process checks, then they meet, then they write."""
    save_checkpoint(tmp_path / "ckpt", model, name="perturbed")
    args = ["sample-set", "--checkpoint", str(tmp_path / "ckpt"), "--num-images", "4", "--batch-size", "1",
            "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "set")]
    mp.spawn(cli_worker, args=(2, free_port(), args, True), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "000000.png", "000001.png", "000002.png", "000003.png", "sample_set.json"]
