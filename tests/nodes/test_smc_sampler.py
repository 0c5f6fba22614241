"""The SMC sampler node in-process, inside ComfyUI's own sampling (``comfy.sample.sample_custom``):
it is ComfyUI's ``euler_ancestral`` when nothing tilts, its base prediction is the guided base's,
its cost is the blend's forwards (+1 only when the blend does not evaluate the base), and its
inputs are checked with messages that name them."""

import pytest
import torch

import tiny_fixtures

from diffusion_blend.blend.coefficients import BlendInputError

STEPS = 4


@pytest.fixture(scope="module")
def smc_setup(comfy_checkpoint, diffusers_unet, tmp_path_factory):
    import comfy.samplers
    import folder_paths

    d = tmp_path_factory.mktemp("smc_loras")
    for name, seed, reward in (("smc_b0.safetensors", 31, "brightness"), ("smc_b1.safetensors", 32, "saturation"),
                               ("smc_unregistered.safetensors", 33, None)):
        tiny_fixtures.make_basis_lora(diffusers_unet, d / name, seed=seed, alpha_ref=0.05,
                                      **({"reward": reward} if reward else {}))
    folder_paths.add_model_folder_path("loras", str(d))
    model, clip, vae = comfy_checkpoint
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red cube"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    return {"model": model, "vae": vae, "pos": pos, "neg": neg, "sigmas": sigmas}


def _blend(model, kl_scale, mode="exact", names=("smc_b0.safetensors", "smc_b1.safetensors"), weights=(1.0, 1.0)):
    from diffusion_blend.nodes.blend_nodes import add_basis, blend_model

    basis = None
    for name, w in zip(names, weights):
        basis = add_basis(name, w, 0.0, basis)
    return blend_model(model, basis, kl_scale, True, mode, merge_static=True)


def _sample(s, model, sampler, batch=4, cfg=3.0, seed=5):
    import comfy.sample

    noise = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample_custom(model, noise, cfg, sampler, s["sigmas"], s["pos"], s["neg"],
                                      torch.zeros(batch, 4, 8, 8), seed=seed)


def _smc(s, **kw):
    from diffusion_blend.nodes.smc_nodes import smc_sampler

    args = dict(score_every=1, resample_below=0.5, eta=1.0)
    args.update(kw)
    return smc_sampler(s["vae"], **args)


def test_untilted_smc_on_the_base_is_comfys_euler_ancestral(smc_setup):
    """Zero reward weight: every weight stays 1, no particle is resampled (systematic resampling of
    equal weights is the identity), so the chain must be ComfyUI's own ancestral sampler, same seed."""
    import comfy.samplers

    s = smc_setup
    sampler, log = _smc(s, rewards="brightness:0", alpha=1.0)
    ours = _sample(s, s["model"], sampler)
    stock = _sample(s, s["model"], comfy.samplers.ksampler("euler_ancestral", {"eta": 1.0, "s_noise": 1.0}))
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5 * float(stock.abs().max()))
    assert [e["ess_fraction"] for e in log.steps] == pytest.approx([1.0] * (STEPS + 1))
    assert [e["step"] for e in log.steps if e["resampled"]] == [STEPS]  # only the final, forced one
    assert log.scorings == 0  # a zero weight is never decoded and scored


def _probe(sink, blend=None, pair=False):
    """A KSAMPLER function that records the guided prediction(s) at the first sigma and returns x."""
    import comfy.samplers

    from diffusion_blend.nodes.smc_nodes import blend_of, guided_pair

    def probe(model, x, sigmas, extra_args=None, callback=None, disable=None):
        if pair:
            denoise, tap = guided_pair(model, extra_args, blend_of(extra_args["model_options"]))
            sink["pair"], sink["tap"] = denoise(x, float(sigmas[0])), tap
        else:
            sink["out"] = model(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)
        return x

    return comfy.samplers.KSAMPLER(probe)


def _count_forwards(model):
    calls = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("kl_scale,mode,extra", [(0.5, "exact", 0), (1.0, "exact", 1), (0.5, "merged", 1)])
