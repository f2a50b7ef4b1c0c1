"""Identification metrics: cosine similarity, CMC, rank-1, their confidence intervals and paired tests, and image
quality (PSNR/SSIM)."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def cosine_similarity(probes: torch.Tensor, gallery: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """[P, D] x [G, D] -> [P, G] cosine similarities, computed in probe chunks on the inputs' device."""
    gallery = F.normalize(gallery.float(), dim=1)
    chunks = [F.normalize(chunk.float(), dim=1) @ gallery.T for chunk in probes.split(chunk_size)]
    return torch.cat(chunks) if chunks else probes.new_zeros((0, gallery.shape[0]))


def probe_ranks(similarity: torch.Tensor, probe_labels: torch.Tensor, gallery_labels: torch.Tensor) -> torch.Tensor:
    """[P] rank (0 = best) of each probe's true identity among the gallery identities.

    Ranks are over identities: a gallery identity scores its best image. Ties count against the probe. Every
    probe identity must be in the gallery.
    """
    if similarity.shape != (len(probe_labels), len(gallery_labels)):
        raise ValueError(
            f"{len(probe_labels)} probe labels for {similarity.shape[0]} similarity rows and "
            f"{len(gallery_labels)} gallery labels for {similarity.shape[1]} columns"
        )
    identities, gallery_index = gallery_labels.unique(return_inverse=True)
    missing = ~torch.isin(probe_labels, identities)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} probe(s) have no identity in the gallery")
    index = gallery_index.to(similarity.device).expand_as(similarity)
    per_identity = similarity.new_full((similarity.shape[0], len(identities)), float("-inf"))
    per_identity.scatter_reduce_(1, index, similarity, reduce="amax")
    correct = torch.searchsorted(identities, probe_labels).to(similarity.device)
    correct_score = per_identity.gather(1, correct[:, None])
    # Rank 0 = best; every other identity scoring at least as high pushes the probe down.
    return ((per_identity >= correct_score).sum(1) - 1).cpu()


def cmc(
    similarity: torch.Tensor, probe_labels: torch.Tensor, gallery_labels: torch.Tensor, max_rank: int | None = None
) -> torch.Tensor:
    """Cumulative match characteristic: entry k-1 is the fraction of probes whose identity is in the top k."""
    n_identities = len(gallery_labels.unique())
    max_rank = n_identities if max_rank is None else min(max_rank, n_identities)
    return cmc_from_ranks(probe_ranks(similarity, probe_labels, gallery_labels), max_rank)


def cmc_from_ranks(ranks: torch.Tensor, max_rank: int) -> torch.Tensor:
    """The CMC of per-probe ranks (``probe_ranks``) up to ``max_rank``."""
    return (ranks[:, None] < torch.arange(1, max_rank + 1)[None, :]).float().mean(0)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (z = 1.96) Wilson score interval of a proportion hits / n; stays inside [0, 1] at 0 and n."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, float]:
    """Exact two-sided McNemar test of two paired per-probe hit vectors (same probes, same order).

    Returns (probes only ``a`` gets right, probes only ``b`` gets right, p-value): under H0 each discordant
    probe is equally likely to favour either method, so p = P(Binomial(n, 1/2) at least as far from n/2).
    """
    if a.shape != b.shape:
        raise ValueError(f"paired hit vectors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    only_a, only_b = int((a.bool() & ~b.bool()).sum()), int((~a.bool() & b.bool()).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return only_a, only_b, min(1.0, 2.0 * tail)


def rank1(similarity: torch.Tensor, probe_labels: torch.Tensor, gallery_labels: torch.Tensor) -> float:
    return float(cmc(similarity, probe_labels, gallery_labels, max_rank=1)[0])


def leave_one_out_rank1(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Each image is a probe against all the others (its identity needs at least one other image)."""
    similarity = cosine_similarity(embeddings, embeddings)
    similarity.fill_diagonal_(float("-inf"))
    return rank1(similarity, labels, labels)


def fidelity(images: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: PSNR in dB and SSIM against ``reference`` ([-1, 1] NCHW), both [N]."""
    images, reference = images.float(), reference.float()
    per_image = peak_signal_noise_ratio(images, reference, data_range=2.0, reduction="none", dim=(1, 2, 3))
    similarity = structural_similarity_index_measure(images, reference, data_range=2.0, reduction="none")
    return per_image, cast(torch.Tensor, similarity)  # a tuple only with return_full_image


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for [-1, 1] images."""
    return float(peak_signal_noise_ratio(images.float(), reference.float(), data_range=2.0))


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    return float(
        cast(torch.Tensor, structural_similarity_index_measure(images.float(), reference.float(), data_range=2.0))
    )
