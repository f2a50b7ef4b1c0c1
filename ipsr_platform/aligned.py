"""The aligned dataset on disk: one home for the layout `ipsr preprocess` writes (jobs/preprocess.py) and training
(jobs/train_data.py) and evaluation (ipsr_platform/protocols.py) read.

    DIR/_SUCCESS                  written last: a dataset without it is not committed
    DIR/manifest.json             counts, shard list, labels, config, versions, timings, hr_embeddings
    DIR/rejects.parquet           one row per input that gave no face, with the reason
    DIR/data/<split>/*.parquet    FACE_COLUMNS (+ hr_embedding): 128×128 PNGs, one row per face, in hash order
    DIR/_temporary/               the running job's scratch
"""

from __future__ import annotations

import json
from typing import Any

from ipsr_model.errors import UserError
from ipsr_platform.storage import Storage, join

SUCCESS = "_SUCCESS"
TEMPORARY = "_temporary"
MANIFEST = "manifest.json"
REJECTS = "rejects.parquet"
DATA = "data"
ENTRIES = {SUCCESS, TEMPORARY, DATA, REJECTS, MANIFEST}  # everything a dataset folder may hold
FACE_COLUMNS = ["image", "identity", "label", "split", "source", "det_prob", "box", "landmarks"]
HR_EMBEDDING = "hr_embedding"  # FaceNet's embedding of the stored face (`--hr-embeddings`), when present


def is_committed(uri: str, storage: Storage) -> bool:
    """Whether ``uri`` holds a finished preprocess output (its marker and its data folder)."""
    return storage.exists(join(uri, SUCCESS)) and storage.is_dir(join(uri, DATA))


def read_manifest(uri: str, storage: Storage) -> tuple[bytes, dict[str, Any]]:
    """(manifest.json's bytes, parsed) of a committed dataset; every problem is one UserError line."""
    if not storage.exists(join(uri, SUCCESS)):
        if not storage.exists(uri):
            raise UserError(f"--data {uri}: no such dataset")
        raise UserError(
            f"--data {uri} has no {SUCCESS} marker: not a finished `ipsr preprocess` output (still running, or "
            "interrupted? rerun preprocess)"
        )
    try:
        raw = storage.read_bytes(join(uri, MANIFEST))
    except UserError:
        raise UserError(f"--data {uri}: {MANIFEST} is missing (not an `ipsr preprocess` output?)") from None
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise UserError(f"--data {uri}: {MANIFEST} is not a JSON object")
    return raw, parsed