def test_the_guided_pair_is_the_guided_blend_and_base_at_the_blends_cost(smc_setup, kl_scale, mode, extra):
    """Blend and base predictions under CFG 3 equal the blended model's and the plain model's guided
    predictions; the network runs as often as for the blend alone, plus one model per call only when
    the blend does not evaluate the base (lambda * sum w~ = 1, or merged mode).  Such a blend is
    merged into the weights at load (like the stock LoRA loader), so its base prediction is the
    merged weights minus the merged terms: equal to float32 round-off, not bit for bit."""
    s = smc_setup
    blended = _blend(s["model"], kl_scale, mode)
    got, want_blend, want_base = {}, {}, {}
    calls, handle = _count_forwards(s["model"])
    try:
        _sample(s, blended, _probe(want_blend))
        blend_forwards = len(calls)
        calls.clear()
        _sample(s, s["model"], _probe(want_base))
        base_forwards = len(calls)
        calls.clear()
        _sample(s, blended, _probe(got, pair=True))
        pair_forwards = len(calls)
    finally:
        handle.remove()
    blend_out, base_out = got["pair"]
    assert torch.equal(blend_out, want_blend["out"])
    if extra:  # the blend is merged into the weights at load; its base is those weights minus the merged terms
        scale = want_base["out"].abs().max().item()
        assert (base_out - want_base["out"]).abs().max().item() <= 1e-5 * scale
    else:
        assert torch.equal(base_out, want_base["out"])
    assert not torch.equal(blend_out, base_out)
    assert pair_forwards == blend_forwards + extra * base_forwards
    assert got["tap"].forwards == pair_forwards


def test_the_smc_sampler_runs_a_blend_and_logs_ess(smc_setup):
    from diffusion_blend.nodes.smc_nodes import smc_report

    s = smc_setup
    sampler, log = _smc(s, score_every=2)
    out = _sample(s, _blend(s["model"], 0.5), sampler, batch=6)
    assert out.shape == (6, 4, 8, 8) and torch.isfinite(out).all()
    assert log.particles == 6 and len(log.steps) == STEPS + 1
    assert [e["scored"] for e in log.steps] == [True, False, True, False, True]
    assert all(1 / 6 - 1e-9 <= e["ess_fraction"] <= 1 + 1e-9 for e in log.steps)
    assert "5*brightness + 5*saturation" in log.target  # c_i / alpha_ref_i = 0.5 * 0.5 / 0.05
    assert log.forwards_per_step == 3.0
    text, ui = smc_report(log)
    assert ui["ess"] == [e["ess_fraction"] for e in log.steps]
    assert "ESS/N" in text


def test_the_strong_tilt_options_run_inside_comfys_sampling_and_show_in_the_report(smc_setup):
    """Adaptive tempering, residual resampling and a move after every resampling (resample_below = 1):
    each move is one more guided blend + base call (3 forwards) and one scoring, the report shows the
    exponent, the lineages and the acceptance of every step."""
    from diffusion_blend.nodes.smc_nodes import smc_report

    s = smc_setup
    sampler, log = _smc(s, resample_below=1.0, resampling="residual", adaptive_ess=0.9, moves=1)
    out = _sample(s, _blend(s["model"], 0.5), sampler, batch=6)
    assert out.shape == (6, 4, 8, 8) and torch.isfinite(out).all()
    moved = [e for e in log.steps if e["acceptance"] is not None]
    assert len(moved) == STEPS - 1  # every resampling after the first transition (the last step is deterministic)
    assert all(0.0 <= e["acceptance"] <= 1.0 for e in moved)
    kappas = [e["kappa"] for e in log.steps]
    assert all(b >= a for a, b in zip(kappas, kappas[1:])) and kappas[-1] == 1.0
    assert log.scorings == STEPS + 1 + len(moved)
    assert log.forwards_per_step == pytest.approx(3.0 * (STEPS + len(moved)) / STEPS)
    text, ui = smc_report(log)
    assert ui["acceptance"] == [e["acceptance"] for e in log.steps]
    assert "lineages" in text and "accepted" in text


