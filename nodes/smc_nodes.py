"""ComfyUI nodes for the SMC-corrected blend: ``DiffusionBlendSMCSampler`` (a SAMPLER for
``SamplerCustom``/``SamplerCustomAdvanced``) and ``DiffusionBlendSMCReport`` (its ESS log as text).

The sampler runs ComfyUI's ancestral chain (``euler_ancestral``: DDPM / DDIM eta = 1 for eps and v
models, the rectified-flow form for flow models) with the latent batch as particles, and corrects the
blend toward the exact tilted target ``p_base · exp(R / alpha)`` with :func:`blend.smc.smc_ancestral_chain`.
The maths lives in ``blend/smc.py``; this module only wires ComfyUI's guider, VAE and rewards to it
(:func:`smc_sampler`, :func:`smc_report`), and declares the two V3 nodes.
"""

from __future__ import annotations

import logging
import math
import time

import torch

import comfy.k_diffusion.sampling
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers

from ..blend.coefficients import BlendInputError, tilt_reward_weights
from ..blend.smc import RESAMPLING_SCHEMES, SMCLog, describe_target, smc_ancestral_chain
from ..rewards import REWARDS, UnknownRewardError, check_reward_name
from .comfy_wrapper import TAP_KEY, BaseTap, BlendWrapper
from .schema import check_choices, io
from .tool_nodes import _reward_fn, _reward_path

CATEGORY = "diffusion_blend"


def _parse_rewards(text: str) -> list[tuple[str, float | None]]:
    """``"brightness:1, saturation:0.5"`` -> ``[("brightness", 1.0), ("saturation", 0.5)]`` (commas or
    new lines separate entries; ``:weight`` is optional)."""
    entries = []
    for raw in text.replace("\n", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        name, _, weight = item.partition(":")
        name = name.strip()
        try:
            check_reward_name(name)
        except UnknownRewardError as e:
            raise BlendInputError(f"rewards: {e}") from None
        if weight.strip():
            try:
                value = float(weight)
            except ValueError:
                raise BlendInputError(f"rewards: {item!r} has weight {weight.strip()!r}; expected a number "
                                      "(e.g. 'brightness:0.5')") from None
            if not math.isfinite(value):
                raise BlendInputError(f"rewards: {item!r}: expected a finite weight")
            entries.append((name, value))
        else:
            entries.append((name, None))
    return entries


def blend_of(model_options: dict) -> BlendWrapper | None:
    """The Diffusion Blend wrapper a sampling run's model options carry, if any."""
    wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                                                        model_options, is_model_options=True)
    blends = [w for w in wrappers if isinstance(w, BlendWrapper)]
    return blends[0] if blends else None


def tilt_target(blend: BlendWrapper | None, rewards: str, alpha: float) -> list[tuple[str, float]]:
    """``[(reward name, weight of its raw value in log phi_0 = R / alpha), ...]``.

    With a blend the target is the blend's own: ``R / alpha = sum_i (c_i / alpha_ref_i) r_i``, the
    rewards read from the LoRAs' ``db.reward`` (``rewards`` may rename them, one per basis).  Without
    one it is ``sum_j w_j r_j / alpha`` for ``rewards = "name:w_j, ..."`` (reward-guided SMC on the
    base)."""
    entries = _parse_rewards(rewards)
    if blend is not None:
        if alpha != 0.0:
            raise BlendInputError(f"alpha={alpha}: leave it 0 with a blended model; the target is the blend's "
                                  "(set kl_scale on the Diffusion Blend node)")
        if any(w is not None for _, w in entries):
            raise BlendInputError("rewards: with a blended model give names only (one per basis); the weights are "
                                  "the blend's")
        names = [n for n, _ in entries] or list(blend.rewards)
        if len(names) != len(blend.coefficients):
            raise BlendInputError(f"rewards: got {len(names)} names for a blend of {len(blend.coefficients)} bases; "
                                  "expected one per basis, in the order of the Basis nodes")
        for i, name in enumerate(names):
            if name is None:
                raise BlendInputError(f"rewards: basis {i + 1} has no db.reward metadata; name its reward in "
                                      "'rewards' (one per basis, comma separated)")
            try:
                check_reward_name(name)
            except UnknownRewardError as e:
                raise BlendInputError(f"rewards: basis {i + 1} was trained on {name!r}, which the registry does "
                                      f"not know ({e}); name a registered reward in 'rewards'") from None
        return list(zip(names, tilt_reward_weights(blend.coefficients, blend.alpha_refs)))
    if not entries:
        raise BlendInputError("rewards: the model carries no Diffusion Blend, so name the rewards to steer "
                              "toward, e.g. 'brightness:1, saturation:0.5'")
    if not alpha > 0:
        raise BlendInputError(f"alpha={alpha}: without a Diffusion Blend the KL weight of the target "
                              "p_base exp(R / alpha) must be > 0")
    target = [(name, (1.0 if w is None else w) / alpha) for name, w in entries]
    for name, weight in target:
        if not math.isfinite(weight):
            raise BlendInputError(f"rewards: {name}: its weight / alpha = {weight} is not a finite number; use a "
                                  "smaller weight or a larger alpha")
    return target


