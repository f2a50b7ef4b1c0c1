"""A VGGFace2-shaped face tree, synthesised from the shared real faces, for rehearsals at scale.

    python bench/synth_faces.py OUT --images 100000 [--per-identity 360] [--seed 0] [--workers 2]
    python bench/synth_faces.py s3://bucket/prefix --images 20000      # via ipsr's Storage (AWS_ENDPOINT_URL: moto)
    ipsr preprocess --input OUT/train --output DST [--manifest OUT/train_list.txt]

Layout as VGGFace2 ships it: ``OUT/train/nNNNNNN/NNNN_NN.jpg`` (JPEG q90, longest side 200–300 px, the face 55–85 %
of it, on a smooth random background), ~360 images per identity, plus ``OUT/train_list.txt``
(``nNNNNNN/NNNN_NN.jpg`` per line, relative to ``OUT/train``). Each identity starts from one real face (ORL's 400
+ the four colour portraits, cycled), and each image
is a new random view of it: flip, rotation ±8°, scale, shift, brightness/contrast/colour jitter, so MTCNN works as
hard as on real photos of that size. Every image is a pure function of (seed, index): reruns and parallel workers
write the same bytes. The faces are not new *people* — identity is the folder — which is all a throughput and
batch-mixing rehearsal needs.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@lru_cache(maxsize=1)
def base_faces() -> tuple[Image.Image, ...]:
    """The real faces every identity starts from (one per identity, cycled)."""
    # Sorted by file then person: neighbouring identities start from different people.
    files = sorted((SHARED / "att_faces").glob("s*/*.pgm"), key=lambda f: (f.stem, f.parent.name))
    files += sorted((SHARED / "facenet_test_images").glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"error: no faces under {SHARED} (att_faces/, facenet_test_images/)")
    faces = []
    for f in files:
        img = Image.open(f).convert("RGB")
        img.thumbnail((256, 256))  # the portraits are large; the views are at most 300 px anyway
        faces.append(img)
    return tuple(faces)


def name_of(index: int, per_identity: int) -> str:
    """Image ``index`` → ``nNNNNNN/NNNN_NN.jpg`` (identities from n000001, images from 0001_01)."""
    identity, k = divmod(index, per_identity)
    return f"n{identity + 1:06d}/{k + 1:04d}_{1 + k % 3:02d}.jpg"


def render(index: int, per_identity: int, seed: int, sides: tuple[int, int] = (200, 300)) -> bytes:
    """One random view (JPEG bytes) of identity ``index // per_identity``'s base face."""
    faces = base_faces()
    rng = np.random.default_rng([seed, index])
    face = faces[(index // per_identity) % len(faces)]
    if rng.random() < 0.5:
        face = ImageOps.mirror(face)
    face = ImageEnhance.Brightness(face).enhance(rng.uniform(0.7, 1.3))
    face = ImageEnhance.Contrast(face).enhance(rng.uniform(0.7, 1.3))
    tint = np.asarray(face, np.float32) * rng.uniform(0.85, 1.15, 3)
    face = Image.fromarray(tint.clip(0, 255).astype(np.uint8))
    height = int(rng.integers(sides[0], sides[1] + 1))
    width = int(height * rng.uniform(0.75, 1.0))
    scale = rng.uniform(0.55, 0.85) * min(width / face.width, height / face.height)
    face = face.resize((max(1, round(face.width * scale)), max(1, round(face.height * scale))), Image.BILINEAR)
    face = face.rotate(rng.uniform(-8, 8), Image.BILINEAR, fillcolor=tuple(int(c) for c in rng.integers(0, 256, 3)))
    # A smooth background: a few random colours, upsampled.
    background = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize(
        (width, height), Image.BILINEAR
    )
    x = int(rng.integers(0, max(1, width - face.width + 1)))
    y = int(rng.integers(0, max(1, height - face.height + 1)))
    background.paste(face, (x, y))
    buf = io.BytesIO()
    background.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_chunk(out: str, start: int, stop: int, per_identity: int, seed: int, sides: tuple[int, int]) -> int:
    sink = _sink(out)
    for i in range(start, stop):
        sink("train/" + name_of(i, per_identity), render(i, per_identity, seed, sides))
    return stop - start


def _sink(out: str):
    """(relative name, bytes) → written under ``out`` (a folder, or s3:// through ipsr's Storage)."""
    if out.startswith("s3://"):
        from ipsr_platform.storage import Storage, join

        storage = Storage.from_env()
        return lambda name, data: storage.write_bytes(join(out, name), data)
    root = Path(out)

    def write(name: str, data: bytes) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return write


def synthesize(
    out: str, images: int, per_identity: int = 360, seed: int = 0, workers: int = 2, sides: tuple[int, int] = (200, 300)
) -> float:
    """Writes the tree; returns the seconds it took."""
    start = time.perf_counter()
    chunk = 500
    bounds = [(a, min(a + chunk, images)) for a in range(0, images, chunk)]
    args = dict(out=str(out), per_identity=per_identity, seed=seed, sides=sides)
    pool = ProcessPoolExecutor(workers) if workers > 1 else ThreadPoolExecutor(1)
    with pool:
        for _ in pool.map(_chunk_star, [(a, b, args) for a, b in bounds]):
            pass
    listing = "".join(name_of(i, per_identity) + "\n" for i in range(images)).encode()
    _sink(str(out))("train_list.txt", listing)
    return time.perf_counter() - start


def _chunk_star(job: tuple[int, int, dict]) -> int:
    start, stop, args = job
    return _write_chunk(start=start, stop=stop, **args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder or s3://bucket/prefix")
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--per-identity", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.images < 1 or args.per_identity < 1:
        parser.error("--images and --per-identity must be >= 1")
    seconds = synthesize(args.out, args.images, args.per_identity, args.seed, args.workers)
    identities = -(-args.images // args.per_identity)
    print(
        f"{args.images} images of {identities} identities → {args.out} in {seconds:.1f} s "
        f"({args.images / seconds:.0f} img/s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
