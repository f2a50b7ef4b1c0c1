import pytest
import torch
from torch import nn

from ipsr_model.unet import UNetGenerator


def _shapes_into(model, modules):
    """Input shapes of `modules` during one forward pass."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape))) for m in modules]
    model(torch.randn(2, 3, 128, 128))
    for handle in handles:
        handle.remove()
    return seen


def test_encoder_halves_seven_times_to_a_1x1_bottleneck():
    model = UNetGenerator(base_channels=64).eval()
    convs = [block[0] for block in model.down]
    assert len(convs) == 7
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    outputs = []
    handles = [b.register_forward_hook(lambda _m, _a, out: outputs.append(tuple(out.shape))) for b in model.down]
    model(torch.randn(2, 3, 128, 128))
    for h in handles:
        h.remove()
    widths = [64, 128, 256, 512, 512, 512, 512]
    assert outputs == [(2, w, 128 >> (i + 1), 128 >> (i + 1)) for i, w in enumerate(widths)]


def test_batchnorm_and_activations_per_block():
    model = UNetGenerator(base_channels=64)
    has_bn = [any(isinstance(m, nn.BatchNorm2d) for m in block) for block in model.down]
    assert has_bn == [False, True, True, True, True, True, False]  # not on the first (pixels) nor the 1x1 bottleneck
    assert all(isinstance(block[-1], nn.LeakyReLU) and block[-1].negative_slope == 0.2 for block in model.down[:-1])
    assert len(model.up) == 6 and all(
        isinstance(b[0], nn.ConvTranspose2d) and isinstance(b[1], nn.BatchNorm2d) for b in model.up
    )
    dropout = [any(isinstance(m, nn.Dropout) for m in block) for block in model.up]
    assert dropout == [True, True, True, False, False, False]
    assert isinstance(model.to_image[0], nn.ConvTranspose2d) and isinstance(model.to_image[1], nn.Tanh)


def test_six_skip_concatenations_mirror_the_encoder():
    model = UNetGenerator(base_channels=8).eval()
    # Decoder inputs after the innermost: [its own output ++ encoder output at the same scale].
    decoder = list(model.up[1:]) + [model.to_image[0]]
    shapes = _shapes_into(model, decoder)
    widths = [8, 16, 32, 64, 64, 64]  # encoder outputs 1..6 (the 7th is the bottleneck)
    expected = [(2, 2 * w, 128 >> (i + 1), 128 >> (i + 1)) for i, w in reversed(list(enumerate(widths)))]
    assert shapes == expected
    assert _shapes_into(model, [model.up[0]]) == [(2, 64, 1, 1)]


def test_skips_carry_the_encoder_features():
    """Zeroing one skip changes the output: the concatenation is really used."""
    torch.manual_seed(0)
    model = UNetGenerator(base_channels=8).eval()
    x = torch.randn(1, 3, 128, 128)
    reference = model(x)
    handle = model.down[0].register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
    changed = model(x)
    handle.remove()
    assert not torch.allclose(reference, changed)


def test_output_shape_and_range():
    model = UNetGenerator(base_channels=8).eval()
    y = model(torch.randn(3, 3, 128, 128) * 50)
    assert y.shape == (3, 3, 128, 128)
    assert y.min() >= -1 and y.max() <= 1
    assert y.abs().max() > 0.5  # large inputs saturate tanh: the range bound is really exercised


def test_bad_input_size_and_width():
    with pytest.raises(ValueError, match="128x128"):
        UNetGenerator(base_channels=4)(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="base_channels"):
        UNetGenerator(base_channels=0)


def test_paper_width_parameter_count():
    model = UNetGenerator(base_channels=64)
    assert sum(p.numel() for p in model.parameters()) == 41_829_571


def test_residual_output_starts_as_its_input_and_says_so_in_its_state_dict(tmp_path):
    """SR = clamp(input + U-Net(input)) with a zero last layer: an untrained residual generator *is* bicubic, the
    paper's network inside is unchanged (same parameters), and the flag travels with the weights."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    residual = UNetGenerator(base_channels=4, residual=True).eval()
    assert torch.equal(residual(x), x)
    plain = UNetGenerator(base_channels=4).eval()
    assert [p.shape for p in plain.parameters()] == [p.shape for p in residual.parameters()]
    assert not torch.equal(plain(x), x)
    torch.save(residual.state_dict(), tmp_path / "g.pt")
    state = torch.load(tmp_path / "g.pt", weights_only=True)
    assert state["_extra_state"] == {"residual": True}
    UNetGenerator(base_channels=4, residual=True).load_state_dict(state)
    with pytest.raises(RuntimeError, match="residual=True"):
        UNetGenerator(base_channels=4).load_state_dict(state)
    # Trained away from zero, the residual output stays in range.
    with torch.no_grad():
        residual.to_image[0].weight.normal_(0, 1.0)
    out = residual(x)
    assert out.min() >= -1 and out.max() <= 1 and not torch.equal(out, x)


def test_checkpoint_loader_reads_the_residual_flag(tmp_path):
    from ipsr_platform.models import load_generator

    torch.manual_seed(0)
    generator = UNetGenerator(base_channels=4, residual=True).eval()
    torch.save(generator.state_dict(), tmp_path / "res.pt")
    loaded = load_generator(str(tmp_path / "res.pt")).module
    assert loaded.residual and loaded.base_channels == 4
    legacy = {k: v for k, v in UNetGenerator(base_channels=4).state_dict().items() if k != "_extra_state"}
    torch.save(legacy, tmp_path / "old.pt")  # written before residual outputs existed
    assert not load_generator(str(tmp_path / "old.pt")).module.residual
