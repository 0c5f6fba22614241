"""The blend on diffusers pipelines (SD1.5, SDXL, SD3, SD3.5, Flux), against two independent oracles:

* diffusers + peft: w = e_1, lambda = 1 equals the pipeline with that LoRA loaded by
  ``pipe.load_lora_weights``; lambda = 0 equals the base bit for bit; m = 2 equals the affine
  combination of the peft-loaded predictions (exact, sequential and stacked); ``merged`` equals peft's
  own weighted adapter mix ``W + sum_i c_i dW_i``;
* ComfyUI: the diffusers blend's prediction equals the DiffusionBlend node's on ComfyUI's model of
  the same weights (one denoiser call, the same x, t and conditioning);

and ``remove()`` gives the pipeline back bit for bit.  Whole ``pipe(...)`` calls run through the blend
(CFG, the scheduler, Flux's packed latents) and agree with peft's pipeline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))  # familykit, test_blend_inprocess

from dkit import FAMILIES, build_case, comfy_cond, comfy_model, export_like_trainer, load_pipe

from diffusion_blend.blend.coefficients import BlendInputError, affine_coefficients, blend_coefficients
from diffusion_blend.blend.lora_file import LoraFormatError
from diffusion_blend.diffusers_host import DiffusionBlend

ALPHA_REFS = (1e-4, 3e-4)  # what dkit.make_loras writes as db.alpha_ref
TOL = 1e-5  # relative to the prediction's scale


def _folder(request, family: str):
    return {"SD1.5": lambda: request.getfixturevalue("tiny_base")["diffusers"],
            "SDXL": lambda: request.getfixturevalue("tiny_sdxl"), "SD3": lambda: request.getfixturevalue("tiny_sd3"),
            "SD3.5": lambda: request.getfixturevalue("tiny_sd35"), "Flux": lambda: request.getfixturevalue("tiny_flux")}[family]()


_CASES: dict[str, object] = {}


def _case(request, tmp_path_factory, family: str):
    if family not in _CASES:
        _CASES[family] = build_case(family, _folder(request, family),
                                    tmp_path_factory.mktemp(f"dh_{family.replace('.', '')}"))
    return _CASES[family]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    return _case(request, tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def sd15(request, tmp_path_factory):
    return _case(request, tmp_path_factory, "SD1.5")


def _close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(scale.abs().max()))


@torch.no_grad()
def test_blend_equals_peft_loaded_pipelines(case):
    den, x, sigma = case.denoiser, case.x, case.sigma
    base = case.predict(den, x, sigma)
    state = {k: v.clone() for k, v in den.state_dict().items()}
    w, lam = [0.3, 0.7], 1.5
    with DiffusionBlend(case.pipe, case.loras, [1.0, 0.0], 1.0) as blend:
        assert blend.alpha_refs == ALPHA_REFS and blend.rewards == ("reward1", "reward2")
        e1 = case.predict(den, x, sigma)
        blend.configure(kl_scale=0.0)
        lam0 = case.predict(den, x, sigma)
        blend.configure(weights=w, kl_scale=lam)
        exact = case.predict(den, x, sigma)
        blend.configure(mode="sequential")
        sequential = case.predict(den, x, sigma)
        blend.configure(mode="exact")
        blend.segments_per_call = 3  # all three models stacked along the batch in one forward
        stacked = case.predict(den, x, sigma)
        c = blend.coefficients
        blend.configure(mode="merged")
        merged = case.predict(den, x, sigma)
    assert not blend.active
    assert torch.equal(case.predict(den, x, sigma), base)  # remove(): bit for bit
    assert all(torch.equal(v, state[k]) for k, v in den.state_dict().items())
    assert torch.equal(lam0, base)

    peft = load_pipe(case.family, case.folder_path)
    for i, path in enumerate(case.loras):
        peft.load_lora_weights(str(path), adapter_name=f"b{i}")
    pden = getattr(peft, "unet", None) or peft.transformer
    preds = []
    for i in range(2):
        peft.set_adapters([f"b{i}"])
        preds.append(case.predict(pden, x, sigma))
    peft.set_adapters(["b0", "b1"], [c[0], c[1]])
    peft_merged = case.predict(pden, x, sigma)
    assert float((preds[0] - base).abs().max()) > 1e-3 * float(base.abs().max())  # the LoRA matters
    assert _close(e1, preds[0], base) <= TOL
    assert c == tuple(blend_coefficients(w, ALPHA_REFS, lam))
    a = affine_coefficients(c)
    affine = a[0] * base + a[1] * preds[0] + a[2] * preds[1]
    for name, out in (("exact", exact), ("sequential", sequential), ("stacked", stacked)):
        assert _close(out, affine, base) <= TOL, name
    assert _close(merged, peft_merged, base) <= TOL


@torch.no_grad()
def test_blend_equals_the_comfyui_nodes_prediction(case, comfy_inprocess, request):
    """One denoiser call, the same x, t and conditioning: the diffusers blend = the DiffusionBlend node
    on ComfyUI's model of the same weights (its LoRA names resolved by ComfyUI's key map), for the test
    LoRAs and for a file written by the trainer's own export."""
    import folder_paths
    from familykit import apply_cond
    from test_blend_inprocess import blended

    base_model = comfy_model(case, request.getfixturevalue("comfy_checkpoint")[0] if case.family == "SD1.5" else None)
    folder_paths.add_model_folder_path("loras", str(case.folder))
    sig = torch.full((case.x.shape[0],), case.sigma)
    cond = comfy_cond(case, base_model)
    exported = export_like_trainer(case.family, case.denoiser,
                                   case.folder / f"dh_export_{case.family.replace('.', '')}.safetensors")
    for loras, w, lam in ((case.loras, [1.0, 0.0], 1.0), (case.loras, [0.3, 0.7], 1.5), (case.loras, [0.5, 0.5], 0.0),
                          ([exported], [1.0], 1.0)):
        node = blended(base_model, loras, w, lam)
        comfy = (case.x - apply_cond(node, case.x, sig, **cond)) / case.sigma
        with DiffusionBlend(case.pipe, loras, w, lam):
            ours = case.predict(case.denoiser, case.x, case.sigma)
        assert _close(ours, comfy, comfy) <= TOL, (loras[0].name, w, lam)
        if loras[0] is exported:  # the export's scale (alpha / rank = 0.5) is read, not dropped
            assert float((ours - case.predict(case.denoiser, case.x, case.sigma)).abs().max()) > 1e-3 * float(
                comfy.abs().max())


