"""Per-step checks inside ComfyUI's own model call (in-process): the wrapper's output equals the
formula evaluated on separately patched models, and the batch contract holds for packs below it."""

import pytest
import torch

import tiny_fixtures

from diffusion_blend.blend.coefficients import blend_coefficients


@pytest.fixture(scope="module")
def setup(comfy_checkpoint, diffusers_unet, tmp_path_factory):
    import folder_paths

    d = tmp_path_factory.mktemp("inproc_loras")
    names = []
    for i, (seed, alpha_ref) in enumerate(((21, 1e-4), (22, 1e-4), (23, 3e-4))):
        path = d / f"b{i}.safetensors"
        tiny_fixtures.make_basis_lora(diffusers_unet, path, seed=seed, alpha_ref=alpha_ref)
        names.append(path)
    folder_paths.add_model_folder_path("loras", str(d))
    return comfy_checkpoint[0], names


def apply(patcher, x, sigma, context, cond_or_uncond=(1, 0), extra_wrappers=(), control=None):
    """One ``apply_model`` call the way ComfyUI's sampler makes it, with the patcher's wrappers."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    options = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    options.update({"wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers),
                    "cond_or_uncond": list(cond_or_uncond), "uuids": [object() for _ in cond_or_uncond],
                    "sigmas": sigma[:1]})
    for key, w in extra_wrappers:
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, w, options)
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context, control=control,
                                         transformer_options=options).float()


def stock_lora_model(base, path, strength=1.0):
    import comfy.lora
    import comfy.utils

    patched = base.clone()
    key_map = comfy.lora.model_lora_keys_unet(patched.model, {})
    patches = comfy.lora.load_lora(comfy.utils.load_torch_file(str(path)), key_map, log_missing=True)
    patched.add_patches(patches, strength)
    return patched


def blended(base, paths, weights, kl_scale, mode="exact", normalize=True, batch_segments=None, alpha_refs=None):
    """The DiffusionBlend node's model; ``batch_segments=True`` forces the one-forward path that
    accelerators take (on the CPU the wrapper evaluates the models one after the other)."""
    import comfy.patcher_extension

    from diffusion_blend.nodes.blend_nodes import add_basis, blend_model
    from diffusion_blend.nodes.comfy_wrapper import WRAPPER_KEY

    basis = None
    for p, w, a in zip(paths, weights, alpha_refs or [0.0] * len(paths)):
        basis = add_basis(p.name, w, a, basis)
    model = blend_model(base, basis, kl_scale, normalize, mode)
    for wrapper in model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        wrapper.batch_segments = batch_segments
    return model


def inputs(batch=2, seed=0, sigma=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g) * sigma
    return x, torch.full((batch,), sigma), torch.randn(batch, 77, 768, generator=g)


@pytest.mark.parametrize("mode,batch", [("exact", True), ("exact", None), ("sequential", None)])
def test_step_output_is_the_formula_on_separately_patched_models(setup, mode, batch):
    base, paths = setup
    w, lam = [0.5, 0.2, 0.3], 0.8
    c = blend_coefficients(w, [1e-4, 1e-4, 3e-4], lam)
    x, sigma, ctx = inputs()
    eps_base = apply(base, x, sigma, ctx)
    eps_i = [apply(stock_lora_model(base, p), x, sigma, ctx) for p in paths]
    want = eps_base + sum(ci * (e - eps_base) for ci, e in zip(c, eps_i))
    got = apply(blended(base, paths, w, lam, mode, batch_segments=batch), x, sigma, ctx)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 2e-5 * max(1.0, scale)
    assert (eps_i[0] - eps_base).abs().max().item() > 1e-2  # the LoRAs matter at this step


def test_alpha_ref_override_on_the_basis_node_enters_the_formula(setup):
    """A Basis node's alpha_ref > 0 replaces the file's db.alpha_ref in c_i = w~_i alpha_ref_i / alpha
    (alpha = sum_i w~_i alpha_ref_i / lambda), checked against the formula on stock-loaded models."""
    base, paths = setup
    w, lam = [0.5, 0.5], 1.0
    overrides = [4e-4, 0.0]  # the first basis overridden (its file says 1e-4), the second read from its file
    c = blend_coefficients(w, [4e-4, 1e-4], lam)
    assert abs(c[0] - 0.8) < 1e-12 and abs(c[1] - 0.2) < 1e-12  # not (0.5, 0.5), as the files would give
    x, sigma, ctx = inputs(seed=3)
    eps_base = apply(base, x, sigma, ctx)
    eps_i = [apply(stock_lora_model(base, p), x, sigma, ctx) for p in paths[:2]]
    want = eps_base + sum(ci * (e - eps_base) for ci, e in zip(c, eps_i))
    got = apply(blended(base, paths[:2], w, lam, alpha_refs=overrides), x, sigma, ctx)
    from_files = apply(blended(base, paths[:2], w, lam), x, sigma, ctx)
    assert (got - want).abs().max().item() <= 2e-5 * max(1.0, want.abs().max().item())
    assert (from_files - want).abs().max().item() > 1e-3  # the override matters


@pytest.mark.parametrize("mode,batch", [("exact", True), ("sequential", None)])
def test_controlnet_residuals_reach_every_model(setup, mode, batch):
    """ControlNet-style residuals (popped off lists by the UNet) are repeated along the batch in
    exact mode and handed afresh to every forward in sequential mode."""
    base, paths = setup
    x, sigma, ctx = inputs()
    g = torch.Generator().manual_seed(9)
    residual = lambda: torch.randn(2, 320, 8, 8, generator=g) * 0.5  # noqa: E731
    parts = {"input": [residual(), residual()], "middle": [residual()], "output": [residual(), residual()]}
    control = lambda: {k: list(v) for k, v in parts.items()}  # noqa: E731  (each forward pops its own copy)
    w, lam = [0.6, 0.4], 0.7
    c = blend_coefficients(w, [1e-4, 1e-4], lam)
    eps_base = apply(base, x, sigma, ctx, control=control())
    eps_i = [apply(stock_lora_model(base, p), x, sigma, ctx, control=control()) for p in paths[:2]]
    want = eps_base + sum(ci * (e - eps_base) for ci, e in zip(c, eps_i))
    got = apply(blended(base, paths[:2], w, lam, mode, batch_segments=batch), x, sigma, ctx, control=control())
    assert (apply(base, x, sigma, ctx) - eps_base).abs().max() > 1e-2  # the residuals matter
    assert (got - want).abs().max().item() <= 2e-5 * max(1.0, want.abs().max().item())


def test_input_model_is_never_changed(setup):
    base, paths = setup
    x, sigma, ctx = inputs()
    before = apply(base, x, sigma, ctx)
    wrappers_before = {k: {kk: list(v) for kk, v in d.items()} for k, d in base.wrappers.items()}
    apply(blended(base, paths, [1, 1, 1], 1.0), x, sigma, ctx)
    after = apply(base, x, sigma, ctx)
    assert torch.equal(before, after)
    assert {k: {kk: list(v) for kk, v in d.items()} for k, d in base.wrappers.items()} == wrappers_before


def test_batch_contract_for_wrappers_and_attention_patches_below(setup):
    """Packs below the blend see repeated chunks with cond_or_uncond values 0/1 only, and an
    IPAdapter-style attn2 patch indexing a two-tuple with them keeps working."""
    base, paths = setup
    model = blended(base, paths, [0.3, 0.3, 0.4], 1.5, batch_segments=True)
    seen = []

    def probe(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        cou = transformer_options["cond_or_uncond"]
        seen.append((x.shape[0], list(cou), c_crossattn.shape[0]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    attn_calls = []

    def attn2_patch(q, k, v, extra_options):
        pair = ("uncond_scale", "cond_scale")
        names = [pair[i] for i in extra_options["cond_or_uncond"]]
        assert q.shape[0] % len(names) == 0
        attn_calls.append(len(names))
        return q, k, v

    model = model.clone()
    model.set_model_attn2_patch(attn2_patch)
    x, sigma, ctx = inputs(batch=2)
    apply(model, x, sigma, ctx, cond_or_uncond=(1, 0), extra_wrappers=[("probe", probe)])
    assert seen == [(8, [1, 0] * 4, 8)]  # base + 3 LoRAs in one forward, chunks repeated
    assert attn_calls and set(attn_calls) == {8}


def test_cpu_default_evaluates_models_one_after_the_other(setup):
    base, paths = setup
    batches = []

    def probe(executor, x, *args, **kwargs):
        batches.append(x.shape[0])
        return executor(x, *args, **kwargs)

    x, sigma, ctx = inputs()
    apply(blended(base, paths, [0.3, 0.3, 0.4], 1.5), x, sigma, ctx, extra_wrappers=[("probe", probe)])
    assert batches == [2, 2, 2, 2]


def test_memory_fallback_chunks_the_segments(setup, monkeypatch):
    """When (m+1)*B does not fit, the forward is split; the result is unchanged."""
    import comfy.model_management

    base, paths = setup
    model = blended(base, paths, [0.3, 0.3, 0.4], 1.5, batch_segments=True)
    x, sigma, ctx = inputs()
    full = apply(model, x, sigma, ctx)
    batches = []

    def probe(executor, x, *args, **kwargs):
        batches.append(x.shape[0])
        return executor(x, *args, **kwargs)

    need_two = model.model.memory_required([4, 4, 8, 8]) * 1.5 + 1
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda dev=None, torch_free_too=False: (need_two, need_two) if torch_free_too else need_two)
    chunked = apply(model, x, sigma, ctx, extra_wrappers=[("probe", probe)])
    assert batches == [4, 4]
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)


def test_out_of_memory_in_a_stacked_forward_falls_back_to_smaller_chunks(setup, caplog):
    """ComfyUI's estimate said 4 models fit, the forward says otherwise (simulated below the blend):
    the blend retries with 2 per forward, warns, and stays at 2 on later calls; the output is bit-identical
    to a blend told to stack 2 from the start."""
    import comfy.patcher_extension

    from diffusion_blend.nodes.comfy_wrapper import WRAPPER_KEY

    base, paths = setup
    x, sigma, ctx = inputs()
    batches = []

    def tight_memory(executor, x, *args, **kwargs):
        batches.append(x.shape[0])
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 20.00 MiB")
        return executor(x, *args, **kwargs)

    model = blended(base, paths, [0.3, 0.3, 0.4], 1.5, batch_segments=True)
    (wrapper,) = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    with caplog.at_level("WARNING"):
        first = apply(model, x, sigma, ctx, extra_wrappers=[("tight", tight_memory)])
    assert batches == [8, 4, 4] and wrapper.segments_cap == 2
    assert "ran out of memory; retrying with 2 per forward" in caplog.text
    second = apply(model, x, sigma, ctx, extra_wrappers=[("tight", tight_memory)])
    assert batches == [8, 4, 4, 4, 4]  # the smaller count is kept
    reference = blended(base, paths, [0.3, 0.3, 0.4], 1.5, batch_segments=True)
    for w in reference.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        w.segments_cap = 2
    want = apply(reference, x, sigma, ctx)
    assert torch.equal(first, want) and torch.equal(second, want)
