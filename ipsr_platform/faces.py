"""Face I/O, one home for every reader of face images: safe decode (signature sniffing, size checks before any
pixel is decoded), ``Rejected``, letterbox, square crop, PNG encode, and the batched MTCNN aligner.

Used by ``ipsr preprocess`` (inside its Ray actors), ``ipsr train``'s input (``decode_faces``), ``ipsr serve``
(enrolment), evaluation protocols, ``ipsr smoke`` and ``bench/device_check.py``.
No Ray, no MLflow, no config models: numpy + Pillow, and torch/facenet-pytorch only when an aligner is built, so
a bare GPU box can measure exactly what production runs.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from ipsr_model.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from ipsr_platform.storage import Storage

FACE_SIZE = 128
PNG_LEVEL = 1

# Pillow's names for the accepted formats (PPM covers PGM/PBM; JPEG also opens the multi-picture MPO variant
# many cameras write). GIF and TIFF are common in face datasets: their first frame / page is the image.
_FORMATS = ("JPEG", "PNG", "PPM", "WEBP", "BMP", "GIF", "TIFF")
ACCEPTED = "JPEG, PNG, PGM/PPM, WebP, BMP, GIF, TIFF"
# Leading bytes of the accepted formats; PPM (P1-P6) and WebP (a RIFF container) are told apart in _signature.
_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"BM": "BMP",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)  # both in args: a copy unpickled in another process is whole
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def _signature(data: bytes) -> str | None:
    """The supported format the bytes start with, else None."""
    if len(data) >= 2 and data[0:1] == b"P" and data[1:2] in b"123456":
        return "PPM"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC.items() if data.startswith(magic)), None)


def _describe(data: bytes) -> str:
    known = {b"\x00\x00\x01\x00": "ICO", b"%PDF": "PDF", b"8BPS": "PSD", b"\x00\x00\x00\x0cjP": "JPEG 2000"}
    return next((f"{name} content" for magic, name in known.items() if data.startswith(magic)), "not an image")


def open_header(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read (signature sniffed, declared size checked), or ``Rejected``."""
    if not data:
        raise Rejected("corrupt", "empty file")
    if _signature(data) is None:
        raise Rejected("unsupported_format", f"{_describe(data)}; accepted: {ACCEPTED}")
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice its limit; for us anything past max_pixels is a reject.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=_FORMATS)  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise Rejected("too_large", str(err)) from None
        except Exception as err:  # noqa: BLE001 - a damaged header surfaces as many exception types
            raise Rejected("corrupt", f"unreadable header: {err}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise Rejected("too_large", f"declared {h}x{w} (HxW) = {w * h} pixels > max_pixels {max_pixels}")
    return img


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes → RGB image, or ``Rejected``. The declared size is checked before any pixel is decoded."""
    img = open_header(data, max_pixels)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
        return _to_rgb(img)
    except Exception as err:  # noqa: BLE001 - truncated/damaged data: OSError, SyntaxError, ValueError, ...
        raise Rejected("corrupt", str(err) or type(err).__name__) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey (PGM/PNG/TIFF): keep the top 8 bits
        arr = np.asarray(img, dtype=np.uint32)
        return Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":  # float TIFF: 0..1 is the usual convention, anything larger is taken as 0..255
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        arr = arr * 255 if arr.max(initial=0) <= 1 else arr
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("P", "PA"):  # palette transparency must go through RGBA to convert cleanly
        img = img.convert("RGBA")
    return img.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, YCbCr, 1


def letterbox(img: Image.Image, size: int) -> tuple[np.ndarray, float, float]:
    """Scale the longest side to ``size``, pad bottom/right with black: one shape for every image in a batch.

    Returns the canvas and the x/y scales; dividing canvas coordinates by them gives original coordinates.
    """
    w, h = img.size
    s = size / max(w, h)
    nw, nh = max(1, min(size, round(w * s))), max(1, min(size, round(h * s)))
    small = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)  # reducing_gap: fast on large photos
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:nh, :nw] = np.asarray(small)
    return canvas, nw / w, nh / h


def crop_face(img: Image.Image, box: np.ndarray, margin: int) -> Image.Image:
    """Square crop centred on the box, sized so the face spans FACE_SIZE - margin pixels, resized to FACE_SIZE.

    Parts of the square outside the image are black (``Image.crop`` pads) rather than shifting or squashing
    the face: position and aspect stay the same for every sample.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) * FACE_SIZE / (FACE_SIZE - margin) / 2
    region = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    return img.crop(region).resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BICUBIC)


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