@torch.no_grad()
def test_stochastic_mode_and_the_window_pick_whole_models(sd15):
    """``stochastic`` evaluates the one model ``make_plan`` draws for (seed, noise level); outside the
    window the base predicts, bit for bit.  (The plan is the core's, the same for every family: SD1.5,
    the cheapest network, shows the adapter reads the timestep.)"""
    from diffusion_blend.blend.runtime import make_plan

    case = sd15
    den, x, sigma = case.denoiser, case.x, case.sigma
    base = case.predict(den, x, sigma)
    with DiffusionBlend(case.pipe, case.loras, [0.3, 0.7], 0.5) as blend:
        exact = case.predict(den, x, sigma)
        singles = []
        for i in range(2):
            blend.configure(weights=[1.0 if j == i else 0.0 for j in range(2)], kl_scale=1.0)
            singles.append(case.predict(den, x, sigma))
        blend.configure(weights=[0.3, 0.7], kl_scale=0.5, mode="stochastic")
        models = {(): base, ((0, 1.0),): singles[0], ((1, 1.0),): singles[1]}
        drawn = set()
        for seed in range(12):
            blend.configure(seed=seed)
            segment = make_plan("stochastic", blend.coefficients, seed=seed, sigma=blend.noise_level(500)).segments[0]
            drawn.add(segment)
            assert torch.equal(case.predict(den, x, sigma), models[segment])
        assert len(drawn) >= 2  # the draw depends on the seed
        level = blend.noise_level(500)
        blend.configure(mode="exact", window=(1.0 - level + 0.01, 1.0))
        assert torch.equal(case.predict(den, x, sigma), base)
        blend.configure(window=(1.0 - level - 0.01, 1.0))
        assert torch.equal(case.predict(den, x, sigma), exact)


@torch.no_grad()
def test_whole_pipeline_calls_run_through_the_blend(case):
    """``pipe(prompt)`` with the blend at w = e_1 = ``pipe(prompt)`` with peft's LoRA (two steps, CFG where
    the family has it, Flux's packed latents); stacking the models in one forward (Flux's token ids are
    not repeated) gives the sequential result."""
    kwargs = dict(prompt="a cat", num_inference_steps=2, height=64, width=64, output_type="latent")
    if case.family != "Flux":
        kwargs["guidance_scale"] = 3.0
    else:  # 4 images of 4 tokens each: the token ids' first dimension equals the batch, and must stay as is
        kwargs.update(height=32, width=32, num_images_per_prompt=4)

    def run(pipe):
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images

    base = run(case.pipe)
    with DiffusionBlend(case.pipe, case.loras, [1.0, 0.0], 1.0):
        e1 = run(case.pipe)
    with DiffusionBlend(case.pipe, case.loras, [0.4, 0.6], 1.0, mode="sequential") as blend:
        sequential = run(case.pipe)
        blend.configure(mode="exact")
        blend.segments_per_call = 3
        stacked = run(case.pipe)
    assert torch.equal(run(case.pipe), base)
    peft = load_pipe(case.family, case.folder_path)
    peft.load_lora_weights(str(case.loras[0]))
    reference = run(peft)
    assert float((reference - base).abs().max()) > 1e-4
    assert _close(e1, reference, reference) <= 1e-4
    assert _close(stacked, sequential, sequential) <= 1e-4