def test_smc_inputs_are_checked_with_messages_that_name_them(smc_setup):
    from diffusion_blend.nodes.smc_nodes import SMCLog, smc_report

    s = smc_setup
    with pytest.raises(BlendInputError, match="score_every"):
        _smc(s, score_every=0)
    with pytest.raises(BlendInputError, match="eta"):
        _smc(s, eta=0.0)
    with pytest.raises(BlendInputError, match="resampling='stratified'"):
        _smc(s, resampling="stratified")
    with pytest.raises(BlendInputError, match="adaptive_ess=1.0"):
        _smc(s, adaptive_ess=1.0)
    with pytest.raises(BlendInputError, match="moves=-1"):
        _smc(s, moves=-1)
    with pytest.raises(BlendInputError, match="move_step=0.0"):
        _smc(s, move_step=0.0)
    with pytest.raises(BlendInputError, match="rewards: .*'nonsense'"):
        _smc(s, rewards="nonsense")
    with pytest.raises(BlendInputError, match="rewards: .*weight 'x'"):
        _smc(s, rewards="brightness:x")
    with pytest.raises(ValueError, match="reward='aesthetic'.*needs its official files"):
        _smc(s, rewards="aesthetic")
    with pytest.raises(BlendInputError, match="smc_log"):
        smc_report(SMCLog())
    from diffusion_blend.nodes.smc_nodes import DiffusionBlendSMCSampler as node  # the V3 node's dropdown check

    assert node.validate_inputs(potential_on="base", resampling="residual") is True
    assert node.validate_inputs(resampling="stratified").startswith("resampling='stratified': expected one of")
    assert node.validate_inputs(potential_on="both").startswith("potential_on='both': expected one of")
    cases = [
        (dict(alpha=0.1), _blend(s["model"], 0.5), "alpha=0.1: leave it 0"),
        (dict(rewards="brightness:1"), _blend(s["model"], 0.5), "names only"),
        (dict(rewards="brightness"), _blend(s["model"], 0.5), "1 names for a blend of 2 bases"),
        (dict(), _blend(s["model"], 0.5, names=("smc_b0.safetensors", "smc_unregistered.safetensors")),
         "basis 2 was trained on .random., which the registry does not know"),
        (dict(), s["model"], "carries no Diffusion Blend"),
        (dict(rewards="brightness"), s["model"], "alpha=0.0: without a Diffusion Blend"),
        (dict(rewards="brightness:1e308", alpha=1e-6), s["model"], "brightness: its weight / alpha = inf"),
    ]
    for kw, model, message in cases:
        sampler, _ = _smc(s, **kw)
        with pytest.raises(BlendInputError, match=message):
            _sample(s, model, sampler, batch=2)
    import comfy.sample

    sampler, _ = _smc(s)
    two_images = torch.stack([torch.zeros(4, 8, 8), torch.ones(4, 8, 8)])
    with pytest.raises(BlendInputError, match="latent_image: .*must be the same"):
        comfy.sample.sample_custom(_blend(s["model"], 0.5), torch.zeros_like(two_images), 3.0, sampler, s["sigmas"],
                                   s["pos"], s["neg"], two_images, seed=0)