# Files taken from identity folders (evaluation, smoke); ``ipsr preprocess`` sniffs the bytes instead.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def natural_key(name: str | Path) -> list:
    """'2.pgm' before '10.pgm' (on the file name)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", Path(name).name)]


def identity_files(
    uri: str, storage: Storage, *, recursive: bool = False
) -> tuple[dict[str, list[pafs.FileInfo]], int]:
    """Identity folders ``URI/<identity>/<file>`` (local or s3://): identity → every file in it (``recursive``: and
    below), in natural order; and how many files sit directly under ``uri``, in no identity folder. One listing
    per folder, many in flight: a flat recursive S3 listing of millions of keys is sequential pages of 1,000."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    top = storage.list(uri)
    folders = sorted((i for i in top if i.type == pafs.FileType.Directory), key=lambda i: i.base_name)
    with ThreadPoolExecutor(max_workers=32) as pool:
        listings = list(pool.map(lambda d: storage.list(d.path, recursive=recursive), folders))
    out = {
        folder.base_name: sorted(
            (e for e in entries if e.type == pafs.FileType.File), key=lambda e: natural_key(e.path)
        )
        for folder, entries in zip(folders, listings)
    }
    return out, sum(i.type == pafs.FileType.File for i in top)


def read_image(where: str | Path, data: bytes | None = None, max_pixels: int = 25_000_000) -> Image.Image:
    """An image of a folder being evaluated (the file ``where``, or its ``data``) → RGB, decoded like every other
    face (signature and size checked first, EXIF rotation applied), or one ``UserError`` naming it."""
    try:
        return decode(Path(where).read_bytes() if data is None else data, max_pixels)
    except OSError as err:
        raise UserError(f"cannot read image {where}: {err.strerror or err}") from None
    except Rejected as err:
        raise UserError(f"cannot read image {where}: {err.detail}") from None