def test_bad_inputs_are_named(sd15, tmp_path):
    case = sd15
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(2, 4),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(4, 2)}, str(foreign))
    with pytest.raises(LoraFormatError, match="foreign.safetensors: module 'no_such_block.to_q' matches no layer"):
        DiffusionBlend(case.pipe, [foreign], [1.0], alpha_refs=[1.0])
    with pytest.raises(BlendInputError, match=r"weights: expected one weight per LoRA \(2\), got 1"):
        DiffusionBlend(case.pipe, case.loras, [1.0])
    with pytest.raises(BlendInputError, match="mode='fast'"):
        DiffusionBlend(case.pipe, case.loras, [1.0, 1.0], mode="fast")
    with pytest.raises(BlendInputError, match="window"):
        DiffusionBlend(case.pipe, case.loras, [1.0, 1.0], window=(0.8, 0.2))
    with DiffusionBlend(case.pipe, case.loras, [1.0, 1.0]) as blend:
        with pytest.raises(BlendInputError, match="already carries a Diffusion Blend"):
            DiffusionBlend(case.pipe, case.loras, [1.0, 1.0])
        before = (blend.coefficients, blend.kl_scale, blend.mode, blend.weights)
        with pytest.raises(BlendInputError, match="mode=stochastic"):
            blend.configure(kl_scale=3.0, mode="stochastic")  # negative base coefficient: no probability
        with pytest.raises(BlendInputError, match="weights sum to"):
            blend.configure(weights=[1.0, -1.0], kl_scale=2.0)
        assert (blend.coefficients, blend.kl_scale, blend.mode, blend.weights) == before  # all or nothing
    assert not blend.active
    blend.remove()  # twice: nothing happens
    with DiffusionBlend(case.pipe, case.loras, [1.0, 1.0], alpha_refs=[2e-4, 0.0]) as given:
        assert given.alpha_refs == (2e-4, 3e-4)  # given where > 0, else the file's db.alpha_ref
    with pytest.raises(BlendInputError, match="alpha_ref = -1.0 for db_SD15_1.safetensors: expected > 0"):
        DiffusionBlend(case.pipe, case.loras, [1.0, 1.0], alpha_refs=[-1.0, 0.0])


@torch.no_grad()
def test_other_forward_wrappers_compose_in_order(sd15):
    """A wrapper already on the network's forward (as accelerate's offload hooks set it) runs under the
    blend and is restored by ``remove()``; one put on after the blend makes ``remove()`` refuse, naming it,
    instead of leaving the blend silently in place."""
    case = sd15
    den = case.denoiser
    calls = []
    plain = den.forward

    def hook(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    den.forward = hook
    try:
        blend = DiffusionBlend(case.pipe, case.loras, [1.0, 0.0], 1.0)
        e1 = case.predict(den, case.x, case.sigma)
        assert len(calls) == 1  # the LoRA alone: one forward, through the earlier wrapper
        blend.remove()
        assert den.__dict__["forward"] is hook
        blend.install()
        assert torch.equal(case.predict(den, case.x, case.sigma), e1)
        late = den.forward
        den.forward = lambda *a, **k: late(*a, **k)
        with pytest.raises(BlendInputError, match="another wrapper was put on the unet's forward after the blend"):
            blend.remove()
        den.forward = late
        blend.remove()
    finally:
        del den.forward
    assert "forward" not in den.__dict__


@torch.no_grad()
def test_out_of_memory_in_a_stacked_forward_falls_back_to_smaller_chunks(sd15):
    """Three models stacked in one forward run out of memory (simulated under the blend): the blend
    retries one model per forward, keeps that count, and the output equals a one-per-forward run."""
    case = sd15
    den, x, sigma = case.denoiser, case.x, case.sigma
    batches = []
    plain = den.forward

    def tight_memory(sample, *args, **kwargs):
        batches.append(sample.shape[0])
        if sample.shape[0] > 2 * x.shape[0]:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return plain(sample, *args, **kwargs)

    den.forward = tight_memory
    try:
        with DiffusionBlend(case.pipe, case.loras, [0.3, 0.7], 1.5, segments_per_call=3) as blend:
            first = case.predict(den, x, sigma)
            assert batches == [3 * x.shape[0]] + [x.shape[0]] * 3
            second = case.predict(den, x, sigma)
            assert batches[4:] == [x.shape[0]] * 3
            blend.segments_per_call, blend._segments_cap = 1, None
            want = case.predict(den, x, sigma)
    finally:
        del den.forward
    assert torch.equal(first, want) and torch.equal(second, want)
