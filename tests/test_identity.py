"""The frozen FaceNet identity network, the loss, and a short real training run."""

import pytest
import torch
from facenet_pytorch import fixed_image_standardization
from PIL import Image

from ipsr_model.degradation import MultiScaleDegradation, resize
from ipsr_model.identity import IdentityNet
from ipsr_model.images import square_face, to_tensor
from ipsr_model.losses import IdentityPreservingLoss, random_view
from ipsr_model.metrics import leave_one_out_rank1
from ipsr_model.training import grad_shares, make_optimizer, training_step
from ipsr_model.unet import UNetGenerator


@pytest.fixture(scope="module")
def identity_net():
    return IdentityNet("casia-webface-offline")


@pytest.fixture(scope="module")
def orl(att_faces):
    paths = [(s, att_faces / f"s{s}" / f"{k}.pgm") for s in range(1, 41) for k in range(1, 11)]
    faces = to_tensor([square_face(Image.open(path)) for _, path in paths])
    return faces, torch.tensor([s for s, _ in paths])


def test_leave_one_out_rank1_on_orl(identity_net, orl):
    """A wrong weight mapping scores near chance (1/40); the real CASIA-WebFace FaceNet is near perfect."""
    faces, labels = orl
    with torch.no_grad():
        embeddings = torch.cat([identity_net(chunk) for chunk in faces.split(100)])
    assert embeddings.shape == (400, 512)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(400), atol=1e-4)
    score = leave_one_out_rank1(embeddings, labels)
    print(f"ORL leave-one-out rank-1: {score:.4f}")
    assert score >= 0.97


def test_input_convention_matches_facenet_standardisation(identity_net, orl):
    faces = orl[0][:4]
    pixels = resize((faces + 1) * 127.5, (160, 160))
    with torch.no_grad():
        assert torch.allclose(identity_net(faces), identity_net.net(fixed_image_standardization(pixels)), atol=1e-5)


def test_frozen_but_differentiable_to_its_input(identity_net, orl):
    hr = orl[0][:4]
    generator = UNetGenerator(base_channels=4)
    loss_fn = IdentityPreservingLoss(identity_net, beta=0.0)  # L_embedding alone
    before = {k: v.clone() for k, v in identity_net.state_dict().items()}
    optimizer = make_optimizer(generator)
    terms = training_step(generator, loss_fn, optimizer, hr, MultiScaleDegradation(), torch.Generator().manual_seed(0))
    assert terms.pixel > 0 and torch.equal(terms.total, terms.embedding)
    gradient = sum(p.grad.abs().sum() for p in generator.parameters() if p.grad is not None)
    assert gradient > 0, "L_embedding must reach the generator through the frozen FaceNet"
    assert all(not p.requires_grad and p.grad is None for p in identity_net.parameters())
    identity_net.train()
    assert not identity_net.training and not identity_net.net.training
    after = identity_net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "identity net weights or BN stats changed"


def test_loss_components(identity_net, orl):
    """Per-element MSE by default (the paper's text and code; chosen by measurement); Eq. 2's batch mean of
    per-sample Euclidean distances, cosine and none as options; several identity nets average their terms."""
    hr = orl[0][:2]
    sr = (hr + 0.2 * torch.randn_like(hr)).clamp(-1, 1)
    with torch.no_grad():
        e_sr, e_hr = identity_net(sr), identity_net(hr)
        assert IdentityPreservingLoss(identity_net).embedding_loss == "mse"
        terms = IdentityPreservingLoss(identity_net, beta=5.0, embedding_loss="distance")(sr, hr)
        assert torch.allclose(terms.pixel, ((sr - hr) ** 2).mean())
        assert torch.allclose(terms.embedding, (e_sr - e_hr).norm(dim=1).mean())
        assert torch.allclose(terms.total, terms.embedding + 5.0 * terms.pixel)
        # The old per-element MSE is the squared distance / 512: two orders of magnitude smaller.
        mse = IdentityPreservingLoss(identity_net, embedding_loss="mse")(sr, hr).embedding
        assert torch.allclose(mse, ((e_sr - e_hr) ** 2).mean()) and mse < terms.embedding / 20
        cosine = IdentityPreservingLoss(identity_net, embedding_loss="cosine")(sr, hr).embedding
        assert torch.allclose(cosine, 1 - (e_sr * e_hr).sum(1).mean(), atol=1e-6)
        # Two nets: the mean of their terms; the precomputed HR embeddings belong to the first.
        two = IdentityPreservingLoss([identity_net, identity_net], embedding_loss="mse")
        assert torch.allclose(two(sr, hr).embedding, mse)
        shifted = two(sr, hr, hr_embedding=e_hr + 0.1).embedding
        assert torch.allclose(shifted, (((e_sr - e_hr - 0.1) ** 2).mean() + mse) / 2)
        pixel_only = IdentityPreservingLoss(None, beta=5.0, embedding_loss="none")(sr, hr)
        assert pixel_only.embedding == 0 and torch.allclose(pixel_only.total, 5.0 * terms.pixel)
        assert IdentityPreservingLoss(identity_net)(hr, hr).total == 0
    assert set(terms.as_floats()) == {"total", "embedding", "pixel"}
    with pytest.raises(ValueError, match="beta"):
        IdentityPreservingLoss(identity_net, beta=-1)
    with pytest.raises(ValueError, match="distance, mse, cosine, none"):
        IdentityPreservingLoss(identity_net, embedding_loss="l1")
    with pytest.raises(ValueError, match="needs an identity net"):
        IdentityPreservingLoss(None)


