import gc
import gzip
import itertools
import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from sphere_fast.data import (
    FASHION_MNIST_DIR,
    FashionMNIST,
    FileListDataset,
    StepBatchSampler,
    SyntheticShapes,
    image_folder,
    jsonl_list,
    make_loader,
    open_dataset,
    pixels_to_images,
    random_hflip,
    resize_center_crop,
    to_pixels,
)
from sphere_fast._random import derive_seed
from tests.files import write_idx


def write_image(path, w, h, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


def test_image_folder_and_jsonl_list(tmp_path):
    write_image(tmp_path / "cats" / "a.png", 40, 20, (255, 0, 0))
    write_image(tmp_path / "dogs" / "b.jpg", 20, 30, (0, 0, 255))
    ds = image_folder(tmp_path, 16)
    assert ds.class_names == ["cats", "dogs"] and len(ds) == 2
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 0
    assert x[:, 0, 0].tolist() == [255, 0, 0]

    lines = [
        {"class_id": 1, "class_name": "dogs", "image_path": "dogs/b.jpg", "is_absolute_path": False},
        {"class_id": 0, "class_name": "cats", "image_path": str(tmp_path / "cats" / "a.png"), "is_absolute_path": True},
    ]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    ds = jsonl_list(tmp_path / "list.jsonl", 16)
    assert ds.class_names == ["cats", "dogs"] and [ds[i][1] for i in range(2)] == [1, 0]
    assert ds[0][0][2].min() > 240  # blue image
    (tmp_path / "bad.jsonl").write_text('{"class_id": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        jsonl_list(tmp_path / "bad.jsonl", 16)
    with pytest.raises(FileNotFoundError):
        image_folder(tmp_path / "missing", 16)


def test_image_folder_numbers_classes_in_sorted_order_whatever_the_listing_order(tmp_path, monkeypatch):
    for name in ("b", "a", "c"):
        write_image(tmp_path / name / "x.png", 16, 16, (255, 0, 0))
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listing(self), reverse=True)))
    ds = image_folder(tmp_path, 16)
    assert ds.class_names == ["a", "b", "c"]
    assert [(p.parent.name, k) for p, k in ds.items] == [("a", 0), ("b", 1), ("c", 2)]


def test_image_folder_takes_image_files_of_any_case_only(tmp_path):
    write_image(tmp_path / "cats" / "a.PNG", 16, 16, (255, 0, 0))
    write_image(tmp_path / "cats" / "b.Jpeg", 16, 16, (0, 255, 0))
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    assert [p.name for p, _ in image_folder(tmp_path, 16).items] == ["a.PNG", "b.Jpeg"]
    with pytest.raises(TypeError, match="image_size must be an int >= 1, got True"):
        image_folder(tmp_path, True)
    with pytest.raises(ValueError, match="image_size must be an int >= 1, got 0"):
        image_folder(tmp_path, 0)


