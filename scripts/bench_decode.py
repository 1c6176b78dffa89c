"""Decoding photos for the batch pipeline, and what it buys in pretraining, side by side in one run.

    python scripts/bench_decode.py --data /tmp/intel-scenes/train --side 256
    python scripts/bench_decode.py --make-photos 400 --photo-size 1024x768 --side 256 --pretrain

Decoders (one process, images/s; each image to ``side x side`` uint8, shorter side resized and
centre-cropped, as ``ssl_pretrain.data.pixel_cache`` stores it):

* pil-full:    Pillow decodes the whole JPEG, then the resize (as a per-image loader decodes);
* pil-draft:   Pillow with DCT scaling (``Image.draft``): 1/2, 1/4 or 1/8 of the size while the
               shorter side stays >= ``side``, the resize in torch (``fit_square``) - the pipeline's;
* pil-draft-pil-resize: the same with Pillow's own bicubic resize (``ImageOps.fit``);
* torchvision: ``torchvision.io.decode_jpeg`` (whole image), antialiased bicubic ``resize`` and crop in torch;
* simplejpeg:  libjpeg-turbo with DCT scaling (``min_height``/``min_width``), then Pillow's resize
               (skipped when simplejpeg is not installed: ``pip install simplejpeg``).

``--pretrain`` adds pretraining images/s on the folder (``--config``, default the ImageNet-size
ResNet-18 preset): the bare step on ready tensors, the batch pipeline over the decoded cache
(``data.pipeline=auto``; its set-up time, decode and then cache reuse, is printed apart) and the
per-image PIL loader (``data.pipeline=pil``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import benchmarking
from ssl_pretrain.data import open_source, random_subset
from ssl_pretrain.data.images import load_image
from ssl_pretrain.data.pixel_cache import fit_square

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "intel-scenes-jpg.tar.gz"


def decode_pil_full(data: bytes, path: str, side: int) -> np.ndarray:
    return fit_square(load_image(path), side)


def decode_pil_draft(data: bytes, path: str, side: int) -> np.ndarray:
    return fit_square(load_image(path, min_side=side), side)


def decode_pil_draft_pil_resize(data: bytes, path: str, side: int) -> np.ndarray:
    from PIL import ImageOps

    return np.asarray(ImageOps.fit(load_image(path, min_side=side), (side, side), Image.BICUBIC))


def decode_torchvision(data: bytes, path: str, side: int) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import center_crop, resize

    image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    image = center_crop(resize(image, side, InterpolationMode.BICUBIC, antialias=True), [side, side])
    return image.permute(1, 2, 0).numpy()


def decode_simplejpeg(data: bytes, path: str, side: int) -> np.ndarray:
    import simplejpeg

    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)
    return fit_square(Image.fromarray(pixels), side)


def decoders() -> dict:
    found = {"pil-full": decode_pil_full, "pil-draft": decode_pil_draft,
             "pil-draft-pil-resize": decode_pil_draft_pil_resize, "torchvision": decode_torchvision}
    try:
        import simplejpeg  # noqa: F401
        found["simplejpeg"] = decode_simplejpeg
    except ImportError:
        print("simplejpeg not installed: pip install simplejpeg to time it", file=sys.stderr)
    return found


def make_photos(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` JPEG photos of ``size``: the shared Intel scene photos upscaled where they are
    unpacked beside the repository, else smooth synthetic images with grain."""
    folder.mkdir(parents=True, exist_ok=True)
    originals: list[Path] = []
    if SHARED_PHOTOS.exists():
        unpacked = folder.parent / "intel-scenes"
        if not unpacked.exists():
            shutil.unpack_archive(SHARED_PHOTOS, unpacked)
        originals = sorted(path for path in unpacked.rglob("*.jpg"))[:count]
    rng = np.random.default_rng(0)
    for index in range(count):
        if index < len(originals):
            image = Image.open(originals[index]).convert("RGB").resize(size, Image.BICUBIC)
        else:
            y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
            waves = [np.sin(x * rng.uniform(2, 20) + y * rng.uniform(2, 20)) for _ in range(3)]
            pixels = (np.stack(waves, axis=-1) + 1) * 110 + rng.normal(0, 12, (size[1], size[0], 3))
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.save(folder / f"{index:05d}.jpg", quality=90)
    return folder


def jpeg_files(folder: Path, count: int) -> list[Path]:
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in (".jpg", ".jpeg"))[:count]
    if not files:
        raise SystemExit(f"no JPEG files under {folder}")
    return files


def time_decoders(files: list[Path], side: int, rounds: int) -> dict[str, float]:
    """Images/s of each decoder (best of ``rounds``, decoders interleaved), files read into memory first."""
    blobs = [(path.read_bytes(), str(path)) for path in files]

    def measure(decode):
        return lambda: len(blobs) / benchmarking.seconds_per_call(
            lambda: [decode(data, path, side) for data, path in blobs])

    chosen, threads = decoders(), torch.get_num_threads()
    torch.set_num_threads(1)  # one decoding process per core, as the pipeline's workers run
    for decode in chosen.values():  # each once untimed, and all must agree on the picture
        reference = decode_pil_full(*blobs[0], side).astype(int)
        assert np.abs(decode(*blobs[0], side).astype(int) - reference).mean() < 12, decode.__name__
    try:
        return benchmarking.interleaved({name: measure(decode) for name, decode in chosen.items()}, rounds, max)
    finally:
        torch.set_num_threads(threads)


