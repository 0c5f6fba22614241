"""DB-SMC on diffusers pipelines = ``blend.smc.smc_ancestral_chain`` driven by hand on the same network.

``smc_sample`` runs the pipeline's own ``__call__`` with its scheduler's step replaced; the reference
here calls the denoiser directly -- the blend's guided prediction and the base's (CFG applied by hand),
in k-diffusion's scaling, on the chain of the scheduler's noise levels ending at 0 -- and runs the
pure-torch SMC of ``blend/smc.py`` with the same seed.  Equal particles, weights and resampling steps
mean the adapter reads the pipeline right: latent scaling per scheduler (DDPM: variance-preserving;
Euler ancestral and flow matching: k-diffusion's), the guidance of the base, Flux's packed latents and
the decode the rewards score.
"""

from __future__ import annotations

import math

import pytest
import torch

from dkit import build_case

from diffusion_blend.blend.coefficients import BlendInputError
from diffusion_blend.blend.smc import smc_ancestral_chain
from diffusion_blend.diffusers_host import DiffusionBlend, smc_sample
from diffusion_blend.rewards import get_reward

STEPS, N, SIZE, GUIDANCE = 4, 4, 64, 3.0


@pytest.fixture(scope="module")
def sd15_case(tiny_base, tmp_path_factory):
    return build_case("SD1.5", tiny_base["diffusers"], tmp_path_factory.mktemp("smc_sd15"))


@pytest.fixture(scope="module")
def flux_case(tiny_flux, tmp_path_factory):
    return build_case("Flux", tiny_flux, tmp_path_factory.mktemp("smc_flux"))


def _target(blend):
    from diffusion_blend.blend.coefficients import tilt_reward_weights

    return list(zip(["brightness", "saturation"], tilt_reward_weights(blend.coefficients, blend.alpha_refs)))


def _potential(decode, target):
    fns = [(get_reward(name), w) for name, w in target]

    def log_potential(clean):
        images = decode(clean)
        return sum(w * torch.as_tensor(fn(images, ["a cat"] * images.shape[0])).double() for fn, w in fns)

    return log_potential


