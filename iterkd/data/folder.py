"""An image folder in torchvision's ImageFolder layout, as a source: it lists and decodes images,
and never trains.

    DIR/train/<class>/**/<image>   required; the sorted class-folder names are the labels
    DIR/val/<class>/...            optional: the validation split (else one is carved off train/)
    DIR/test/<class>/...           optional: the test set (else the run has none)

Decoding (PIL, like ImageFolder's loader): EXIF orientation applied, alpha dropped, then grey when
every image has one band (or --channels 1), RGB otherwise. Images keep their size when all are
one square size; otherwise (or with --image-size N) each is resized so its shorter side is the
target, then centre-cropped square. The side is then zero-padded as the named datasets are
(info.padded_side). Decoding runs in worker processes for large folders, writing straight into the
store's memory map; the training images' per-channel mean and std come out of the same pass."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import IterkdError
from .info import FOLDER, padded_side
from .store import Store, build_store, fingerprint, open_store

# torchvision.datasets.folder.IMG_EXTENSIONS (checked by a test), without importing torchvision here.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
MIN_SIDE, MAX_SIDE = 8, 512
PARALLEL_FROM = 2000  # images; fewer decode faster in this process than workers start
CHUNK = 256
LAYOUT = "DIR/train/<class>/<image> (and optionally DIR/val/<class>/..., DIR/test/<class>/...)"


@dataclass(frozen=True)
class Listing:
    root: Path
    classes: tuple[str, ...]
    files: tuple[Path, ...]  # train, then val, then test
    labels: tuple[int, ...]
    parts: dict[str, tuple[int, int]]  # part -> [start, end) in `files`
    ignored: int  # files that are not images by extension


def list_folder(root: Path) -> Listing:
    """Walk DIR/{train,val,test}/<class>/; every layout problem is one line naming the folder."""
    root = Path(root)
    if root.is_file():
        raise IterkdError(f"--data-dir {root} is a file; an image folder is a directory laid out as {LAYOUT}")
    if not (root / "train").is_dir():
        raise IterkdError(f"image folder {root} has no train/ folder; expected {LAYOUT}")
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    if len(classes) < 2:
        raise IterkdError(
            f"image folder {root}/train has {len(classes)} class folder(s); a classifier needs at least 2 "
            f"({LAYOUT})"
        )
    files: list[Path] = []
    labels: list[int] = []
    parts: dict[str, tuple[int, int]] = {}
    ignored = 0
    for part in ("train", "val", "test"):
        folder = root / part
        if not folder.is_dir():
            continue
        present = sorted(p.name for p in folder.iterdir() if p.is_dir())
        unknown = [c for c in present if c not in classes]
        if unknown:
            raise IterkdError(
                f"image folder {folder} has class folder(s) that train/ lacks: {', '.join(unknown[:5])}; "
                "every class must be in train/"
            )
        start = len(files)
        for label, cls in enumerate(classes):
            if not (folder / cls).is_dir():
                continue
            found = [p for p in sorted((folder / cls).rglob("*")) if p.is_file()]
            images = [p for p in found if p.suffix.lower() in IMG_EXTENSIONS]
            ignored += len(found) - len(images)
            if not images:
                raise IterkdError(
                    f"class folder {folder / cls} has no images (extensions: {', '.join(IMG_EXTENSIONS)})"
                )
            files += images
            labels += [label] * len(images)
        parts[part] = (start, len(files))
    return Listing(root, classes, tuple(files), tuple(labels), parts, ignored)


def folder_store(
    root: Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    log=print,
) -> Store:
    """The store of an image folder: reused when its files (names, sizes, times) and the options are
    unchanged, else decoded now."""
    if image_size is not None and not MIN_SIDE <= image_size <= MAX_SIDE:
        raise IterkdError(f"--image-size must be between {MIN_SIDE} and {MAX_SIDE}, got {image_size}")
    listing = list_folder(root)
    options = {"source": FOLDER, "image_size": image_size, "channels": channels, "skip_bad": skip_bad}
    key = f"{FOLDER}-{fingerprint(options, list(listing.files), listing.root)}"
    store = open_store(key)
    if store is not None:
        return store
    n = len(listing.files)
    log(f"image folder {root}: {n:,} images in {len(listing.classes)} classes; decoding once into the store")
    heads = [
        h
        for _, done in _chunks_done(_probe_chunk, (), list(listing.files), progress, "reading headers")
        for h in done
    ]
    ok = [h for h in heads if not isinstance(h, str)]
    if not ok:
        raise _bad_images(root, [(f, h) for f, h in zip(listing.files, heads)], n)
    side = image_size or collections.Counter(min(w, h) for w, h, _ in ok).most_common(1)[0][0]
    if image_size is None and not MIN_SIDE <= side <= MAX_SIDE:
        raise IterkdError(
            f"image folder {root}: its images are {side} pixels on their shorter side, outside "
            f"{MIN_SIDE}..{MAX_SIDE}; pass --image-size N to resize them"
        )
    c = channels or (1 if all(mode in GREY_MODES for _, _, mode in ok) else 3)
    size = padded_side(side)
    train = range(*listing.parts["train"])

    def fill(images: np.ndarray, labels: np.ndarray) -> dict:
        labels[:] = listing.labels
        shared = (str(images.filename), side, c, (size - side) // 2)
        jobs = [(i, str(f), i in train) for i, f in enumerate(listing.files)]
        sums, count, failed = np.zeros((2, c)), 0, {}
        for start, done in _chunks_done(_decode_chunk, shared, jobs, progress, "decoding"):
            for k, result in enumerate(done):
                if isinstance(result, str):
                    failed[start + k] = result
                elif result is not None:
                    sums += result[0]
                    count += result[1]
        bad = [(listing.files[i], why) for i, why in sorted(failed.items())]
        if bad and not skip_bad:
            raise _bad_images(root, bad, n)
        parts = {part: [i for i in range(a, b) if i not in failed] for part, (a, b) in listing.parts.items()}
        if not parts["train"]:
            raise _bad_images(root, bad, n)
        mean = sums[0] / count
        std = np.sqrt(np.maximum(sums[1] / count - mean**2, 0.0))  # per pixel, not a mean of per-image stds
        return {
            "classes": list(listing.classes),
            "mean": [round(float(m), 6) for m in mean],
            "std": [round(float(s), 6) for s in std],
            "parts": parts,
            "skipped_images": len(failed),
            "ignored_files": listing.ignored,
            "resized": any((w, h) != (side, side) for w, h, _ in ok),
        }

    meta = {
        "name": FOLDER,
        "source": str(listing.root.resolve()),
        "options": options,
        "channels": c,
        "size": size,
        "raw_size": side,
        "flip": True,
    }
    store = build_store(key, shape=(n, c, size, size), fill=fill, meta=meta)
    skipped = store.meta["skipped_images"]
    log(
        f"image folder {root}: stored {n - skipped:,} images ({c} channel(s), {side}px"
        + (f", padded to {size}px" if size != side else "")
        + (f"; skipped {skipped} unreadable" if skipped else "")
        + (f"; ignored {listing.ignored} non-image files" if listing.ignored else "")
        + f") as {store.path}"
    )
    return store


def _bad_images(root: Path, bad: list[tuple[Path, str]], n: int) -> IterkdError:
    first = "; ".join(f"{p} ({why})" for p, why in bad[:3])
    return IterkdError(
        f"image folder {root}: {len(bad)} of {n} images cannot be read: {first}; fix or remove them, "
        "or pass --skip-bad-images to leave them out"
    )


def _chunks_done(fn, shared: tuple, items: list, progress: bool, desc: str):
    """Yield (start, results) for chunks of `items` as `fn(shared, chunk)` finishes them, in worker
    processes when there are many items (in order when in this process)."""
    chunks = [(start, items[start : start + CHUNK]) for start in range(0, len(items), CHUNK)]
    workers = min(os.cpu_count() or 1, len(chunks)) if len(items) >= PARALLEL_FROM else 1
    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        if workers == 1:
            for start, chunk in chunks:
                results = fn(shared, chunk)
                bar.update(len(chunk))
                yield start, results
            return
        # fork where there is one: workers need only PIL and numpy, and start in milliseconds.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(fn, shared, chunk): start for start, chunk in chunks}
            for fut in concurrent.futures.as_completed(futures):
                results = fut.result()
                bar.update(len(results))
                yield futures[fut], results


@contextlib.contextmanager
def _opened(path):
    """PIL's image at `path`, with a decompression bomb an error (a bad image), not a warning."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            yield img