def test_image_folder_skips_hidden_entries_follows_links_and_refuses_empty_classes(tmp_path):
    """Jupyter's .ipynb_checkpoints and a macOS archive's __MACOSX and ._name AppleDouble files are no classes or
    images (they shifted every label, or crashed at load); images in a linked sub-folder count, a link back up the
    tree is walked once; a class folder left without images is refused, as torchvision's ImageFolder does."""
    root = tmp_path / "data"
    for name in ("cat/a.png", "cat/.hidden/f.png", "dog/b.png", ".ipynb_checkpoints/c.png", "__MACOSX/cat/d.png"):
        write_image(root / name, 8, 8, (255, 0, 0))
    write_image(tmp_path / "elsewhere" / "e.png", 8, 8, (255, 0, 0))
    (root / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble: not an image
    (root / "dog" / "album.jpg").mkdir()  # a folder with an image's name
    (root / "dog" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "dog" / "loop").symlink_to(root / "dog", target_is_directory=True)
    ds = image_folder(root, 8)
    assert ds.class_names == ["cat", "dog"]
    assert [(p.relative_to(root).as_posix(), k) for p, k in ds.items] == [
        ("cat/a.png", 0), ("dog/b.png", 1), ("dog/linked/e.png", 1)]
    (root / "bird").mkdir()
    (root / "bird" / "._x.png").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(ValueError, match=r"hold no images.*\['bird'\]"):
        image_folder(root, 8)


def test_list_is_absolute_path_is_optional_and_a_bool_and_class_ids_are_ints(tmp_path):
    """As the official reader: is_absolute_path may be left out (false); a string such as "false" would be truthy
    and is refused, as is a bool class id (true would be label 1 and collate to a bool tensor); a class id may be
    a string of digits (the official reader takes int() of it), nothing looser."""
    write_image(tmp_path / "x.png", 8, 8, (255, 0, 0))
    rec = {"class_id": 0, "class_name": "x", "image_path": "x.png"}

    def read(**changes):
        (tmp_path / "l.jsonl").write_text(json.dumps({**rec, **changes}) + "\n")
        return jsonl_list(tmp_path / "l.jsonl", 8)

    assert read().items == [(tmp_path / "x.png", 0)]
    for flag in ("false", None, 0):
        with pytest.raises(ValueError, match="l.jsonl:1: is_absolute_path must be true or false"):
            read(is_absolute_path=flag)
    ds = read(class_id="3")
    assert ds.items == [(tmp_path / "x.png", 3)] and type(ds.items[0][1]) is int and ds.class_names[3] == "x"
    for bad in (True, False, "3.0", " 3", "-1", "x", 1.0, None):
        with pytest.raises(ValueError, match="l.jsonl:1: class_id must be an int >= 0"):
            read(class_id=bad)


def test_open_dataset_takes_a_list_file_of_any_suffix_case(tmp_path):
    write_image(tmp_path / "x.png", 8, 8, (255, 0, 0))
    (tmp_path / "TRAIN.JSONL").write_text(json.dumps({"class_id": 0, "class_name": "x", "image_path": "x.png"}) + "\n")
    assert open_dataset(str(tmp_path / "TRAIN.JSONL"), 8).items == [(tmp_path / "x.png", 0)]


def test_list_files_skip_blank_lines_keep_class_ids_and_check_them(tmp_path):
    write_image(tmp_path / "a.png", 16, 16, (255, 0, 0))
    line = {"class_name": "birds", "image_path": "a.png", "is_absolute_path": False}
    # class ids need not be dense: id 2 with no id 1 makes three classes, the missing one named by its id
    (tmp_path / "list.json").write_text(
        json.dumps({**line, "class_id": 2}) + "\n\n" + json.dumps({**line, "class_id": 0, "class_name": "cats"}) + "\n")
    ds = open_dataset(str(tmp_path / "list.json"), 16)
    assert ds.class_names == ["cats", "1", "birds"] and ds.num_classes == 3 and [y for _, y in ds.items] == [2, 0]
    for bad in ("2.5", -1):
        (tmp_path / "bad.jsonl").write_text(json.dumps({**line, "class_id": bad}) + "\n")
        with pytest.raises(ValueError, match="bad.jsonl:1: class_id must be an int >= 0"):
            jsonl_list(tmp_path / "bad.jsonl", 16)
    for bad in ({"image_path": 5}, {"image_path": None}, {"class_name": 3}):  # not a bare TypeError of Path's /
        (tmp_path / "bad.jsonl").write_text(json.dumps({**line, "class_id": 0, **bad}) + "\n")
        with pytest.raises(ValueError, match="bad.jsonl:1: image_path and class_name must be strings"):
            jsonl_list(tmp_path / "bad.jsonl", 16)


def test_a_list_with_sparse_class_ids_is_refused_before_its_class_table_is_built(tmp_path):
    """One id such as a WordNet offset would build a class table (and need a label embedding) of that many rows:
    refused at once. Gaps within 1024 ids (a subset of ImageNet's classes) or twice the classes are kept."""
    write_image(tmp_path / "a.png", 8, 8, (255, 0, 0))

    def read(*ids):
        (tmp_path / "l.jsonl").write_text("".join(
            json.dumps({"class_id": k, "class_name": f"c{k}", "image_path": "a.png"}) + "\n" for k in ids))
        return jsonl_list(tmp_path / "l.jsonl", 8)

    assert read(0, 1023).num_classes == 1024
    assert read(*range(0, 4000, 2)).num_classes == 3999  # 2000 classes: up to 4000 rows
    for ids, largest, classes in (((1024,), 1024, 1), ((10**9,), 10**9, 1), ((0, "01440764"), 1440764, 2),
                                  ((*range(0, 4000, 2), 4002), 4002, 2001)):
        with pytest.raises(ValueError, match=f"l.jsonl: class ids must number the classes 0..K-1 .*the largest is "
                                             f"{largest} with only {classes} classes"):
            read(*ids)


def test_image_folder_links_do_not_move_images_between_classes(tmp_path):
    """A link inside a class folder back up to the root (or into another class's folder) is not followed: its
    images would take this class's label; a folder linked twice gives its images once."""
    for name in ("a", "b"):
        write_image(tmp_path / name / f"{name}.png", 16, 16, (255, 0, 0))
    (tmp_path / "a" / "up").symlink_to(tmp_path)
    (tmp_path / "a" / "b_too").symlink_to(tmp_path / "b")
    write_image(tmp_path.parent / f"{tmp_path.name}_extra" / "x.png", 16, 16, (0, 255, 0))
    for link in ("once", "twice"):  # outside the root: followed, its images counted once
        (tmp_path / "b" / link).symlink_to(tmp_path.parent / f"{tmp_path.name}_extra")
    ds = image_folder(tmp_path, 16)
    assert sorted((p.relative_to(tmp_path).as_posix(), k) for p, k in ds.items) == [
        ("a/a.png", 0), ("b/b.png", 1), ("b/once/x.png", 1)]


def test_a_list_whose_images_are_not_there_is_refused_when_opened(tmp_path):
    """A wrong root (every relative path missing) stops at open, naming a path, not at the loader's first batch
    or hours into a run; a sample of the list is checked (LIST_FILES_CHECKED), not each of a million files."""
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.png", 16, 16, (255, 0, 0))
    lines = [{"class_id": 0, "class_name": "x", "image_path": f"imgs/{i}.png"} for i in range(3)]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert len(jsonl_list(tmp_path / "l.jsonl", 16).items) == 3
    with pytest.raises(FileNotFoundError, match=r"l.jsonl lists .*elsewhere/imgs/0.png, which is not a file"):
        jsonl_list(tmp_path / "l.jsonl", 16, root=tmp_path / "elsewhere")


def test_resize_center_crop_short_side():
    img = Image.new("RGB", (64, 32))
    img.paste((255, 255, 255), (0, 0, 16, 32))  # white left quarter is cropped away
    out = resize_center_crop(img, 16)
    assert out.size == (16, 16) and out.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_resize_center_crop_fills_the_crop_and_picks_the_filter_by_size():
    """The short side comes out exactly ``size`` even where size / side * side falls below it in floats (49 px
    to 32: 31.99...), so the crop never reaches past the image; up to 64 px the resize is nearest, then bicubic."""
    out = resize_center_crop(Image.new("RGB", (49, 147), (255, 255, 255)), 32)
    assert out.size == (32, 32) and out.getextrema() == ((255, 255),) * 3
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8))
    for size, method in ((64, Image.Resampling.NEAREST), (65, Image.Resampling.BICUBIC)):
        expected = noise.resize((size, size), method)
        assert np.array_equal(np.asarray(resize_center_crop(noise, size)), np.asarray(expected))


