"""How sure a measured accuracy is: 95% intervals for the toy's evaluations (tinyavl/toy/evaluate.py), each
with its formula's source.

    wilson_interval            a share of independent answers
    clustered_wilson_interval  a share of answers that come in clusters that can fail together (a scene's
                               prompts, a caption's objects)
    paired_ratio_interval      one accuracy over another on the same prompts (a policy's "of full")
"""
import math

import torch

Z95 = 1.959964  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(right: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion right / n (Wilson, JASA 1927). Unlike p +- z se it
    stays inside [0, 1] and keeps a width at 0 or n right, where a policy's accuracy often sits. n may be
    an effective sample size, not a whole number (`clustered_wilson_interval`)."""
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clustered_wilson_interval(right: list[int], asked: list[int], z: float = Z95) -> tuple[float, float]:
    """The 95% interval of sum(right) / sum(asked) when the answers come in clusters that can go right or
    wrong together: right[i] of asked[i] prompts about scene i (a scene the model misreads can fail several of
    its prompts at once). Wilson's interval at the effective sample size
    N / deff (Kish, Survey Sampling, 1965), where the design effect deff is the variance of the accuracy
    estimated from the spread between clusters, over the variance N independent prompts would give.
    deff is at least 1: the interval is never narrower than independent prompts' (`wilson_interval`).
    Where every prompt went right (or every one wrong), or there is one cluster, no spread can be measured; the
    clusters may then be all-or-nothing, each worth one answer, so the interval is Wilson's at the number of
    clusters, the effective size of clusters whose prompts always agree. (So one miss can narrow the
    interval: it measures a spread, which may be small.)"""
    n_clusters, n = len(asked), sum(asked)
    p = sum(right) / n
    if n_clusters < 2 or p in (0, 1):
        # Wilson's at n here took the clusters' answers as independent: in simulated all-or-nothing captions
        # at a true share of 0.015 it held the truth in 73% of runs, not 95%.
        return wilson_interval(p * n_clusters, n_clusters, z)
    # The ratio estimator's variance between clusters, with the small-sample factor m / (m - 1) over the m
    # clusters (Kish 6.3), against p (1 - p) / n for n independent prompts: so one-prompt clusters give an
    # effective n of n - 1, a hair wider than Wilson's, never narrower.
    mean_size = n / n_clusters
    between = sum(((r - p * a) / mean_size) ** 2 for r, a in zip(right, asked)) / (n_clusters * (n_clusters - 1))
    deff = max(1.0, between / (p * (1 - p) / n))
    return wilson_interval(p * n / deff, n / deff, z)


def paired_ratio_interval(right: list[int], reference_right: list[int], draws: int = 4000,
                          seed: int = 0) -> tuple[float, float]:
    """The 95% interval of sum(right) / sum(reference_right), a policy's accuracy over another row's on the
    same prompts (full attention's: the table's "of full"; `random`'s at the same budget: budget_sweep's
    "of_random"), right[i] and reference_right[i] the prompts about scene i each got right: a paired
    bootstrap (Efron and Tibshirani, An Introduction to the Bootstrap, 1993) that draws scenes with
    replacement, both counts of a scene together, and takes the 2.5 and 97.5 percentiles of the ratio.
    Seeded: one answer. At least two scenes: one has nothing to resample (an interval of no width)."""
    if len(right) != len(reference_right):
        raise ValueError(f"paired_ratio_interval pairs scenes: {len(right)} counts against {len(reference_right)}")
    if len(right) < 2:
        raise ValueError(f"paired_ratio_interval resamples scenes: it needs two or more, got {len(right)}")
    right = torch.tensor(right, dtype=torch.float64)                                # (scenes,)
    reference_right = torch.tensor(reference_right, dtype=torch.float64)            # (scenes,)
    # (draws, scenes): the scenes each draw takes
    scenes = torch.randint(len(right), (draws, len(right)), generator=torch.Generator().manual_seed(seed))
    reference_sums = reference_right[scenes].sum(1)                                 # (draws,)
    # A draw in which the reference got nothing right has no ratio (a few scenes at most): left out.
    ratios = (right[scenes].sum(1) / reference_sums).masked_fill(reference_sums == 0, float("nan"))  # (draws,)
    return float(ratios.nanquantile(0.025)), float(ratios.nanquantile(0.975))