def _reference_sd(pipe, blend, latents, levels, seed):
    """The SD1.5 chain by hand: UNet input ``x_k / sqrt(1 + sigma^2)`` (= ``sqrt(abar) x_k``), CFG on
    (uncond, cond) halves for the blend and for the base."""
    positive, negative = pipe.encode_prompt("a cat", "cpu", N, True, "")
    context = torch.cat([negative, positive])
    abar = pipe.scheduler.alphas_cumprod.double()
    sigmas_all = ((1 - abar) / abar).sqrt()

    def denoise(x, sigma):
        t = int((sigmas_all - sigma).abs().argmin())
        scaled = torch.cat([x / math.sqrt(1 + sigma**2)] * 2)
        with blend.capture_base() as base:
            out = pipe.unet(scaled, torch.tensor(t), encoder_hidden_states=context).sample
        guided = [u + GUIDANCE * (c - u) for u, c in (out.chunk(2), base[0].chunk(2))]
        return x - sigma * guided[0], x - sigma * guided[1]

    def decode(clean):
        return (pipe.vae.decode(clean / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    return smc_ancestral_chain(denoise, latents, levels, _potential(decode, _target(blend)),
                               generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
@torch.no_grad()
def test_smc_on_sd_pipelines_is_the_cores_smc(sd15_case, scheduler):
    import diffusers

    pipe = sd15_case.pipe
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    try:
        with DiffusionBlend(pipe, sd15_case.loras, [0.5, 0.5], 2.0) as blend:
            g = torch.Generator().manual_seed(3)
            noise = torch.randn(N, 4, SIZE // 8, SIZE // 8, generator=g)
            pipe.scheduler.set_timesteps(STEPS)
            if scheduler == "DDPMScheduler":  # variance-preserving latents x_T = sqrt(abar_T) x_k
                abar = pipe.scheduler.alphas_cumprod.double()
                levels = [math.sqrt((1 - abar[t]) / abar[t]) for t in pipe.scheduler.timesteps] + [0.0]
                x_k = noise * math.sqrt(1 + levels[0] ** 2)
            else:  # k-diffusion latents (the pipeline scales the noise by init_noise_sigma)
                levels = [float(s) for s in pipe.scheduler.sigmas]
                x_k = noise * pipe.scheduler.init_noise_sigma
            out, log = smc_sample(pipe, "a cat", blend=blend, particles=N, seed=7, num_inference_steps=STEPS,
                                  guidance_scale=GUIDANCE, height=SIZE, width=SIZE, output_type="latent",
                                  latents=noise.clone(), rewards=["brightness", "saturation"])
            reference = _reference_sd(pipe, blend, x_k, levels, seed=7)
    finally:
        pipe.scheduler = original
    assert [s["resampled"] for s in log.steps] == [e.resampled for e in reference.log]
    assert any(s["resampled"] for s in log.steps[:-1])  # the weights matter: resampled before the end
    assert [round(s["ess"], 4) for s in log.steps] == [round(e.ess, 4) for e in reference.log]
    assert torch.allclose(out.images, reference.samples, atol=1e-4, rtol=1e-4)
    assert log.forwards_per_step == pytest.approx(3 * STEPS / STEPS)  # base + two LoRAs, one at a time on the CPU
    assert "p_base exp(" in log.text() and "ESS/N" in log.text()


@torch.no_grad()
def test_smc_on_flux_is_the_cores_smc_on_packed_latents(flux_case):
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    pipe = flux_case.pipe
    with DiffusionBlend(pipe, flux_case.loras, [0.5, 0.5], 2.0) as blend:
        g = torch.Generator().manual_seed(4)
        noise = torch.randn(N, 16, SIZE // 8, SIZE // 8, generator=g)
        packed = FluxPipeline._pack_latents(noise, N, 16, SIZE // 8, SIZE // 8)
        out, log = smc_sample(pipe, "a cat", blend=blend, particles=N, seed=7, num_inference_steps=STEPS,
                              height=SIZE, width=SIZE, output_type="latent", latents=packed.clone(),
                              rewards=["brightness", "saturation"], guidance_scale=3.5)
        # the reference: Flux's conditioning, its shifted sigmas, the transformer called by hand
        prompt_embeds, pooled, text_ids = pipe.encode_prompt("a cat", None, device="cpu", num_images_per_prompt=N)
        image_ids = FluxPipeline._prepare_latent_image_ids(N, SIZE // 16, SIZE // 16, "cpu", torch.float32)
        sched = pipe.scheduler
        mu = calculate_shift(packed.shape[1], sched.config.base_image_seq_len, sched.config.max_image_seq_len,
                             sched.config.base_shift, sched.config.max_shift)
        import numpy as np

        retrieve_timesteps(sched, STEPS, "cpu", sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
        levels = [float(s) for s in sched.sigmas]

        def denoise(x, sigma):
            with blend.capture_base() as base:
                v = pipe.transformer(hidden_states=x, timestep=torch.full((N,), sigma), guidance=torch.full((N,), 3.5),
                                     pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                                     img_ids=image_ids).sample
            return x - sigma * v, x - sigma * base[0]

        def decode(clean):
            latents = FluxPipeline._unpack_latents(clean, SIZE, SIZE, pipe.vae_scale_factor)
            latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            return (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)

        reference = smc_ancestral_chain(denoise, packed, levels, _potential(decode, _target(blend)), flow=True,
                                        generator=torch.Generator().manual_seed(7))
    assert [s["resampled"] for s in log.steps] == [e.resampled for e in reference.log]
    assert [round(s["ess"], 4) for s in log.steps] == [round(e.ess, 4) for e in reference.log]
    assert torch.allclose(out.images, reference.samples, atol=1e-4, rtol=1e-4)


def test_smc_refuses_what_it_cannot_run(sd15_case):
    pipe = sd15_case.pipe  # DDIM: runs (the DDPM posterior between its timesteps)
    with pytest.raises(BlendInputError, match="alpha=None: without a blend the KL weight"):
        smc_sample(pipe, "a cat", rewards={"brightness": 1.0})
    with pytest.raises(BlendInputError, match="rewards: without a blend"):
        smc_sample(pipe, "a cat", alpha=0.1)
    with pytest.raises(BlendInputError, match="not a finite number"):
        smc_sample(pipe, "a cat", rewards={"brightness": 1e308}, alpha=1e-6)
    with pytest.raises(BlendInputError, match="prompt: DB-SMC resamples"):
        smc_sample(pipe, ["a", "b"], rewards={"brightness": 1.0}, alpha=0.1)
    with DiffusionBlend(pipe, sd15_case.loras, [0.5, 0.5]) as blend:
        with pytest.raises(BlendInputError, match="got 1 names for a blend of 2 bases"):
            smc_sample(pipe, "a cat", blend=blend, rewards=["brightness"])
        with pytest.raises(BlendInputError, match="no_such_reward"):
            smc_sample(pipe, "a cat", blend=blend, rewards=["brightness", "no_such_reward"])
    from diffusers import EulerDiscreteScheduler

    original = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        with pytest.raises(BlendInputError, match="DB-SMC runs on DDPMScheduler.*not EulerDiscreteScheduler"):
            smc_sample(pipe, "a cat", rewards={"brightness": 1.0}, alpha=0.1)
    finally:
        pipe.scheduler = original