@pytest.mark.parametrize("mode", ["P", "1", "RGBA"])
def test_images_are_rgb_before_the_resize(mode):
    """As the official loader (convert, then resize): Pillow resizes palette and 1-bit images with nearest
    whatever filter is asked, and an RGBA image premultiplied; the bicubic resize must see RGB pixels."""
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    img = {"P": rgb.quantize(64), "1": rgb.convert("1"), "RGBA": rgb.convert("RGBA")}[mode]
    if mode == "RGBA":
        img.putalpha(Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 120), dtype=np.uint8)))
    out = resize_center_crop(img, 80)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(resize_center_crop(img.convert("RGB"), 80)))


@pytest.mark.cuda_capable
def test_pixels_become_the_models_range_as_float32_would_compute_it():
    """Every pixel value maps to what converting before the workers gave: x / 127.5 - 1 in float32, on the host
    (on CUDA too, which divides by a host scalar through its reciprocal)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pixels = torch.arange(256, dtype=torch.uint8, device=device)
    expected = torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0))
    assert torch.equal(pixels_to_images(pixels).cpu(), expected)
    assert pixels_to_images(pixels)[[0, 255]].tolist() == [-1.0, 1.0]
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    assert torch.equal(to_pixels(img), torch.from_numpy(np.array(img)).permute(2, 0, 1))


def test_random_hflip_flips_half_the_images():
    x = torch.tensor([0.0, 1.0]).expand(4000, 1, 1, 2)
    flipped = random_hflip(x, torch.Generator().manual_seed(0))
    assert 0.45 < (flipped[:, 0, 0, 0] == 1).float().mean() < 0.55  # 4000 draws: 6 standard deviations
    for one in (x[0], x[0, 0]):  # not a batch: would broadcast to [3, 3, H, W] or [H, 1, H, W]
        with pytest.raises(ValueError, match=r"random_hflip takes a batch \[B, C, H, W\], got shape"):
            random_hflip(one)


def test_a_file_list_keeps_its_paths_packed(tmp_path):
    """Paths of any bytes (non-UTF-8 names too) come back as given, by index (negative too) and in order; the
    dataset pickles as a few arrays, not a Python object per image (what spawn and forkserver workers receive)."""
    names = ["a.png", "é ü.png", os.fsdecode(b"\xff\xfe.png"), "b.png"]
    items = [(tmp_path / name, k % 2) for k, name in enumerate(names)]
    for path, _ in items:
        write_image(path, 8, 8, (0, 0, 255))
    ds = FileListDataset(items, ["x", "y"], 8)
    assert ds.items == items and len(ds) == 4
    assert ds.item(-1) == items[-1] and ds.item(1) == items[1]
    with pytest.raises(IndexError):
        ds.item(4)
    assert [ds[i][1] for i in range(4)] == [0, 1, 0, 1] and ds[2][0][2].min() > 240
    many = FileListDataset([(tmp_path / f"class_{k % 1000}" / f"image_{k:08d}.JPEG", k % 1000) for k in range(20000)],
                           ["c"] * 1000, 8)
    blob = pickle.dumps(many)
    tracked = len(gc.get_objects())
    loaded = pickle.loads(blob)
    assert len(gc.get_objects()) - tracked < 100  # a list of (Path, int) made two objects an image
    assert loaded.items == many.items


def test_a_loader_starts_its_workers_by_the_method_asked():
    """spawn (macOS's and Windows' default; forkserver is Linux's from Python 3.14): the dataset and the sampler
    pickle, and the batches are those of a loader without workers."""
    data = SyntheticShapes(size=8, image_size=8)
    loader = make_loader(data, 2, workers=1, start_method="spawn")
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    batches = iter(loader)
    for x, y in itertools.islice(make_loader(data, 2), 2):
        got = next(batches)
        assert torch.equal(got[0], x) and torch.equal(got[1], y)
    batches._shutdown_workers()
    assert make_loader(data, 2, start_method="spawn").multiprocessing_context is None  # no workers to start
    with pytest.raises(ValueError, match=r"start_method must be None or one of \[.*'spawn'.*\], got 'fork-exec'"):
        make_loader(data, 2, workers=1, start_method="fork-exec")


def test_a_broken_image_names_its_file(tmp_path):
    """A truncated file among a million: a DataLoader worker's error shows neither the index nor the path."""
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    ds = FileListDataset([(tmp_path / "whole.png", 0), (tmp_path / "cut.png", 0)], ["a"], 16)
    assert ds[0][0].shape == (3, 16, 16)
    with pytest.raises(OSError, match=f"^{tmp_path / 'cut.png'}: "):
        ds[1]
    gone = FileListDataset([(tmp_path / "gone.png", 0)], ["a"], 16)
    with pytest.raises(FileNotFoundError) as missing:  # its own type, and the path named once
        gone[0]
    assert str(missing.value).count("gone.png") == 1


def test_an_oversized_or_undecodable_image_names_its_file(tmp_path, monkeypatch):
    """Pillow's refusal of an image over its pixel limit is not an OSError, nor is a decoder's ValueError: named
    too, with their own types."""
    Image.new("1", (40, 40)).save(tmp_path / "big.png")
    ds = FileListDataset([(tmp_path / "big.png", 0)], ["a"], 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 // 2 - 1)  # Pillow refuses over twice the limit
    with pytest.raises(Image.DecompressionBombError, match=f"^{tmp_path / 'big.png'}: Image size \\(1600 pixels\\)"):
        ds[0]
    monkeypatch.undo()

    def bad_tile(self):
        raise ValueError("Tile cannot extend outside image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", bad_tile)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'big.png'}: Tile cannot extend outside image"):
        ds[0]


def test_a_16_bit_image_is_clipped_as_the_official_loader_does_with_one_warning(tmp_path):
    """convert("RGB") clips 16-bit and float values at 255: a mid-grey turns white. The pixels stay as the official
    loader makes them, but the data set warns once, naming the first such file and its mode."""
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(tmp_path / name)
    write_image(tmp_path / "rgb.png", 20, 20, (10, 20, 30))
    ds = FileListDataset([(tmp_path / n, 0) for n in ("rgb.png", "a.png", "b.png")], ["a"], 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = [ds[i][0] for i in range(3)] + [ds[1][0]]
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'a.png'} has mode I;16: its values are clipped to [0, 255] as 8-bit ones (as the official "
        "loader does): most of a 16-bit image turns white, a float one in [0, 1] black; convert the data set to 8 bits"]
    assert all((x == 255).all() for x in images[1:])


def test_data_arguments_are_checked_when_given():
    """Checked where they are given, not at the first batch (inside a worker)."""
    with pytest.raises(TypeError, match="size must be an int >= 1, got 16.5"):
        resize_center_crop(Image.new("RGB", (20, 20)), 16.5)
    with pytest.raises(TypeError, match="n must be an int >= 0, got True"):
        StepBatchSampler(True, 1)
    with pytest.raises(TypeError, match="seed must be an int >= 0, got 0.5"):
        StepBatchSampler(8, 2, seed=0.5)
    with pytest.raises(TypeError, match="workers must be an int >= 0, got 1.5"):
        make_loader(SyntheticShapes(size=8, image_size=8), 2, workers=1.5)


def test_a_file_list_needs_images():
    with pytest.raises(ValueError, match="holds no images"):
        FileListDataset([], ["a"], 16)


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_files():
    ds = FashionMNIST(32)
    assert len(ds) == 60000 and len(FashionMNIST(32, "test")) == 10000
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert x.dtype == torch.uint8 and torch.all(x[:, :2] == 0)  # the 2-px border around the 28-px image is black
    assert x.max() > 191


def test_fashion_mnist_pads_to_centre_and_resizes_by_nearest(tmp_path):
    rng = np.random.default_rng(0)
    raw = {split: rng.integers(0, 256, (2, 28, 28)) for split in ("train", "t10k")}
    for split, images in raw.items():
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.array([3, 7]))
    pixels = {k: torch.from_numpy(v.astype(np.uint8)) for k, v in raw.items()}
    x, y = FashionMNIST(34, root=tmp_path)[1]
    expected = torch.zeros((34, 34), dtype=torch.uint8)
    expected[3:31, 3:31] = pixels["train"][1]  # 3 px of black on every side
    assert y == 7 and torch.equal(x, expected.expand(3, 34, 34))
    x, _ = FashionMNIST(34, "test", root=tmp_path)[0]
    assert torch.equal(x[0, 3:31, 3:31], pixels["t10k"][0])
    rows = (torch.arange(16) * 28) // 16  # nearest: output pixel i reads input pixel floor(i * 28 / 16)
    assert torch.equal(FashionMNIST(16, root=tmp_path)[0][0][0], pixels["train"][0][rows][:, rows])
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(32, "val", root=tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 7]), type_code=0x0C)
    with pytest.raises(ValueError, match="unsigned-byte"):
        FashionMNIST(32, root=tmp_path)


