import pytest
import torch

from ipsr_model.metrics import (
    cmc,
    cosine_similarity,
    leave_one_out_rank1,
    mcnemar_exact,
    probe_ranks,
    psnr,
    rank1,
    ssim,
    wilson_interval,
)


def test_cosine_similarity_is_chunk_invariant_and_scale_free():
    probes, gallery = torch.randn(37, 16), torch.randn(11, 16)
    full = cosine_similarity(probes, gallery)
    assert torch.allclose(full, cosine_similarity(probes * 3, gallery, chunk_size=5), atol=1e-6)
    assert torch.allclose(full[4, 7], torch.nn.functional.cosine_similarity(probes[4], gallery[7], dim=0), atol=1e-6)


def test_cmc_hand_computed():
    # 3 probes against identities 10, 20, 30; correct identity ranks 1st, 3rd and 2nd.
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.4, 0.5, 0.3]])
    gallery = torch.tensor([10, 20, 30])
    probes = torch.tensor([10, 30, 10])
    curve = cmc(similarity, probes, gallery)
    assert torch.allclose(curve, torch.tensor([1 / 3, 2 / 3, 1.0]))
    assert rank1(similarity, probes, gallery) == pytest.approx(1 / 3)


def test_cmc_ranks_identities_not_images():
    # Identity 2 has two gallery images that both beat identity 1's: the probe of identity 1 is rank 2, not 3.
    similarity = torch.tensor([[0.5, 0.9, 0.8]])
    curve = cmc(similarity, torch.tensor([1]), torch.tensor([1, 2, 2]))
    assert curve.tolist() == [0.0, 1.0]


def test_cmc_is_monotone_and_reaches_one_at_gallery_size():
    torch.manual_seed(0)
    similarity = torch.randn(200, 50)
    labels = torch.arange(50)
    curve = cmc(similarity, torch.randint(50, (200,)), labels)
    assert len(curve) == 50 and (curve[1:] >= curve[:-1]).all() and curve[-1] == 1.0
    assert len(cmc(similarity[:3], labels[:3], labels, max_rank=10)) == 10
    with pytest.raises(ValueError, match="3 probe labels for 200"):
        cmc(similarity, labels[:3], labels)


def test_ties_count_against_the_probe():
    assert rank1(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), torch.tensor([0, 1])) == 0.0


def test_probe_without_gallery_mate_is_an_error():
    with pytest.raises(ValueError, match="no identity in the gallery"):
        cmc(torch.zeros(1, 2), torch.tensor([7]), torch.tensor([0, 1]))


def test_leave_one_out_excludes_the_probe_itself():
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert leave_one_out_rank1(embeddings, torch.tensor([0, 0, 1, 1])) == 1.0
    assert leave_one_out_rank1(embeddings, torch.tensor([0, 1, 0, 1])) == 0.0


def test_psnr_and_ssim():
    torch.manual_seed(0)
    clean = torch.rand(2, 3, 64, 64) * 2 - 1
    noisy = (clean + 0.1 * torch.randn_like(clean)).clamp(-1, 1)
    assert psnr(clean, clean) == float("inf") or psnr(clean, clean) > 80
    assert 20 < psnr(noisy, clean) < 30
    assert ssim(clean, clean) == pytest.approx(1.0, abs=1e-4) and ssim(noisy, clean) < 0.9


def test_probe_ranks_agree_with_the_cmc():
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.4, 0.5, 0.3]])
    gallery, probes = torch.tensor([10, 20, 30]), torch.tensor([10, 30, 10])
    ranks = probe_ranks(similarity, probes, gallery)
    assert ranks.tolist() == [0, 2, 1]
    assert torch.allclose(cmc(similarity, probes, gallery), (ranks[:, None] <= torch.arange(3)).float().mean(0))


def test_wilson_interval_reference_values():
    # By hand: centre (p + z²/2n) / (1 + z²/n) = 0.7344, half-width z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n) = 0.0888.
    low, high = wilson_interval(67, 90)
    assert low == pytest.approx(0.6456, abs=1e-4) and high == pytest.approx(0.8232, abs=2e-4)
    assert wilson_interval(0, 90)[0] == 0.0 and 0 < wilson_interval(0, 90)[1] < 0.05
    assert wilson_interval(90, 90)[1] == pytest.approx(1.0) and wilson_interval(90, 90)[0] > 0.95
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_counts_only_discordant_probes():
    a = torch.tensor([1, 1, 1, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    assert mcnemar_exact(a, b) == (6, 0, pytest.approx(2 / 64))  # 6 discordant, all one way: 2 * 0.5**6
    assert mcnemar_exact(b, a)[2] == pytest.approx(2 / 64)
    only_a, only_b, p = mcnemar_exact(torch.tensor([1, 0, 1, 0]), torch.tensor([0, 1, 0, 1]))
    assert (only_a, only_b, p) == (2, 2, 1.0)
    assert mcnemar_exact(a, a)[2] == 1.0
    # 10 vs 2 discordant: p = 2 * P(X <= 2 | n=12) = 2 * 79 / 4096
    x = torch.tensor([1] * 10 + [0] * 2 + [1] * 5, dtype=torch.bool)
    y = torch.tensor([0] * 10 + [1] * 2 + [1] * 5, dtype=torch.bool)
    assert mcnemar_exact(x, y)[2] == pytest.approx(2 * 79 / 4096)
    with pytest.raises(ValueError, match="shape"):
        mcnemar_exact(a, b[:3])
