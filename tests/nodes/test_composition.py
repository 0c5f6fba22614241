"""The blend composed with what else a graph puts around it: the host's model patches (in both orders),
conditioning hooks and a real (tiny, random) ControlNet, on the real server.

Three identities, each exact up to float round-off where it holds (``docs/composition.md`` has the table
and the reasons):

* ``e1``: the blend at w = e_1, lambda = 1 with the patch equals the stock LoRA loader with the patch;
* ``base``: lambda = 0 with the patch equals the base with the patch, bit for bit;
* ``affine``: m = 2 equals the affine combination of the stock-loaded models with the patch.  It is a
  statement about one model call, so it is checked on a one-step Euler run, whose result (the
  denoised prediction) is affine in the model's output; it holds where the patch acts inside each model
  call or linearly on the calls' outputs, and fails where it acts non-linearly on the guided prediction
  (RescaleCFG) or carries state from one model call to a later one (SAG's attention map).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusion_blend.blend.coefficients import affine_coefficients, blend_coefficients

from hostkit import blend_chain, run, sample_graph, stock_lora_chain, then

A, B, C = "compose_a.safetensors", "compose_b.safetensors", "compose_c.safetensors"
W2, LAM2 = [0.6, 0.4], 0.8  # the m = 2 blend: base coefficient 0.2, so all three models enter
STEPS = 3


def _model_patch(node: str, **inputs):
    def chain(g, model):
        return g.add(node, model=model, **inputs)[0]
    return chain


#: name -> (model chain, does the affine identity hold, what the patch is)
MODEL_PATCHES = {
    "stock_lora": (stock_lora_chain((C, 0.7)), True, "LoraLoaderModelOnly (weights merged at load)"),
    "pag": (_model_patch("PerturbedAttentionGuidance", scale=3.0), True, "PAG (post-CFG, one more model call)"),
    "sag": (_model_patch("SelfAttentionGuidance", scale=0.8, blur_sigma=2.0), False,
            "SAG (attention map recorded in one call, used in the next)"),
    "rescale_cfg": (_model_patch("RescaleCFG", multiplier=0.7), False, "RescaleCFG (CFG function)"),
    "model_sampling": (_model_patch("ModelSamplingDiscrete", sampling="v_prediction", zsnr=False), True,
                       "ModelSamplingDiscrete (v-prediction)"),
    "deep_shrink": (_model_patch("PatchModelAddDownscale", block_number=1, downscale_factor=2.0, start_percent=0.0,
                                 end_percent=0.5, downscale_after_skip=True, downscale_method="bicubic",
                                 upscale_method="bicubic"), True, "Kohya Deep Shrink (block patches)"),
    "hypertile": (_model_patch("HyperTile", tile_size=32, swap_size=1, max_depth=0, scale_depth=False), True,
                  "HyperTile (attention replacement)"),
    "differential_diffusion": (_model_patch("DifferentialDiffusion"), True,
                               "Differential Diffusion (denoise mask, img2img)"),
}
ORDERS = ("patch_then_blend", "blend_then_patch")


def _mask(g, latent):
    mask = g.add("SolidMask", value=0.6, width=64, height=64)[0]
    return g.add("SetLatentNoiseMask", samples=latent, mask=mask)[0]


def _graph(model_chain, patch: str | None, *, steps: int, conds=None):
    img2img = patch == "differential_diffusion"
    return sample_graph(model_chain, seed=7, steps=steps, conds=conds, denoise=0.8 if img2img else 1.0,
                        latent_chain=_mask if img2img else None)


@pytest.fixture(scope="module")
def bases(make_lora):
    for name, seed in ((A, 51), (B, 52), (C, 53)):
        make_lora(name, seed=seed)


ARTIFACTS = Path(__file__).resolve().parents[2] / "out" / "test-artifacts"


@pytest.fixture(scope="module")
def figures():
    """Each cell's measured errors, written to ``out/test-artifacts/composition.json`` (the docs' table)."""
    table: dict[str, dict[str, float]] = {}
    yield table
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "composition.json").write_text(json.dumps(table, indent=1, sort_keys=True))


@pytest.fixture(scope="module")
def results(comfy_server, bases):
    """``results(graph) -> latent``: every distinct graph runs once (the references are shared)."""
    cache: dict[str, torch.Tensor] = {}

    def get(graph) -> torch.Tensor:
        key = json.dumps(graph.prompt(), sort_keys=True)
        if key not in cache:
            cache[key] = run(comfy_server, graph)["latent"].double()
        return cache[key]

    return get


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-5) -> float:
    """``max|a - b|`` relative to the latents' magnitude (the tiny base leaves latents of ~200)."""
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def _in_order(order: str, patch, blend_or_lora):
    return then(patch, blend_or_lora) if order == "patch_then_blend" else then(blend_or_lora, patch)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", list(MODEL_PATCHES))
