"""The ``sphere-fast`` command: train, sample, sample-set, reconstruct, interpolate, crossover, manipulate, convert,
bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sphere_fast import editing
from sphere_fast._checkout import in_checkout
from sphere_fast._files import replaced_atomically
from sphere_fast.model import SphereEncoder

# Training presets: model constructor arguments + recipe. "fashion-mnist-demo" is the few-minute CPU
# job of the README: 28 px garments centred on 32 px, patch 4 (8x8 tokens x 4 channels, L = 256), width 64,
# conv pixel head, about 0.33 s a step on 2 cores. 900 steps (~5 min) give soft but recognisable garments.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "fashion-mnist-demo": {
        "model": {
            "input_size": 32,
            "patch_size": 4,
            "vit_enc_model_size": {"width": 64, "layers": 2, "heads": 2},
            "vit_dec_model_size": {"width": 64, "layers": 2, "heads": 2},
            "token_channels": 4,
            "num_classes": 10,
            "pixel_head_type": "conv",
            "use_pixel_consistency": True,
            "use_latent_consistency": True,
            "noise_sigma_max_angle": 80.0,
            "mix_hard_cases": True,
            "vit_enc_latent_mlp_mixer_depth": 2,
            "vit_dec_latent_mlp_mixer_depth": 2,
        },
        # a short run needs a far larger lr than the paper's 1e-4 per 256 and a fast EMA; no perceptual
        # loss (its pretrained weights are not installed), otherwise the CIFAR-10 weights
        "train": {
            "global_batch": 64,
            "total_steps": 900,
            "warmup_steps": 50,
            "base_lr": 8e-3,
            "min_lr": 8e-5,
            "ema_decay": 0.99,
            "loss_weights": {"recon_dist": 1.0, "recon_perc": 0.0, "con_dist": 0.5, "con_perc": 0.0, "latent": 0.1},
        },
        "data": "fashion-mnist",
        "cfg": 1.0,
    },
}


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    """Write [B, 3, H, W] images in [0, 1] as one PNG, ``nrow`` images a row, 2 px white gaps."""
    from PIL import Image

    b, _, h, w = images.shape
    rows = -(-b // nrow)
    canvas = torch.ones(3, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    for i, img in enumerate(images.float().clamp(0, 1).cpu()):
        r, c = divmod(i, nrow)
        canvas[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path, suffix=path.suffix) as partial:  # a failed write leaves the old grid whole
        Image.fromarray((canvas.permute(1, 2, 0) * 255).round().byte().numpy()).save(partial)
    return path


NOT_LOSSES = ("step", "time", "lr", "grad_norm", "skipped")  # the other fields of a losses.jsonl line


def plot_losses(log_path: str | Path, png: str | Path) -> Path:
    """Loss curves (total and each term, raw and smoothed) of a ``losses.jsonl`` on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{log_path} holds no losses to plot")
    # a resume with other loss weights adds or drops terms: each term is drawn over the rows that hold it
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in NOT_LOSSES]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    lowest = []
    for k in keys:
        steps = [r["step"] for r in rows if k in r]
        # a skipped step logs its non-finite values as null (an older log as NaN)
        vals = torch.tensor([math.nan if r[k] is None else r[k] for r in rows if k in r], dtype=torch.float64)
        window = max(1, len(vals) // 30)
        smooth = vals.unfold(0, window, 1).mean(1)
        line, = ax.plot(steps[window - 1 :], smooth.tolist(), label=k)
        ax.plot(steps, vals.tolist(), color=line.get_color(), alpha=0.2, linewidth=0.7)
        tail = smooth[len(smooth) // 10 :]
        tail = tail[tail.isfinite()]  # a diverged run logs NaN, which axis limits refuse
        if tail.numel():
            lowest.append(tail.min().item())
    ax.set_yscale("log")
    # terms that start at exactly 0 (the consistency loss of a zero-initialised model) would squash the plot
    if lowest:
        ax.set_ylim(bottom=max(min(lowest) / 2, 1e-12))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (batch mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)


def command_seeds(seed: int, count: int) -> torch.Tensor:
    """The seeds of a command's ``count`` images for its --seed: image i's is seed * 2**32 + i, as a sample set's
    (two --seed values share no noise)."""
    from sphere_fast.sample_set import image_seeds

    return image_seeds(seed, range(count))


def class_grid(model: SphereEncoder, per_class: int, *, steps: int, cfg: float, seed: int) -> tuple[torch.Tensor, int]:
    """Samples with one row per class (or a square grid when unconditional); (images, images a row)."""
    from sphere_fast.sampling import sample

    if model.num_classes:
        rows = min(model.num_classes, 16)
        y = torch.arange(rows).repeat_interleave(per_class)
        nrow = per_class
    else:
        y, nrow = None, per_class
        rows = per_class
    n = rows * per_class
    seeds = command_seeds(seed or 0, n)
    y = None if y is None else y.to(next(model.parameters()).device)
    _, images = sample(model, n, y=y, cfg=cfg, steps=steps, seeds=seeds)
    return images, nrow


def load_model(args: argparse.Namespace, rank: int = 0) -> SphereEncoder:
    """A model from --checkpoint (EMA weights with --ema) or, at random init, from --preset (said by rank 0)."""
    from sphere_fast.checkpoint import load_checkpoint

    if args.checkpoint:
        return load_checkpoint(args.checkpoint, ema=args.ema)[0].to(args.device)  # built in eval mode
    if args.ema:
        raise ValueError("--ema needs --checkpoint: a preset at random init has no EMA weights")
    # the command succeeds either way: without this its grey output would pass for a trained model's
    if rank == 0:
        print(f"sphere-fast {args.command}: warning: no --checkpoint: the model is an untrained {args.preset} at "
              "random init (it makes flat grey images)", file=sys.stderr)
    torch.manual_seed(args.seed)
    if args.preset in TRAIN_PRESETS:
        model = SphereEncoder(**TRAIN_PRESETS[args.preset]["model"])
    else:
        model = SphereEncoder.from_preset(args.preset)
    return model.to(args.device).eval()


# ---- commands -----------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from sphere_fast.checkpoint import resume_point
    from sphere_fast.training import RunConfig, TrainConfig, fit

    preset = TRAIN_PRESETS[args.preset]
    start, saved = (0, {}) if args.no_resume else resume_point(Path(args.out) / "checkpoints")
    # a resume keeps its run's model (the preset's may be another), with --model-config's changes
    model_cfg = {**saved.get("model", preset["model"]), **(args.model_config or {})}
    # a new base lr without a floor keeps the preset's ratio (1/100, as the paper's 1e-4 -> 1e-6)
    min_lr = args.min_lr
    if min_lr is None and args.lr is not None:
        min_lr = args.lr * preset["train"]["min_lr"] / preset["train"]["base_lr"]
    overrides = {"total_steps": args.steps, "global_batch": args.batch_size, "base_lr": args.lr, "min_lr": min_lr,
                 "ema_decay": args.ema_decay, "seed": args.seed, "autocast": args.autocast,
                 "warmup_steps": args.warmup, "accumulation_steps": args.accumulation_steps,
                 "activation_checkpointing": args.activation_checkpointing or None,
                 "loss_weights": args.loss_weights}
    train_cfg = {**preset["train"], **{k: v for k, v in overrides.items() if v is not None}}
    if args.perceptual_weights:
        train_cfg["perceptual_weights"] = args.perceptual_weights
    if args.warmup is None:
        # a resume keeps its run's warmup (a new --steps must not move it); the preset's is cut to a short run
        warmup = saved.get("train", {}).get("warmup_steps", train_cfg["warmup_steps"])
        train_cfg["warmup_steps"] = min(warmup, train_cfg["total_steps"])
    run = RunConfig(
        model=model_cfg,
        train=TrainConfig(**train_cfg),
        data=args.data or saved.get("data") or preset["data"],  # a resume keeps its run's data
        out=args.out,
        checkpoint_every=args.checkpoint_every,
        workers=args.workers,
        start_method=args.start_method,
        synthetic_fallback=not args.no_synthetic_fallback,
    )
    clock = time.perf_counter()
    trainer = fit(run, resume=not args.no_resume)
    if trainer.dist.rank != 0:
        return 0
    out = Path(args.out)
    print(f"trained {trainer.step - start} steps in {time.perf_counter() - clock:.0f} s (set-up and saves included)")
    try:
        print(f"loss curve: {plot_losses(out / 'losses.jsonl', out / 'loss.png')}")
    except Exception as err:  # the run is trained and saved: a failed plot must not cost the sample grids
        print(f"sphere-fast train: warning: no loss plot ({type(err).__name__}: {err})", file=sys.stderr)
    if args.sample_steps:
        model = trainer.ema
        for steps in args.sample_steps:
            images, nrow = class_grid(model, args.per_class, steps=steps, cfg=preset["cfg"], seed=args.seed)
            print(f"samples ({steps} step{'s' * (steps > 1)}): {save_grid(images, out / f'samples_{steps}step.png', nrow)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    model = load_model(args)
    images, nrow = class_grid(model, args.per_class, steps=args.steps, cfg=args.cfg, seed=args.seed)
    print(save_grid(images, args.out, nrow))
    return 0


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cmd_sample_set(args: argparse.Namespace) -> int:
    from sphere_fast.checkpoint import resolve_checkpoint, weights_sha256
    from sphere_fast.sample_set import pack_npz, write_sample_set
    from sphere_fast.training import init_distributed

    info = init_distributed()  # under torchrun each process writes every world_size-th batch
    if info.world_size > 1 and args.device == "cuda":
        args.device = f"cuda:{info.local_rank}"
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    if args.checkpoint:  # resolved once: a run's latest checkpoint may move on while this loads it
        args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    model = load_model(args, info.rank).to(dtype)  # the paper evaluates in bf16
    if args.checkpoint:  # a rerun on other weights (the live ones after the EMA's, a later checkpoint) is refused
        weights = f"sha256 {weights_sha256(args.checkpoint, ema=args.ema)} ({'ema' if args.ema else 'model'})"
    else:
        weights = f"preset {args.preset} at random init, seed {args.seed}"
    start = time.perf_counter()
    written = write_sample_set(
        model, args.out, args.num_images, batch_size=args.batch_size, steps=args.steps, cfg=args.cfg,
        cfg_position=args.cfg_position, seed=args.seed, weights=weights, rank=info.rank, world_size=info.world_size,
        progress=info.rank == 0,  # one bar, rank 0's share: the processes' bars on one terminal overwrote each other
    )
    print(f"process {info.rank}: wrote {written} images in {time.perf_counter() - start:.1f} s")
    if info.world_size > 1:
        torch.distributed.barrier()
    if args.npz and info.rank == 0:
        print(pack_npz(args.out, args.num_images, num_classes=model.num_classes))
    return 0


def _read_images(paths: Sequence[str], size: int, device: str) -> torch.Tensor:
    from PIL import Image

    from sphere_fast.data import pixels_to_images, resize_center_crop, to_pixels

    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(pixels_to_images(to_pixels(resize_center_crop(img, size))) * 0.5 + 0.5)
    return torch.stack(out).to(device)  # [0, 1], what sphere_fast.editing takes


def cmd_reconstruct(args: argparse.Namespace) -> int:
    model = load_model(args)
    x = _read_images(args.images, model.input_size, args.device)
    out = editing.reconstruct_images(model, x)
    print(save_grid(torch.cat([x, out]), args.out, len(args.images)))
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    model = load_model(args)
    seeds = torch.tensor(args.seeds, dtype=torch.int64) if args.seeds else command_seeds(args.seed, 4)
    labels = torch.tensor(args.labels, dtype=torch.long) if args.labels else None
    images = editing.interpolate(model, seeds, labels, rows=args.rows, cols=args.cols, method=args.method, steps=args.steps, cfg=args.cfg)
    print(save_grid(images.flatten(0, 1), args.out, args.cols))
    return 0


def cmd_crossover(args: argparse.Namespace) -> int:
    model = load_model(args)
    a, b = _read_images([args.first, args.second], model.input_size, args.device)
    seeds = command_seeds(args.seed, 1)
    composite, steps = editing.crossover(
        model, a[None], b[None], args.mask, swap=args.swap, steps=args.steps, seeds=seeds
    )
    # one row: the two inputs, the composite, then each step's image
    row = [a[None], b[None], composite, *steps]
    print(save_grid(torch.cat(row), args.out, len(row)))
    return 0


def cmd_manipulate(args: argparse.Namespace) -> int:
    model = load_model(args)
    x = _read_images(args.images, model.input_size, args.device)
    seeds = command_seeds(args.seed, x.shape[0])
    steps = editing.manipulate(
        model, x, args.target_class, steps=args.steps, noise_scaler=args.noise_scaler, seeds=seeds
    )
    # one column per input image: the input, then each step's image below it
    print(save_grid(torch.stack([x, *steps]).flatten(0, 1), args.out, x.shape[0]))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sphere_fast.checkpoint import checkpoint_to_official, official_to_checkpoint
    from sphere_fast.model import PRESETS

    if args.to_official:
        # the checkpoint folder holds its config and both sets of weights: these options have nothing to choose
        ignored = [flag for flag, value in (("--preset", args.preset), ("--config", args.config),
                                            ("--key", args.key != "model")) if value]
        if ignored:
            raise ValueError(f"--to-official takes no {', '.join(ignored)}: the checkpoint folder holds its model "
                             "config and writes both sets of weights")
        print(checkpoint_to_official(args.source, args.dest))
        return 0
    if args.config is not None:
        config = args.config
    elif args.preset in PRESETS:
        config = PRESETS[args.preset]["config"]
    elif args.preset in TRAIN_PRESETS:
        config = TRAIN_PRESETS[args.preset]["model"]
    else:
        raise SystemExit("converting an official .pth needs the model config: --preset NAME or --config JSON")
    print(official_to_checkpoint(args.source, args.dest, config, key=args.key))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "gpu_check.sh"
    if not (in_checkout(root) and script.exists()):  # not another distribution's top-level benchmarks/
        print("sphere-fast bench runs from a source checkout (benchmarks/gpu_check.sh), not from an installed package")
        return 2
    # the script works from the source tree: a relative OUT is the caller's, so it is resolved here
    return subprocess.call(["bash", str(script), str(Path(args.out).resolve()), *args.gpu_check_args])


# ---- argument parsing ---------------------------------------------------------------------------


def count(text: str) -> int:
    """An argparse type: an int >= 1, so that a bad value is named by its flag."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def image_seed(text: str) -> int:
    """An argparse type: the base seed of a command's images, whose image i draws the seed ``seed * 2**32 + i``
    (``sample_set.image_seeds``), in [0, 2**31) so that those stay int64."""
    from sphere_fast.sample_set import MAX_SEED

    value = int(text)
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**31) (image i draws seed * 2**32 + i), got {value}")
    return value


def _json_object(text: str, source: str) -> dict[str, Any]:
    """The JSON object ``text`` holds, named ``source`` in the argparse error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{source} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object {{...}}, {source} holds a {type(value).__name__}")
    return value


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object, so that bad JSON is named by its flag."""
    return _json_object(text, repr(text))


def json_object_or_file(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object given as text or as a JSON file's path."""
    if text.strip().startswith("{"):
        return json_object(text)
    try:
        content = Path(text).read_text()
    except OSError as err:
        message = f"must be a JSON object or a JSON file; cannot read {text!r} ({err.strerror})"
        raise argparse.ArgumentTypeError(message) from None
    return _json_object(content, f"file {text}")


def loss_weights_arg(text: str) -> str | dict[str, Any]:
    """An argparse type: a loss-weights preset name or a JSON object of the five weights, checked here so that a
    bad one is named by its flag."""
    from sphere_fast.training import loss_weights

    value = json_object(text) if text.strip().startswith("{") else text
    try:
        loss_weights(value)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


# the weight files training.PerceptualLoss.from_files takes, by the names of its keywords
PERCEPTUAL_NETWORKS = ("vgg16", "lpips", "convnext_small")


def perceptual_file(text: str) -> tuple[str, str]:
    """An argparse type: NAME=PATH (split at the first '=') with NAME a perceptual network; an unknown name would
    otherwise be dropped."""
    name, eq, path = text.partition("=")
    if not eq or not path or name not in PERCEPTUAL_NETWORKS:
        raise argparse.ArgumentTypeError(f"must be NAME=PATH with NAME one of {', '.join(PERCEPTUAL_NETWORKS)}, "
                                         f"got {text!r}")
    return name, path


class PerceptualFiles(argparse.Action):
    """Collects the NAME=PATH pairs of every use of the flag into one dict, refusing a network named twice (a dict
    would keep the last path; a second use of the flag would have replaced the first's pairs)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Sequence[tuple[str, str]], option_string: str | None = None) -> None:
        earlier = getattr(namespace, self.dest) or {}
        names = [*earlier, *(name for name, _ in values)]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise argparse.ArgumentError(self, f"{', '.join(twice)} named more than once")
        setattr(namespace, self.dest, {**earlier, **dict(values)})


def _model_command(
    sub: Any, name: str, help: str, func: Any, *, out: str, steps: int | None = None, cfg: bool = False,
    steps_help: str = "forward steps",
) -> argparse.ArgumentParser:
    """A subcommand that loads a model and writes one PNG; the caller adds its own arguments."""
    from sphere_fast.model import PRESETS

    p = sub.add_parser(name, help=help)
    p.set_defaults(func=func)
    p.add_argument("--checkpoint", help="a checkpoint folder or a run folder (uses its latest checkpoint)")
    p.add_argument("--preset", default="fashion-mnist-demo", choices=sorted([*TRAIN_PRESETS, *PRESETS]),
                   help="model preset at random init when no --checkpoint")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of the checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=image_seed, default=0,
                   help="seeds the noise, image i from seed * 2**32 + i (and a preset's random init); in [0, 2**31)")
    p.add_argument("--out", default=out)
    if steps is not None:
        p.add_argument("--steps", type=count, default=steps, help=steps_help)
    if cfg:
        p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    return p


EDIT_STEPS = "edit steps (each an encode and a decode of the image)"


def build_parser() -> argparse.ArgumentParser:
    from sphere_fast.model import PRESETS

    parser = argparse.ArgumentParser(prog="sphere-fast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the library's INFO log: each op's backend, kernel tuning, graph captures, a run's "
                             "start and checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (under torchrun: DDP), then plot losses and write sample grids")
    p.add_argument("--preset", default="fashion-mnist-demo", choices=sorted(TRAIN_PRESETS))
    p.add_argument("--data", help="fashion-mnist, synthetic, an image folder or a .jsonl list (default: a resumed "
                                  "run's, else the preset's)")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=count, help="total optimiser steps")
    p.add_argument("--batch-size", type=count, help="global batch (split over processes)")
    p.add_argument("--accumulation-steps", type=count, help="micro-batches per process batch (gradients summed)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward instead of keeping its activations")
    p.add_argument("--lr", type=float, help="base lr per 256 images of global batch (the paper: 1e-4)")
    p.add_argument("--min-lr", type=float,
                   help="the cosine's floor per 256 images (default: the preset's, or --lr / 100; the paper: 1e-6)")
    p.add_argument("--ema-decay", type=float, help="EMA decay a step (the paper: 0.9997; the short demo: 0.99)")
    p.add_argument("--warmup", type=int,
                   help="warmup steps (default: the preset's, at most --steps; on a resume the checkpoint's)")
    # the run's seed, and the base seed of its sample grids (an image seed: checked before training)
    p.add_argument("--seed", type=image_seed)
    p.add_argument("--autocast", choices=["auto", "bf16", "off"])
    p.add_argument("--loss-weights", type=loss_weights_arg,
                   help="cifar10, af-of, imagenet or a JSON dict of the five weights")
    p.add_argument(
        "--perceptual-weights",
        nargs="+",
        type=perceptual_file,
        action=PerceptualFiles,
        metavar="NAME=PATH",
        help="local weight files of the perceptual loss: vgg16=<torchvision vgg16 .pth> "
        "lpips=<lpips v0.1 vgg.pth> convnext_small=<torchvision convnext_small .pth>",
    )
    p.add_argument("--model-config", type=json_object, help="JSON dict overriding model constructor arguments")
    p.add_argument("--checkpoint-every", type=count, default=500)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--start-method", choices=multiprocessing.get_all_start_methods(),
                   help="how the workers start (default: Python's; fork starts them fastest on Linux)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh: delete the checkpoints and losses of an earlier run in OUT")
    p.add_argument("--no-synthetic-fallback", action="store_true", help="fail instead of using synthetic data")
    p.add_argument("--sample-steps", type=count, nargs="*", default=[1, 4], help="sample grids to write after training")
    p.add_argument("--per-class", type=count, default=8, help="samples per class in the grids")
    p.set_defaults(func=cmd_train)

    p = _model_command(
        sub, "sample", "write a PNG grid of samples (one row per class, the first 16 classes)", cmd_sample,
        out="samples.png", steps=1, cfg=True,
    )
    p.add_argument("--per-class", type=count, default=8)

    p = _model_command(
        sub, "sample-set", "write NUM samples as PNGs (and .npz) for FID; under torchrun split over processes",
        cmd_sample_set, out="samples", steps=4, cfg=True,
    )
    # not --num: torchrun's parser refuses it before starting any process (a prefix of its --numa-binding)
    p.add_argument("--num-images", type=count, default=50_000,
                   help="images in the set; image i has label i %% classes")
    p.add_argument("--batch-size", type=count, default=64)
    p.add_argument("--cfg-position", choices=["combo", "enc", "dec"], default="combo")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--npz", action="store_true", help="also pack OUT/samples.npz (arr_0 images, arr_1 labels)")

    p = _model_command(
        sub, "reconstruct", "encode and decode images (top row inputs, bottom row outputs)", cmd_reconstruct,
        out="reconstruct.png",
    )
    p.add_argument("images", nargs="+")

    p = _model_command(
        sub, "interpolate", "interpolate between noise points (and classes)", cmd_interpolate,
        out="interpolate.png", steps=1, cfg=True,
    )
    p.add_argument("--seeds", type=int, nargs=4,
                   help="noise seeds of the four corners (default: seed * 2**32 + 0 .. 3)")
    p.add_argument("--labels", type=int, nargs=4, help="classes of the four corners (default: drawn from their seeds)")
    p.add_argument("--rows", type=count, default=5)
    p.add_argument("--cols", type=count, default=5)
    p.add_argument("--method", choices=["lerp", "slerp"], default="slerp")

    p = _model_command(
        sub, "crossover", "stitch two images and let the model blend them (one row: the inputs, the composite, each "
        "step's image)", cmd_crossover, out="crossover.png", steps=1, steps_help=EDIT_STEPS,
    )
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--mask", choices=["vertical", "horizontal", "upper_triangular", "flipped_triangular"], default="vertical")
    p.add_argument("--swap", action="store_true")

    p = _model_command(
        sub, "manipulate", "move images towards a target class (a column per image: the input, then each step's image)",
        cmd_manipulate, out="manipulate.png", steps=4, steps_help=EDIT_STEPS,
    )
    p.add_argument("images", nargs="+")
    p.add_argument("--target-class", type=int, required=True)
    p.add_argument("--noise-scaler", type=float, default=0.25)

    p = sub.add_parser("convert", help="official .pth <-> sphere_fast checkpoint folder")
    p.add_argument("source", help="an official .pth, or with --to-official a sphere_fast checkpoint")
    p.add_argument("dest", help="output folder (from .pth) or .pth file (with --to-official)")
    p.add_argument("--to-official", action="store_true")
    p.add_argument("--preset", choices=sorted([*TRAIN_PRESETS, *PRESETS]),
                   help="model preset giving the config of the .pth")
    p.add_argument("--config", type=json_object_or_file, help="model config as JSON text or a JSON file")
    p.add_argument("--key", default="model", help="key holding the state_dict in a .pth dict (ema_model: the EMA "
                   "weights of an official training checkpoint; with the default they are converted too)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("bench",
                       help="run the benchmark suite / GPU check (benchmarks/gpu_check.sh; a source checkout only)")
    p.add_argument("--out", default="bench-results", help="results folder (relative to the current folder)")
    p.add_argument("gpu_check_args", nargs="*", metavar="GPU_CHECK_ARG",
                   help="after --: options passed on to benchmarks/gpu_check.py, e.g. -- --budget 300 --phases tests "
                   "(--budget, --phases, --bench-k, --tests-k, --sanitize-k, --case-timeout)")
    p.set_defaults(func=cmd_bench)
    return parser


@contextlib.contextmanager
def _library_log_shown(verbose: bool) -> Iterator[None]:
    """With ``verbose``, the library's INFO records on stderr for the command's length (without it, only its
    warnings show: Python's last-resort handler)."""
    if not verbose:
        yield
        return
    logger, handler = logging.getLogger("sphere_fast"), logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter("%(message)s"))  # the records name sphere_fast themselves
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _library_log_shown(args.verbose):
            return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError, NotImplementedError) as err:  # OSError: files, folders
        print(f"sphere-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