def _probe_chunk(shared: tuple, paths: list[Path]) -> list:
    return [_probe(p) for p in paths]


def _probe(path: Path):
    """(width, height, mode) after EXIF orientation, or the reason the file cannot be read."""
    try:
        with _opened(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: the stored sides swap
                w, h = h, w
            return w, h, img.mode
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        return _why(e)


def _decode_chunk(shared: tuple, jobs: list) -> list:
    """Decode a chunk of images into their rows of the store (opened once per chunk); each result is
    (sums, pixel count) of a training image for the normalisation, None for another, or why it failed."""
    filename, side, channels, pad = shared
    images = np.load(filename, mmap_mode="r+")
    out = []
    for row, path, is_train in jobs:
        pixels = _decode(path, side, channels)
        if isinstance(pixels, str):
            out.append(pixels)
            continue
        images[row, :, pad : pad + side, pad : pad + side] = pixels
        x = pixels.reshape(channels, -1).astype(np.float64) / 255
        out.append((np.stack([x.sum(1), (x * x).sum(1)]), x.shape[1]) if is_train else None)
    images.flush()
    return out


def _decode(path: str, side: int, channels: int) -> np.ndarray | str:
    """One image as uint8 (channels, side, side), or why it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with _opened(path) as img:
            img = ImageOps.exif_transpose(img)
            img = img.convert("L" if channels == 1 else "RGB")  # alpha dropped, as ImageFolder's loader does
            if img.size != (side, side):  # shorter side to `side`, then the centre square
                w, h = img.size
                scale = side / min(w, h)
                size = (max(side, round(w * scale)), max(side, round(h * scale)))
                img = img.resize(size, Image.Resampling.BILINEAR)
                left, top = (size[0] - side) // 2, (size[1] - side) // 2
                img = img.crop((left, top, left + side, top + side))
            return np.asarray(img, dtype=np.uint8).reshape(side, side, channels).transpose(2, 0, 1)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        return _why(e)


def _why(e: Exception) -> str:
    text = " ".join(str(e).split())[:120]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
