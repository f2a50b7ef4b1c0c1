import pytest
import torch
from PIL import Image

from ipsr_model.degradation import (
    PAPER_SIZES,
    MultiScaleDegradation,
    back_project,
    degrade,
    parse_size,
    random_greyscale,
    resize,
)
from ipsr_model.images import square_face, to_pil, to_tensor, to_uint8


@pytest.fixture(scope="module")
def faces(att_faces):
    images = [square_face(Image.open(att_faces / f"s{i}" / "1.pgm")) for i in range(1, 9)]
    return to_tensor(images)


def _pil_resize(batch: torch.Tensor, size) -> torch.Tensor:
    out = [im.resize((size[1], size[0]), Image.BICUBIC) for im in map(Image.fromarray, to_uint8(batch))]
    return to_tensor(out)


@pytest.mark.parametrize("size", [(7, 6), (16, 12), (21, 15), (112, 96)])
def test_antialiased_bicubic_downscale_matches_pil(faces, size):
    ours = resize(faces, size)
    pil = _pil_resize(faces, size)
    error = (ours - pil).abs() * 127.5  # in 0-255 grey levels
    assert error.mean() < 0.5 and error.max() <= 1.5  # measured: mean 0.25-0.30, max 0.7-1.1
    # Without antialiasing torch is far from PIL at strong reductions: the tolerance is meaningful.
    plain = torch.nn.functional.interpolate(faces, size=size, mode="bicubic", align_corners=False)
    if size[0] <= 21:
        assert ((plain - pil).abs() * 127.5).mean() > 2 * error.mean() + 0.5


def test_bicubic_upscale_matches_pil(faces):
    low = _pil_resize(faces, (16, 12))
    ours = resize(low, (128, 128))
    pil = _pil_resize(low, (128, 128))
    assert ((ours - pil).abs() * 127.5).mean() < 0.6


def test_fixed_size_degradation_shape_range_and_information_loss(faces):
    low = degrade(faces, (7, 6))
    assert low.shape == faces.shape and low.min() >= -1 and low.max() <= 1
    mild = degrade(faces, (32, 32))
    assert (mild - faces).abs().mean() < (low - faces).abs().mean()


def test_each_sample_gets_its_own_size_reproducibly(faces):
    degradation = MultiScaleDegradation()
    out, choice = degradation(faces, torch.Generator().manual_seed(3))
    again, choice_again = degradation(faces, torch.Generator().manual_seed(3))
    assert torch.equal(choice, choice_again) and torch.equal(out, again)
    for i, index in enumerate(choice.tolist()):
        assert torch.allclose(out[i : i + 1], degrade(faces[i : i + 1], PAPER_SIZES[index]), atol=1e-5)
    assert out.min() >= -1 and out.max() <= 1


def test_sizes_are_drawn_uniformly():
    counts = torch.bincount(MultiScaleDegradation().sample(20_000, torch.Generator().manual_seed(0)), minlength=10)
    assert len(counts) == 10
    frequencies = counts.float() / counts.sum()
    assert ((frequencies - 0.1).abs() < 0.015).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_runs_on_gpu(faces):
    out, _ = MultiScaleDegradation()(faces.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert out.is_cuda and out.shape == faces.shape


def test_parse_size():
    assert parse_size("16x12") == (16, 12)
    assert len(PAPER_SIZES) == 10 and PAPER_SIZES[3] == (16, 12)
    for bad in ("16", "axb", "0x3", "16x12x3"):
        with pytest.raises(ValueError, match="16x12|positive"):
            parse_size(bad)


def test_random_greyscale_matches_pil_luma_and_its_share():
    """p = 1: every face is PIL's convert("L") in all three channels (within uint8 rounding); p = 0: untouched;
    p = 0.2: about a fifth of a large batch."""
    colour = to_tensor([Image.fromarray(a) for a in torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8).numpy()])
    grey = random_greyscale(colour, 1.0)
    pil = to_tensor([im.convert("L").convert("RGB") for im in to_pil(colour)])
    assert (
        (grey - pil).abs().max() <= 2 * 2 / 255
        and (grey[:, 0] == grey[:, 1]).all()
        and (grey[:, 1] == grey[:, 2]).all()
    )
    assert torch.equal(random_greyscale(colour, 0.0), colour)
    many = torch.rand(2000, 3, 2, 2) * 2 - 1
    share = (random_greyscale(many, 0.2, torch.Generator().manual_seed(0)) != many).flatten(1).any(1)
    assert 0.17 < share.float().mean() < 0.23


@pytest.mark.parametrize("size", [(11, 8), (21, 15)])
def test_back_projection_makes_a_face_agree_with_its_lr_image(faces, size):
    """Shrunk back to the LR size, the back-projected face is the LR image (bicubic up is not); it is closer to HR."""
    low = resize(faces, size)
    bicubic = degrade(faces, size)
    projected = back_project(bicubic, low, steps=3)
    assert projected.shape == faces.shape and projected.abs().max() <= 1.0
    before, after = ((resize(x, size) - low).abs().mean() for x in (bicubic, projected))
    assert after < before / 5, (before, after)
    assert ((projected - faces) ** 2).mean() < ((bicubic - faces) ** 2).mean()
    assert torch.equal(back_project(bicubic, low, steps=0), bicubic)


def test_back_projection_leaves_a_one_pixel_side_alone(faces):
    """torch's antialiased bicubic turns a 1-wide image into a constant: such an LR image cannot steer anything."""
    bicubic = degrade(faces, (16, 1))
    assert torch.equal(back_project(bicubic, resize(faces, (16, 1))), bicubic)


def test_identify_batch_back_projects_each_lr_probe_toward_its_own_image(faces):
    """A mixed batch, as `ipsr serve` gets one: LR probes of two sizes are each made to agree with their own image;
    a probe not super-resolved, one without an LR image (HR) and one with a 1-wide LR image are left as they were."""
    from ipsr_model.identify import Probe, identify_batch

    sizes = [(16, 12), (21, 15), (16, 12), None, (16, 1)]
    lows = [None if s is None else resize(faces[i : i + 1], s)[0] for i, s in enumerate(sizes)]
    images = [faces[i] if s is None else degrade(faces[i : i + 1], s)[0] for i, s in enumerate(sizes)]
    probes = [Probe(images[i], i != 2, lows[i], 3, want_image=True) for i in range(len(sizes))]
    out = identify_batch(torch.nn.Identity(), torch.nn.Identity(), probes, torch.device("cpu"))
    for i in (0, 1):
        expected = back_project(images[i][None], lows[i][None], 3)
        torch.testing.assert_close(out[i]["image"], expected)
        assert not torch.allclose(expected, images[i][None], atol=1e-3)
    for i in (2, 3, 4):
        assert torch.equal(out[i]["image"][0], images[i]), i