@pytest.mark.parametrize("sampler,flow", [("euler_ancestral", False), ("ddpm", False), ("euler_ancestral", True)])
def test_the_smc_chain_steps_are_comfys_stochastic_samplers(comfy_inprocess, sampler, flow):
    """``blend.smc.ancestral_step`` against ComfyUI's own samplers on a fixed denoiser, same noise:
    euler_ancestral and ddpm (the chain of the shipped workflows) for eps/v models, and the
    rectified-flow form euler_ancestral switches to for flow models (SD3, Flux)."""
    from types import SimpleNamespace

    import comfy.k_diffusion.sampling as kds
    import comfy.model_sampling

    from diffusion_blend.blend.smc import smc_ancestral_chain

    class Sampling(comfy.model_sampling.CONST if flow else comfy.model_sampling.EPS):
        def __init__(self):  # only the type matters to the samplers' dispatch
            pass

    class Denoiser:
        sampling = Sampling()
        # model_patcher: where v0.16+ reads the flow noise scale (a plain Sampling has none: 1)
        inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=sampling),
                                      model_patcher=SimpleNamespace(get_model_object=lambda name: Denoiser.sampling))

        def __call__(self, x, sigma, **kwargs):
            return 0.6 * x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) + 0.05

    sigmas = torch.tensor([0.95, 0.7, 0.4, 0.1, 0.0]) if flow else torch.tensor([14.6, 6.0, 2.0, 0.5, 0.03, 0.0])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 4, 4, generator=g) * float(sigmas[0])
    noises = [torch.randn(x.shape, generator=g) for _ in range(len(sigmas) - 1)]
    stock_noise = list(noises)
    fn = {"euler_ancestral": kds.sample_euler_ancestral, "ddpm": kds.sample_ddpm}[sampler]
    stock = fn(Denoiser(), x, sigmas, noise_sampler=lambda s, s_next: stock_noise.pop(0), disable=True)

    model = Denoiser()
    ours_noise = list(noises)
    real_randn = torch.randn

    def randn(shape, generator=None, dtype=None, **kw):  # the chain draws one normal tensor per noisy step
        return ours_noise.pop(0) if tuple(shape) == tuple(x.shape) else real_randn(shape, generator=generator,
                                                                                  dtype=dtype, **kw)

    denoise = lambda x_, s: (model(x_, torch.tensor([s])),) * 2  # noqa: E731
    torch.randn = randn
    try:
        ours = smc_ancestral_chain(denoise, x, sigmas, lambda c: torch.zeros(c.shape[0]), flow=flow).samples
    finally:
        torch.randn = real_randn
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_smc_sampler_through_the_server_in_both_custom_samplers(comfy_server, make_lora):
    """The same SMC run from SamplerCustom and from SamplerCustomAdvanced (CFGGuider, RandomNoise):
    identical particles, and each report lands in the prompt's history."""
    from hostkit import run

    from diffusion_blend.client.graph import Graph

    for name, seed, reward in (("smc_host_a.safetensors", 41, "brightness"), ("smc_host_b.safetensors", 42, "saturation")):
        make_lora(name, seed=seed, reward=reward, alpha_ref=0.05)

    def graph(advanced: bool) -> Graph:
        g = Graph()
        ckpt = g.add("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
        a = g.add("DiffusionBlendBasis", lora_name="smc_host_a.safetensors", weight=0.5, alpha_ref=0.0)
        b = g.add("DiffusionBlendBasis", lora_name="smc_host_b.safetensors", weight=0.5, alpha_ref=0.0, basis=a[0])
        model = g.add("DiffusionBlend", model=ckpt[0], basis=b[0], kl_scale=0.5, normalize=True, mode="exact")[0]
        pos = g.add("CLIPTextEncode", text="a red cube", clip=ckpt[1])[0]
        neg = g.add("CLIPTextEncode", text="", clip=ckpt[1])[0]
        smc = g.add("DiffusionBlendSMCSampler", vae=ckpt[2], score_every=1, resample_below=0.5, eta=1.0)
        sigmas = g.add("BasicScheduler", model=model, scheduler="ddim_uniform", steps=3, denoise=1.0)[0]
        latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=4)[0]
        if advanced:
            noise = g.add("RandomNoise", noise_seed=9)[0]
            guider = g.add("CFGGuider", model=model, positive=pos, negative=neg, cfg=3.0)[0]
            out = g.add("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=smc[0], sigmas=sigmas,
                        latent_image=latent)[0]
        else:
            out = g.add("SamplerCustom", model=model, add_noise=True, noise_seed=9, cfg=3.0, positive=pos,
                        negative=neg, sampler=smc[0], sigmas=sigmas, latent_image=latent)[0]
        g.add("DiffusionBlendSMCReport", node_id="report", smc_log=smc[1], samples=out)
        g.add("SaveLatent", node_id="latent_out", samples=out, filename_prefix="t/smc_latent")
        return g

    results = []
    for advanced in (False, True):
        res = comfy_server.client.run(graph(advanced).prompt())
        report = res.history["outputs"]["report"]
        assert len(report["ess"]) == 4 and report["resampled"][-1] == 3
        assert "4 particles" in report["text"][0]
        results.append(run(comfy_server, graph(advanced))["latent"])
    assert results[0].shape == (4, 4, 8, 8)
    torch.testing.assert_close(results[0], results[1])