def test_distance_gradient_is_finite_at_a_perfect_reconstruction(identity_net, orl):
    hr = orl[0][:2]
    sr = hr.clone().requires_grad_(True)
    IdentityPreservingLoss(identity_net, embedding_loss="distance")(sr, hr).total.backward()
    assert torch.isfinite(sr.grad).all()


def test_step_splits_the_gradient_and_matches_plain_backward(identity_net, orl):
    """training_step sends d(L_emb)/dSR + d(beta L_pix)/dSR through the generator once: the same parameter update
    as L.backward(), and the two norms say how much each term pushes (Eq. 2: the identity term is alive)."""
    hr = orl[0][:4]
    loss_fn = IdentityPreservingLoss(identity_net, embedding_loss="distance")

    def run(split: bool):
        torch.manual_seed(0)
        generator = UNetGenerator(base_channels=4, residual=True)
        optimizer = torch.optim.SGD(generator.parameters(), lr=0.0)  # gradients only; weights stay
        rng = torch.Generator().manual_seed(0)
        if split:
            stats = training_step(generator, loss_fn, optimizer, hr, MultiScaleDegradation(), rng)
        else:
            generator.train()
            lr, _ = MultiScaleDegradation()(hr, rng)
            stats = loss_fn(generator(lr), hr)
            stats.total.backward()
        return stats, [p.grad.clone() for p in generator.parameters()]

    (split, grads), (plain, reference) = run(True), run(False)
    assert torch.allclose(split.total, plain.total)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads, reference))
    share_embedding, share_pixel = grad_shares(split.grad_embedding, split.grad_pixel)
    assert torch.allclose(share_embedding + share_pixel, torch.tensor(1.0))
    assert share_embedding > 0.5, "with Eq. 2 and beta = 5 the identity term carries most of the gradient"
    old = training_step(
        UNetGenerator(4, residual=True), IdentityPreservingLoss(identity_net, embedding_loss="mse"),
        make_optimizer(UNetGenerator(4)), hr, MultiScaleDegradation(), torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert grad_shares(old.grad_embedding, old.grad_pixel)[0] < share_embedding / 2, "per-element MSE starves it"


def test_view_jitter_gives_pairs_one_view_and_keeps_identity(identity_net, orl):
    faces = orl[0][::40][:8]
    torch.manual_seed(0)
    sr_view, hr_view = random_view(0.05, faces, faces.clone())
    assert torch.equal(sr_view, hr_view) and not torch.equal(sr_view, faces)
    with torch.no_grad():
        similarity = (identity_net(sr_view) * identity_net(faces)).sum(1)
    assert similarity.min() > 0.7, similarity  # a small change of view, not a different face
    with torch.no_grad():
        jittered = IdentityPreservingLoss(identity_net, embedding_loss="distance", jitter=0.05)(faces, faces)
    assert jittered.embedding == 0  # the same view of identical faces
    with pytest.raises(ValueError, match="jitter"):
        IdentityPreservingLoss(identity_net, jitter=0.6)


@pytest.mark.slow
def test_short_cpu_training_decreases_the_loss(identity_net, orl):
    """Tiny U-Net, a handful of real faces, 30 steps: the objective goes down."""
    torch.manual_seed(0)
    faces = orl[0][::25]  # 16 faces of 16 people
    generator = UNetGenerator(base_channels=8)
    loss_fn, optimizer = IdentityPreservingLoss(identity_net, embedding_loss="distance"), make_optimizer(generator)
    degradation, rng = MultiScaleDegradation(), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        batch = faces[torch.randint(len(faces), (8,), generator=rng)]
        losses.append(training_step(generator, loss_fn, optimizer, batch, degradation, rng).total.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss {first:.4f} -> {last:.4f}")
    assert last < 0.85 * first  # measured 2.74 -> 2.07 (Eq. 2: the identity distance falls slower than pixels)