def guided_pair(model, extra_args: dict, blend: BlendWrapper | None):
    """``(denoise, tap)``: ``denoise(x, sigma) -> (guided blend prediction, guided base prediction)``
    from the sampler's guided ``model`` (CFG and every guider hook included).  The first call runs the
    blend and records the base's outputs; the second replays them through the guider (no network
    forward).  Without a blend the proposal is the base: one call."""
    tap = BaseTap()
    model_options = extra_args.get("model_options", {})
    tapped_options = dict(model_options)
    tapped_options["transformer_options"] = {**model_options.get("transformer_options", {}), TAP_KEY: tap}
    tapped_args = {**extra_args, "model_options": tapped_options}

    def denoise(x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = x.new_ones([x.shape[0]]) * sigma
        if blend is None:
            out = model(x, sigmas, **extra_args)
            return out, out
        tap.record()
        blended = model(x, sigmas, **tapped_args)
        tap.replay()
        base = model(x, sigmas, **tapped_args)
        tap.finish()
        return blended, base

    return denoise, tap


def sampler_function(vae, rewards: str, alpha: float, prompt: str, score_every: int, resample_below: float,
                     eta: float, log: SMCLog, potential_on: str = "blend", temper: bool = True,
                     resampling: str = "systematic", adaptive_ess: float = 0.0, moves: int = 0,
                     move_step: float = 0.5):
    """The ``sampler_function`` of a ``comfy.samplers.KSAMPLER``."""

    @torch.no_grad()
    def sample_diffusion_blend_smc(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = dict(extra_args or {})
        latent = getattr(model, "latent_image", None)
        if latent is not None and latent.shape[0] > 1 and not bool((latent == latent[:1]).all()):
            raise BlendInputError("latent_image: the SMC sampler resamples the batch as particles of one chain, "
                                  "so every latent of the batch must be the same (an empty latent, or one image "
                                  "repeated); sample different images in separate runs")
        model_options = extra_args.get("model_options", {})
        blend = blend_of(model_options)
        target = tilt_target(blend, rewards, alpha)
        functions = [(_reward_fn(name, _reward_path(name, "")), weight) for name, weight in target if weight != 0]
        guider = model.inner_model
        base_model = guider.inner_model
        flow = isinstance(base_model.model_sampling, comfy.model_sampling.CONST)
        denoise, tap = guided_pair(model, extra_args, blend)

        timing = {"seconds": 0.0, "calls": 0}

        def log_potential(clean):
            if not functions:  # nothing tilts (kl_scale 0, or zero weights): no decode
                return torch.zeros(clean.shape[0], dtype=torch.float64)
            start = time.perf_counter()
            images = vae.decode(base_model.process_latent_out(clean))
            images = images.reshape(-1, *images.shape[-3:])[..., :3].movedim(-1, 1).float()
            prompts = [prompt] * images.shape[0]
            total = torch.zeros(images.shape[0], dtype=torch.float64)
            for fn, weight in functions:
                total += weight * torch.as_tensor(fn(images, prompts)).detach().double().cpu().reshape(-1)
            # decoding may have moved the sampling models off the device: bring them back
            comfy.model_management.load_models_gpu(getattr(guider, "loaded_models", []) or [])
            timing["seconds"] += time.perf_counter() - start
            timing["calls"] += 1
            return total

        def step_callback(i, x_next, denoised):
            if callback is not None:
                callback({"x": x_next, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})

        generator = torch.Generator().manual_seed(int(extra_args.get("seed") or 0))
        # the transition noise is the host's own ancestral noise (its seed rule changed in v0.16+: CPU seed + 1)
        host_noise = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
        result = smc_ancestral_chain(denoise, x, sigmas, log_potential, eta=eta, flow=flow, score_every=score_every,
                                     resample_below=resample_below,
                                     potential_on="proposal" if potential_on == "blend" else "base",
                                     temper=("adaptive" if adaptive_ess > 0 else "signal") if temper else "none",
                                     ess_target=adaptive_ess if adaptive_ess > 0 else 0.5, resampling=resampling,
                                     moves=moves, move_step=move_step, generator=generator,
                                     transition_noise=host_noise, callback=step_callback)
        log.fill(result, describe_target(target), tap.forwards if blend is not None else None, timing["seconds"],
                 timing["calls"])
        logging.info("[Diffusion Blend] SMC: %d particles, ESS/N per step %s, resampled at %s", log.particles,
                     [round(s["ess_fraction"], 3) for s in log.steps],
                     [s["step"] for s in log.steps if s["resampled"]])
        return result.samples

    return sample_diffusion_blend_smc


POTENTIAL_ON = ("blend", "base")
SMC_LOG = io.Custom("DB_SMC_LOG")  #: a :class:`blend.smc.SMCLog`, filled when the sampler runs


def smc_sampler(vae, score_every: int, resample_below: float, eta: float, rewards: str = "",
                alpha: float = 0.0, prompt: str = "", potential_on: str = "blend", temper: bool = True,
                resampling: str = "systematic", adaptive_ess: float = 0.0, moves: int = 0,
                move_step: float = 0.5) -> tuple[comfy.samplers.KSAMPLER, SMCLog]:
    """``(sampler, log)``: a ComfyUI SAMPLER running the SMC-corrected chain, and the log it fills.
    Every input is checked now, the target once the sampler sees the model."""
    if score_every < 1:
        raise BlendInputError(f"score_every={score_every}: expected an integer >= 1")
    if not 0.0 <= resample_below <= 1.0:
        raise BlendInputError(f"resample_below={resample_below}: expected a fraction of N in [0, 1]")
    if not 0.0 < eta <= 1.0:
        raise BlendInputError(f"eta={eta}: expected 0 < eta <= 1 (a deterministic step has no density ratio)")
    if potential_on not in POTENTIAL_ON:
        raise BlendInputError(f"potential_on={potential_on!r}: expected 'blend' or 'base'")
    if resampling not in RESAMPLING_SCHEMES:
        raise BlendInputError(f"resampling={resampling!r}: expected one of {', '.join(RESAMPLING_SCHEMES)}")
    if not 0.0 <= adaptive_ess < 1.0:
        raise BlendInputError(f"adaptive_ess={adaptive_ess}: expected 0 (signal-fraction tempering) or a "
                              "fraction of N in (0, 1)")
    if not 0 <= int(moves) <= 16 or int(moves) != moves:
        raise BlendInputError(f"moves={moves}: expected an integer from 0 to 16")
    if not 0.0 < move_step <= 1.0:
        raise BlendInputError(f"move_step={move_step}: expected 0 < step <= 1")
    entries = _parse_rewards(rewards)  # names are checked now, the rest when the model is known
    for name, _ in entries:
        _reward_path(name, "")
    log = SMCLog()
    function = sampler_function(vae, rewards, float(alpha), prompt, int(score_every), float(resample_below),
                                float(eta), log, potential_on, bool(temper), resampling, float(adaptive_ess),
                                int(moves), float(move_step))
    return comfy.samplers.KSAMPLER(function), log


def smc_report(smc_log: SMCLog) -> tuple[str, dict]:
    """``(text, ui)``: what a finished SMC run did, as text and as the node's UI payload."""
    if smc_log.runs == 0:
        raise BlendInputError("smc_log: its sampler has not run; connect samples to the output of the "
                              "SamplerCustom that uses it")
    text = smc_log.text()
    return text, {"text": [text], "ess": [s["ess_fraction"] for s in smc_log.steps],
                  "resampled": [s["step"] for s in smc_log.steps if s["resampled"]],
                  "lineages": [s.get("lineages") for s in smc_log.steps],
                  "acceptance": [s.get("acceptance") for s in smc_log.steps],
                  "log_z": [smc_log.log_z]}


class DiffusionBlendSMCSampler(io.ComfyNode):
    """SAMPLER: the blend as a proposal, corrected by SMC toward the exact tilted target."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionBlendSMCSampler",
            display_name="Diffusion Blend SMC Sampler",
            category=CATEGORY,
            description=("Diffusion Blend SMC: sequential Monte Carlo with the blend as the proposal, toward the "
                         "exact target p_base exp(R/alpha). Use a batch of N latents as N particles; without a "
                         "blend it is reward-guided SMC on the base model."),
            inputs=[
                io.Vae.Input("vae", tooltip="Decodes the predicted clean images the rewards score."),
                io.Int.Input("score_every", default=1, min=1, max=1000, tooltip=(
                    "Score the predicted clean image every k steps (the last step is always scored). Larger k: "
                    "fewer VAE decodes, later resampling.")),
                io.Float.Input("resample_below", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Resample the particles when ESS/N falls below this."),
                io.Float.Input("eta", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=(
                    "Noise of the ancestral steps; 1 is the DDPM / DDIM eta=1 chain the LoRAs were trained on.")),
                io.String.Input("rewards", default="", multiline=False, optional=True, tooltip=(
                    "Blended model: empty reads each LoRA's db.reward, or one reward name per basis. Plain model: "
                    f"'name:weight, ...' to steer toward. Known: {', '.join(sorted(REWARDS))}.")),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1e6, step=1e-5, round=False, optional=True,
                               tooltip=("Plain model only: the KL weight of the target p_base exp(R/alpha). "
                                        "Leave 0 with a blend (its target is used).")),
                io.String.Input("prompt", default="", multiline=False, optional=True,
                                tooltip="Prompt for text-conditioned rewards (CLIP score, PickScore, ...)."),
                io.Combo.Input("potential_on", options=list(POTENTIAL_ON), default="blend", optional=True, tooltip=(
                    "Score the blend's or the base's predicted clean image between steps. The target is the "
                    "same either way; it decides when particles are resampled.")),
                io.Boolean.Input("temper", default=True, optional=True, tooltip=(
                    "Scale the in-between potentials by the signal fraction (0 at pure noise, 1 at the end): "
                    "resample less on blurry early predictions. The target is the same.")),
                io.Combo.Input("resampling", options=list(RESAMPLING_SCHEMES), default="systematic", optional=True,
                               tooltip=("How particles are resampled: systematic (lowest variance), residual, or "
                                        "multinomial. The target is the same.")),
                io.Float.Input("adaptive_ess", default=0.0, min=0.0, max=0.99, step=0.01, optional=True, tooltip=(
                    "With temper on: 0 tempers by the signal fraction; a value in (0, 1) raises the potential's "
                    "exponent step by step as far as keeps this conditional ESS/N. The last step always weights "
                    "by the full reward.")),
                io.Int.Input("moves", default=0, min=0, max=16, optional=True, tooltip=(
                    "Metropolis-Hastings moves per particle after each resampling (rejuvenate duplicated "
                    "particles; the target is kept). Each move costs one blend + base evaluation and one "
                    "scoring.")),
                io.Float.Input("move_step", default=0.5, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="Size of a move on the last step's noise (pCN: 1 redraws it)."),
            ],
            outputs=[
                io.Sampler.Output(display_name="sampler", tooltip=(
                    "For SamplerCustom / SamplerCustomAdvanced: the latent batch is the particle system; the "
                    "result is equally weighted (resampled once more at the end).")),
                SMC_LOG.Output(display_name="smc_log", tooltip=(
                    "Filled when the sampler runs; show it with a Diffusion Blend SMC Report node.")),
            ],
        )

    @classmethod
    def validate_inputs(cls, potential_on: str | None = None, resampling: str | None = None) -> bool | str:
        return check_choices(potential_on=(potential_on, POTENTIAL_ON), resampling=(resampling, RESAMPLING_SCHEMES))

    @classmethod
    def execute(cls, vae, score_every: int, resample_below: float, eta: float, rewards: str = "",
                alpha: float = 0.0, prompt: str = "", potential_on: str = "blend", temper: bool = True,
                resampling: str = "systematic", adaptive_ess: float = 0.0, moves: int = 0,
                move_step: float = 0.5) -> io.NodeOutput:
        return io.NodeOutput(*smc_sampler(vae, score_every, resample_below, eta, rewards, alpha, prompt,
                                          potential_on, temper, resampling, adaptive_ess, moves, move_step))


class DiffusionBlendSMCReport(io.ComfyNode):
    """Show what an SMC sampler did: ESS per step, resampling steps, log Z."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionBlendSMCReport",
            display_name="Diffusion Blend SMC Report",
            category=CATEGORY,
            description="The ESS log of a Diffusion Blend SMC run.",
            is_output_node=True,
            inputs=[
                SMC_LOG.Input("smc_log", tooltip="From a Diffusion Blend SMC Sampler node."),
                io.Latent.Input("samples", tooltip="The sampler's output: the report waits for it."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip=(
                "The ESS per step, the resampling steps and the log Z estimate, as text."))],
        )

    @classmethod
    def execute(cls, smc_log: SMCLog, samples) -> io.NodeOutput:
        text, ui = smc_report(smc_log)
        return io.NodeOutput(text, ui=ui)


NODES: list[type[io.ComfyNode]] = [DiffusionBlendSMCSampler, DiffusionBlendSMCReport]