def decode_face(data: bytes) -> Image.Image:
    """An encoded 128×128 face crop (the aligner's PNG) → RGB image."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def decode_faces(blobs) -> np.ndarray:
    """Encoded 128×128 faces (a dataset's PNG/JPEG bytes) → uint8 NHWC RGB; the training input's hot path."""
    out = np.empty((len(blobs), FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as image:
            if image.size != (FACE_SIZE, FACE_SIZE):
                raise ValueError(f"dataset face {i} is {image.size[0]}x{image.size[1]}, expected 128x128")
            out[i] = np.asarray(image.convert("RGB"))
    return out


# --- alignment --------------------------------------------------------------------------------------------------


@dataclass
class Aligned:
    """One detected face: the 128×128 crop and where it was, in the original image's pixels."""

    face: Image.Image
    det_prob: float
    box: np.ndarray  # x1, y1, x2, y2
    landmarks: np.ndarray  # eyes, nose, mouth corners: [5, 2] x, y


class FaceAligner:
    """Decode + detect + crop, batched: MTCNN's three nets load once, every call detects a whole batch at once.

    ``align(list[bytes])`` returns, per input, an ``Aligned`` or the ``Rejected`` that explains why not.
    """

    def __init__(
        self,
        device: str = "cpu",
        detect_size: int = 160,
        min_face_size: int = 20,
        margin: int = 16,
        max_pixels: int = 40_000_000,
    ):
        import torch
        from facenet_pytorch import MTCNN

        # keep_all + select_largest: detect() returns every face, largest first; we keep the first. Only
        # detect() is used (crops are ours), so post_process and image_size do not matter.
        self.mtcnn = MTCNN(min_face_size=min_face_size, select_largest=True, keep_all=True, device=device).eval()
        # Channels-last weights make every conv output channels-last, and PyTorch's CPU max-pool is 3-10x faster
        # on that layout than on NCHW (measured: PNet's pool 14 -> 5 ms, RNet's 143 -> 13 ms per batch). Same
        # arithmetic, same detections; ~1.6x more images/s per actor.
        self.mtcnn.to(memory_format=torch.channels_last)
        self.detect_size, self.margin, self.max_pixels = detect_size, margin, max_pixels

    def align(self, blobs: list[bytes]) -> list[Aligned | Rejected]:
        out: list[Aligned | Rejected] = []
        images, canvases, scales, todo = [], [], [], []
        for i, data in enumerate(blobs):
            try:
                img = decode(data, self.max_pixels)
            except Rejected as rej:
                out.append(rej)
                continue
            out.append(Rejected("no_face", "MTCNN found no face"))  # replaced below when a face is found
            canvas, sx, sy = letterbox(img, self.detect_size)
            images.append(img)
            canvases.append(canvas)
            scales.append((sx, sy))
            todo.append(i)
        if not todo:
            return out
        # One call for the whole batch: every canvas has the same shape, so MTCNN runs each pyramid level once for
        # all images instead of once per image.
        boxes, probs, points = self.mtcnn.detect(np.stack(canvases), landmarks=True)
        for i, img, (sx, sy), b, p, lm in zip(todo, images, scales, boxes, probs, points):
            if b is not None and len(b):
                box = b[0] / np.array([sx, sy, sx, sy])  # largest face, back in original pixels
                out[i] = Aligned(crop_face(img, box, self.margin), float(p[0]), box, lm[0] / np.array([sx, sy]))
        return out


def probe_face(img: Image.Image, lr_max_side: int) -> tuple[Image.Image, Image.Image | None]:
    """The 128×128 face a probe is embedded from, and the probe itself when it is low-resolution (both sides ≤
    ``lr_max_side``; the model's output is back-projected toward it), else None. One rule for `ipsr serve` and
    `ipsr identify`, so the same probe gives the same answer.

    A low-resolution crop is a whole face at a fraction of 128², possibly non-square (16x12): stretched back, as
    the degradation's bicubic up does. A larger probe keeps its aspect: centre square crop."""
    from ipsr_model.images import square_face

    if max(img.size) <= lr_max_side:
        return img.resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BICUBIC), img
    return square_face(img), None


def make_probe(face: Image.Image, lr: Image.Image | None, super_resolve: str, back_projection: int, **fields):
    """`probe_face`'s answer as an ``ipsr_model.identify.Probe``: super-resolved when low-resolution ("auto") or asked
    to ("true"), then back-projected toward the LR image when there is one; ``fields``: the rest of the Probe."""
    from ipsr_model.identify import Probe
    from ipsr_model.images import to_tensor

    wanted = lr is not None if super_resolve == "auto" else super_resolve == "true"
    low = None if lr is None else to_tensor(lr)[0]
    return Probe(to_tensor(face)[0], wanted, lr=low, back_projection=back_projection, **fields)


def enrolment_faces(blobs: list[bytes], aligner: FaceAligner | None, max_pixels: int) -> list:
    """A 128×128 face (PIL) or the ``Rejected`` reason, per image, as enrolment takes it: MTCNN's crop when an
    ``aligner`` is given, else the centre square of an already-aligned crop. One rule for `ipsr serve` and
    `ipsr enrol`, so the same photo gives the same gallery row."""
    from ipsr_model.images import square_face

    if aligner is not None:
        return [r if isinstance(r, Rejected) else r.face for r in aligner.align(blobs)]
    out: list = []
    for blob in blobs:
        try:
            out.append(square_face(decode(blob, max_pixels)))
        except Rejected as err:
            out.append(err)
    return out