def test_fashion_mnist_refuses_image_and_label_files_that_disagree(tmp_path):
    """Images of one split beside labels of the other (or a truncated file) would pair images with wrong labels."""
    images, labels = tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(images, np.zeros((6, 28, 28)))
    write_idx(labels, np.zeros(3))
    with pytest.raises(ValueError, match=f"{images} holds 6 images but {labels} 3 labels"):
        FashionMNIST(32, root=tmp_path)
    write_idx(labels, np.zeros((6, 1)))
    with pytest.raises(ValueError, match=r"\[N, H, W\] images .* \[N\] labels, got shapes \(6, 28, 28\) and \(6, 1\)"):
        FashionMNIST(32, root=tmp_path)
    write_idx(labels, np.zeros(6))
    with gzip.open(images, "rb") as fh:
        whole = fh.read()
    for cut in (len(whole) - 1, 2):  # a truncated download: not numpy's reshape or index error
        with gzip.open(images, "wb") as fh:
            fh.write(whole[:cut])
        with pytest.raises(ValueError, match=f"{images}: {cut} bytes.*a truncated download"):
            FashionMNIST(32, root=tmp_path)


def test_fashion_mnist_refuses_a_file_longer_than_its_header_without_reading_it_all(tmp_path, monkeypatch):
    """A small gzip that inflates far past its header's size (a bomb: 64 MiB of zeros here) is refused after the
    header and one byte more; a header giving a huge size is refused without reading or allocating it."""
    images, labels = tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(2))
    with gzip.open(images, "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 2, 2)) + bytes(64 << 20))
    read, returned = gzip.GzipFile.read, []

    def counted(self, size=-1):
        returned.append(len(data := read(self, size)))
        return data

    monkeypatch.setattr(gzip.GzipFile, "read", counted)
    with pytest.raises(ValueError, match=rf"{images}: more bytes than the 24 its header \[2, 2, 2\] gives"):
        FashionMNIST(32, root=tmp_path)
    assert sum(returned) == 25
    with gzip.open(images, "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + (2**32 - 1).to_bytes(4, "big") * 3)
    with pytest.raises(ValueError, match=f"{images}: 16 bytes where its header .* needs {16 + (2**32 - 1) ** 3} "):
        FashionMNIST(32, root=tmp_path)


def test_fashion_mnist_missing_names_the_package_and_falls_back(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST(32, root=tmp_path)
    monkeypatch.setattr("sphere_fast.data.FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        open_dataset("fashion-mnist", 32)
    with pytest.warns(UserWarning, match="dataset-fashion-mnist.*synthetic"):
        assert isinstance(open_dataset("fashion-mnist", 32, synthetic_fallback=True), SyntheticShapes)


def test_synthetic_shapes_are_deterministic_and_open_dataset():
    ds = SyntheticShapes(size=20, image_size=16)
    x, y = ds[7]
    torch.testing.assert_close(x, ds[7][0])
    assert not torch.equal(x, SyntheticShapes(size=20, image_size=16, seed=1)[7][0])
    assert x.shape == (3, 16, 16) and y == 7 and x.min() == SyntheticShapes.BACKGROUND and x.max() > 0
    assert isinstance(open_dataset("synthetic", 16), SyntheticShapes)
    assert not torch.equal(ds[0][0], ds[10][0])  # a class's images are jittered per index
    # classes 0 and 5 share a shape kind (five kinds): their colours tell them apart
    colours = [tuple(ds[k][0].flatten(1).max(1).values.tolist()) for k in (0, 5)]
    assert colours[0] != colours[1]
    for kwargs, error, match in (
        ({"size": True}, TypeError, r"size must be an int in \[1, 1000003\)"),
        ({"num_classes": 2.0}, TypeError, r"num_classes must be an int in \[1, 21\)"),
        ({"size": 0}, ValueError, r"size must be an int in \[1, 1000003\)"),
        # image i of seed s is seeded s * 1_000_003 + i: image 1_000_003 would be image 0 of seed s + 1
        ({"size": 1_000_004}, ValueError, r"size must be an int in \[1, 1000003\), got 1000004"),
        # 5 kinds x 4 colours: class 20 would draw as class 0
        ({"num_classes": 21}, ValueError, r"num_classes must be an int in \[1, 21\), got 21"),
        ({"seed": 0.5}, TypeError, "seed must be an int"),  # else refused in a worker, at the first image
        ({"seed": 2**62}, ValueError, r"seed must be an int in \[0, 4294967296\)"),
    ):
        with pytest.raises(error, match=match):
            SyntheticShapes(**kwargs)
    assert SyntheticShapes(num_classes=20, seed=2**32 - 1)[19][1] == 19


def test_sampler_shards_the_global_batch_and_resumes():
    full = iter(StepBatchSampler(20, 6, seed=3))
    global_batches = [next(full) for _ in range(7)]  # 3 steps an epoch, so this crosses two epochs
    assert all(len(b) == 6 for b in global_batches)  # the tail of 2 images is dropped
    assert sorted(sum(global_batches[:3], [])) == sorted(set(sum(global_batches[:3], [])))
    assert global_batches[:3] != global_batches[3:6]
    ranks = [iter(StepBatchSampler(20, 3, rank=r, world_size=2, seed=3)) for r in range(2)]
    for g in global_batches:
        assert next(ranks[0]) + next(ranks[1]) == g
    resumed = iter(StepBatchSampler(20, 6, seed=3, start_step=4))
    assert [next(resumed) for _ in range(3)] == global_batches[4:7]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(11, 3, world_size=4)
    # a rank past the last would read the next step's rows, a negative one nothing
    refused = [({"batch_per_rank": 0}, ValueError, "batch_per_rank must be an int >= 1"),
               ({"rank": 2, "world_size": 2}, ValueError, r"rank must be < world_size \(2\), got 2"),
               ({"rank": -1}, ValueError, "rank must be an int >= 0"),
               ({"start_step": -1}, ValueError, "start_step must be an int >= 0"),
               ({"world_size": 1.0}, TypeError, "world_size must be an int >= 1")]
    for kwargs, error, match in refused:
        with pytest.raises(error, match=match):
            StepBatchSampler(**{"n": 20, "batch_per_rank": 3, **kwargs})


def test_runs_of_nearby_seeds_shuffle_unrelated_epochs():
    """Epoch e shuffled with seed + e: seed 1's epochs were seed 0's from its second on, so the runs of a seed sweep
    read the data in the same order, one epoch apart."""
    def epochs(seed: int) -> list[list[int]]:  # one step an epoch: each batch is an epoch's whole order
        batches = iter(StepBatchSampler(8, 8, seed=seed))
        return [next(batches) for _ in range(4)]

    zero, one = epochs(0), epochs(1)
    assert all(one[e] != zero[e + 1] for e in range(3))
    assert epochs(1) == one and len({tuple(b) for b in zero + one}) == 8


def test_a_stream_seed_is_the_same_for_a_numpy_integer():
    """A seed or index given as a numpy integer (a config read by numpy, a loop over np.arange) names the same
    stream as its int: its repr differs, so hashing the repr would have named another."""
    assert derive_seed(np.int64(3), "epoch", np.int32(1)) == derive_seed(3, "epoch", 1) != derive_seed(3, "epoch", 2)
    assert 0 <= derive_seed(2**64 - 1, "process", 999, 10**9) < 2**63


class RandomDraws(torch.utils.data.Dataset):
    """A dataset with a random transform in its workers: each item is a draw from the worker's RNG."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.rand(1), 0


def test_loader_workers_draw_from_their_own_seed():
    """The data order follows ``seed`` on every process; the workers' random transforms follow ``worker_seed``
    (fit gives each process its own), so the processes do not all draw the same augmentations."""
    draws = {s: next(iter(make_loader(RandomDraws(), 4, workers=1, seed=0, worker_seed=s)))[0] for s in (5, 6)}
    assert torch.equal(draws[5], next(iter(make_loader(RandomDraws(), 4, workers=1, seed=0, worker_seed=5)))[0])
    assert not torch.equal(draws[5], draws[6])


def test_loader_with_worker_processes_and_flip():
    ds = SyntheticShapes(size=24, image_size=16)
    x, y = next(iter(make_loader(ds, 8, workers=2, seed=1)))
    first = next(iter(StepBatchSampler(24, 8, seed=1)))
    assert x.shape == (8, 3, 16, 16) and y.tolist() == [ds[i][1] for i in first]
    assert not make_loader(ds, 8).pin_memory and make_loader(ds, 8, pin_memory=True).pin_memory
    flipped = random_hflip(x, torch.Generator().manual_seed(0))
    same = [(f == i).all().item() for f, i in zip(flipped, x)]
    mirrored = [(f == i.flip(-1)).all().item() for f, i in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and not all(same)