def test_model_patch_composes_with_the_blend(results, figures, comfy_server, name, order):
    server_log = comfy_server.log
    patch, affine_holds, _ = MODEL_PATCHES[name]
    # the patch matters here (else nothing below could fail)
    effect = _close(results(_graph(stock_lora_chain((A, 1.0)), name, steps=STEPS)),
                    results(_graph(_in_order(order, patch, stock_lora_chain((A, 1.0))), name, steps=STEPS)))
    assert effect > 1e-3

    # e1: the blend at w = e1, lambda = 1 is LoRA A, with the patch where the stock chain has it
    e1 = results(_graph(_in_order(order, patch, blend_chain([(A, 1.0), (B, 0.0)], kl_scale=1.0)), name, steps=STEPS))
    stock = results(_graph(_in_order(order, patch, stock_lora_chain((A, 1.0))), name, steps=STEPS))
    figures[f"{name}/{order}"] = cell = {"patch_effect": effect, "e1": _close(e1, stock)}
    assert cell["e1"] <= 2e-5

    # base: lambda = 0 is the patched base, bit for bit
    off = results(_graph(_in_order(order, patch, blend_chain([(A, 0.5), (B, 0.5)], kl_scale=0.0)), name, steps=STEPS))
    assert torch.equal(off, results(_graph(patch, name, steps=STEPS)))

    # affine: one Euler step, m = 2, against the affine combination of the patched stock models
    blended = results(_graph(_in_order(order, patch, blend_chain(list(zip((A, B), W2)), kl_scale=LAM2)), name, steps=1))
    models = [patch, _in_order(order, patch, stock_lora_chain((A, 1.0))),
              _in_order(order, patch, stock_lora_chain((B, 1.0)))]
    a = affine_coefficients(blend_coefficients(W2, [1e-4, 1e-4], LAM2))
    combination = sum(ai * results(_graph(m, name, steps=1)) for ai, m in zip(a, models))
    cell["affine"] = error = _close(blended, combination)
    if affine_holds:
        assert error <= 2e-5, error
    else:  # the table says it does not hold: pin that (a change here means the docs must change)
        assert error > 1e-3, error
    if name == "sag":  # the approximation is said where it happens
        assert "Self-Attention Guidance on a blend of several models" in server_log()


def _hook_lora(g, clip, pos, neg):
    hook = g.add("CreateHookLora", lora_name=C, strength_model=0.8, strength_clip=0.0)[0]
    return tuple(g.add("ConditioningSetProperties", cond_NEW=c, strength=1.0, set_cond_area="default", hooks=hook)[0]
                 for c in (pos, neg))


def _controlnet(name):
    def conds(g, clip, pos, neg):
        net = g.add("ControlNetLoader", control_net_name=name)[0]
        image = g.add("EmptyImage", width=64, height=64, batch_size=1, color=0x3366CC)[0]
        out = g.add("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=net, image=image,
                    strength=1.0, start_percent=0.0, end_percent=1.0)
        return out[0], out[1]
    return conds


@pytest.mark.parametrize("name", ["hook_lora", "controlnet"])
def test_conditioning_patch_composes_with_the_blend(results, figures, tiny_controlnet, name):
    """A LoRA hooked on the conditioning (CreateHookLora, applied to the weights for the calls of
    those conds) and a ControlNet loaded by ControlNetLoader (residuals handed to every model call)."""
    conds = _hook_lora if name == "hook_lora" else _controlnet(tiny_controlnet)
    effect = _close(results(_graph(None, None, steps=STEPS)), results(_graph(None, None, steps=STEPS, conds=conds)))
    assert effect > 1e-3
    e1 = results(_graph(blend_chain([(A, 1.0), (B, 0.0)], kl_scale=1.0), None, steps=STEPS, conds=conds))
    stock = results(_graph(stock_lora_chain((A, 1.0)), None, steps=STEPS, conds=conds))
    figures[name] = cell = {"patch_effect": effect, "e1": _close(e1, stock)}
    assert cell["e1"] <= 2e-5
    off = results(_graph(blend_chain([(A, 0.5), (B, 0.5)], kl_scale=0.0), None, steps=STEPS, conds=conds))
    assert torch.equal(off, results(_graph(None, None, steps=STEPS, conds=conds)))
    blended = results(_graph(blend_chain(list(zip((A, B), W2)), kl_scale=LAM2), None, steps=1, conds=conds))
    a = affine_coefficients(blend_coefficients(W2, [1e-4, 1e-4], LAM2))
    models = [None, stock_lora_chain((A, 1.0)), stock_lora_chain((B, 1.0))]
    combination = sum(ai * results(_graph(m, None, steps=1, conds=conds)) for ai, m in zip(a, models))
    cell["affine"] = _close(blended, combination)
    assert cell["affine"] <= 2e-5


def test_token_merging_runs_with_the_blend(comfy_server, bases):
    """ToMe draws its token partition from the global RNG at every model call, so two stock runs differ
    already and no identity can hold; the blend composes with it (both orders run, finite)."""
    patch = _model_patch("TomePatchModel", ratio=0.5)
    for order in ORDERS:
        out = run(comfy_server, _graph(_in_order(order, patch, blend_chain(list(zip((A, B), W2)), kl_scale=LAM2)),
                                       None, steps=2))
        assert torch.isfinite(out["latent"]).all()


def test_the_blends_window_follows_a_model_sampling_patch_in_either_order(results):
    """start/end_percent are read as sigmas by the model sampling in force when the model is called: a
    ModelSamplingDiscrete (zero-terminal-SNR: other sigmas) after the blend moves the window as it does
    before it, so both orders give the same result, and it differs from the blend over the whole run."""
    zsnr = _model_patch("ModelSamplingDiscrete", sampling="eps", zsnr=True)
    # from 15 %: sigma 10.9 under zero-terminal SNR, 6.4 under the checkpoint's own schedule, so the second of 6
    # steps (sigma 7.42 under zsnr) is inside the window only where the window is read with the patch
    windowed = blend_chain(list(zip((A, B), W2)), kl_scale=LAM2, start_percent=0.15, end_percent=1.0)
    before = results(_graph(then(zsnr, windowed), None, steps=6))
    after = results(_graph(then(windowed, zsnr), None, steps=6))
    assert torch.equal(before, after)
    whole = results(_graph(then(zsnr, blend_chain(list(zip((A, B), W2)), kl_scale=LAM2)), None, steps=6))
    assert _close(before, whole) > 1e-3
