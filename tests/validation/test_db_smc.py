"""DB-SMC on the report's mixture problem: where the blend's Jensen gap is large (weak alignment,
lambda = 1/4), correcting the blend toward the exact tilt by SMC removes most of it.

Measured over five seeds at n = 4096 (128 groups of N = 32 particles, 50 steps): DB 0.21-0.26 of the
alignment gain, DB-SMC 0.037-0.083.  The bounds leave room for that spread and fail when the
weights are dropped (DB-SMC is then DB with resampling noise) or the increments are wrong."""

import torch

from diffusion_blend.training.sampler import DDIMSchedule
from diffusion_blend.validation.gmm import expected_reward, tilt
from diffusion_blend.validation.methods import exact_model, sample_db, sample_db_smc, weighted_error
from diffusion_blend.validation.problems import mixture_problem


def test_db_smc_closes_most_of_the_jensen_gap():
    base, rewards, alpha_refs = mixture_problem(8)
    rewards, alpha_refs = rewards[:2], alpha_refs[:2]
    schedule = DDIMSchedule.stable_diffusion(50, steps_offset=0)
    exact_base = exact_model(base, schedule)
    bases = [exact_model(tilt(base, [r], [1.0], a), schedule) for r, a in zip(rewards, alpha_refs)]
    w, lam = [0.25, 0.75], 0.25
    alpha = sum(x * a for x, a in zip(w, alpha_refs)) / lam
    target = tilt(base, rewards, w, alpha)
    e_target = [expected_reward(target, r) for r in rewards]
    e_base = [expected_reward(base, r) for r in rewards]
    g = torch.Generator().manual_seed(0)

    def error(xs):
        return weighted_error(w, [float(r(xs).mean()) for r in rewards], e_target, e_base)

    db = error(sample_db(w, alpha_refs, lam, exact_base, bases, schedule, 4096, 8, g))
    smc = error(sample_db_smc(w, alpha_refs, lam, exact_base, bases, schedule, 4096, 8, g, rewards, particles=32))
    assert db > 0.18, db  # the gap is there
    assert smc < 0.12 and smc < db / 2, (smc, db)