def time_pretraining(args, argv, folder: Path) -> None:
    """Bare step vs the batch pipeline vs the per-image PIL loader on ``folder``, with a fresh
    pixel cache of its own."""
    cache = tempfile.mkdtemp(prefix="bench-decode-cache-")  # empty: the first set-up decodes
    previous = os.environ.get("SSL_PRETRAIN_CACHE")
    os.environ["SSL_PRETRAIN_CACHE"] = cache
    try:
        _time_pretraining(args, argv, folder)
    finally:  # the caller's cache setting back, and no cache left behind
        if previous is None:
            os.environ.pop("SSL_PRETRAIN_CACHE", None)
        else:
            os.environ["SSL_PRETRAIN_CACHE"] = previous
        shutil.rmtree(cache, ignore_errors=True)


def _time_pretraining(args, argv, folder: Path) -> None:
    import bench_throughput as throughput
    from ssl_pretrain.config import load_config
    from ssl_pretrain.data.pipeline import build_loader
    from ssl_pretrain.train import resolve_device, train_step

    overrides = [f"data.source={folder}", *args.overrides]
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.train.device)
    source = random_subset(open_source(str(folder)), args.images)
    batch = cfg.train.batch_size
    (batches, _), decode_seconds = benchmarking.timed(build_loader, cfg, source, device, progress=False)
    (batches, _), reuse_seconds = benchmarking.timed(build_loader, cfg, source, device, progress=False)
    pil = load_config(args.config, [*overrides, "data.pipeline=pil", f"data.num_workers={args.workers}"])
    pil_batches, _ = build_loader(pil, source, device, progress=False)
    contenders = {  # (batches, step): each its own model, as a fresh run has
        "bare step": (throughput.bare_batches(cfg, device), throughput.fresh_step(cfg, device)),
        "batch pipeline (decoded cache)": (throughput.endless(lambda: batches), throughput.fresh_step(cfg, device)),
        f"per-image PIL loader ({args.workers} workers)": (throughput.endless(lambda: pil_batches),
                                                           throughput.fresh_step(pil, device)),
    }
    for batches_of, step in contenders.values():  # warm-up: kernel choice, the loader's workers
        for _ in range(args.warmup):
            train_step(step, next(batches_of)["views"])

    def rate(batches_of, step):
        def measure():
            seconds = benchmarking.seconds_per_call(lambda: train_step(step, next(batches_of)["views"]), args.steps)
            return batch / seconds
        return measure

    # the contenders take turns, so a change in the machine's speed meets all of them
    results = benchmarking.interleaved({name: rate(*pair) for name, pair in contenders.items()}, args.rounds,
                                       max)
    print("\n" + benchmarking.header(__file__, argv, f"device {device}",
                                     f"{cfg.model.backbone} {cfg.augment.input_size}px batch {batch}",
                                     f"preset variant {cfg.variant}" if cfg.variant else "",
                                     f"{cfg.augment.local_views} local views" if cfg.augment.local_views else "",
                                     f"{len(source)} photos") + "\n")
    print(benchmarking.table_header("pretraining", "images/s", "vs bare"))
    for name, rate in results.items():
        print(benchmarking.table_row(name, f"{rate:.1f}", f"{rate / results['bare step']:.2f}"))
    if cfg.augment.local_views:
        print(f"\nThe PIL loader makes no local views (multi-crop is the batch pipeline's): its steps train on 2 "
              f"views, the others' on 2 + {cfg.augment.local_views}.")
    print(f"\nbatch pipeline set-up: {decode_seconds:.1f} s decoding {len(source)} photos into the cache file, "
          f"{reuse_seconds:.2f} s reusing it (a later run), not in the rates above.")


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--data", help="folder of JPEG photos (default: --make-photos of them)")
    parser.add_argument("--make-photos", type=int, default=200, help="photos to make when --data is not given")
    parser.add_argument("--photo-size", default="1024x768", help="their size, WIDTHxHEIGHT")
    parser.add_argument("--images", type=int, default=400, help="photos to decode / train on")
    parser.add_argument("--side", type=int, default=256, help="storage side to decode to (224 px training: 256)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per decoder / contender (best kept)")
    parser.add_argument("--pretrain", action="store_true", help="also time pretraining on the folder")
    parser.add_argument("--config", default="configs/warm_start_resnet18.yaml")
    benchmarking.add_settings(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed pretraining steps per contender and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4, help="PIL loader workers")
    args = parser.parse_args(argv)
    scratch = None
    if args.data:
        folder = Path(args.data)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="bench-decode-"))
        width, height = (int(part) for part in args.photo_size.split("x"))
        folder = make_photos(scratch / "photos", args.make_photos, (width, height))
    try:
        files = jpeg_files(folder, args.images)
        sizes = {Image.open(path).size for path in files[:50]}
        rates = time_decoders(files, args.side, args.rounds)
        print("\n" + benchmarking.header(__file__, argv, f"{len(files)} JPEG photos of {sorted(sizes)[:3]}"
                                         f"{' ...' if len(sizes) > 3 else ''} to {args.side}x{args.side}") + "\n")
        print(benchmarking.table_header("decoder (one process)", "images/s", "vs pil-full"))
        for name, rate in rates.items():
            print(benchmarking.table_row(name, f"{rate:.1f}", f"{rate / rates['pil-full']:.2f}"))
        if args.pretrain:
            time_pretraining(args, argv, folder)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
