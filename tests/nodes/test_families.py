"""The blend on every model family ComfyUI runs, with every LoRA key format and adapter kind its
stock loader accepts; the stock loader (``comfy.sd.load_lora_for_models``) is the oracle.

Tiny random SDXL, SD3, SD3.5, Flux-dev and Qwen-Image models (``families.py`` says which are
detected by ComfyUI and shrunk after detection, and why SDXL is built directly) and LoRA files
generated from ComfyUI's own key map (``lora_formats.py``).  For every (family, format, adapter):

* the blend at w = e_1, lambda = 1 equals the stock loader's model at strength 1, merged into the
  weights at load (the default when no step evaluates the base) and in the hooks;
* lambda = 0 equals the base model;
* m = 2 equals the affine combination of the two stock-loaded predictions, in the batched
  (one forward for all models) and the sequential path, and at lambda = 1 (LoRA 1 merged, LoRA 2
  relative to it: negative gains on LoRA 1's terms);
* one model per forward, low-rank deltas on the layers' outputs and on ComfyUI's per-call
  weights (``LowRankBank.low_rank_side``), and merged copies of the weights swapped in
  (``LowRankBank.swap_budget_bytes``, the CPU's default) agree alike;

and per family a few real sampling steps (``comfy.sample.sample``, CFG > 1) agree with the stock
loader's.  The matrix is the parity table of docs/lora_formats.md.
"""

from __future__ import annotations

import pytest
import torch

import tiny_families as families
import lora_formats

from diffusion_blend.blend.coefficients import blend_coefficients

#: (family, key format, adapter kind): every key format with plain LoRAs, every adapter kind with
#: ComfyUI's generic names and with diffusers names (slices of fused weights for Flux)
MATRIX = [(fam, fmt, "lora") for fmt, (_, fams) in lora_formats.FORMATS.items() for fam in fams]
MATRIX += [(fam, "comfyui", kind) for fam in families.FAMILIES for kind in ("loha", "lokr", "dora", "diff")]
MATRIX += [("SDXL", "comfyui", "locon"), ("Flux", "diffusers transformer.*", "loha"),
           ("SD3", "diffusers transformer.*", "lokr")]
MATRIX.sort(key=lambda row: families.FAMILIES.index(row[0]))

TOL = 2e-5  # relative to the prediction's scale: float32 round-off of W x + dW x against (W + dW) x


@pytest.fixture(scope="module")
def models(comfy_inprocess):
    return {}


def family(models, name: str) -> families.Family:
    if name not in models:
        models[name] = families.build(name)
    return models[name]


def stock(base, path, strength: float = 1.0):
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    return comfy.sd.load_lora_for_models(base, None, sd, strength, 0)[0]


def oracle_file(path, fmt: str, tmp_path):
    """The file the stock loader reads as the same LoRA: the project's own peft names
    (``unet.<diffusers path>``), which ComfyUI maps only as ``.processor.`` names for attention,
    renamed to kohya's ``lora_unet_<diffusers path>`` (ComfyUI maps those for every layer)."""
    if fmt != "project peft unet.*":
        return path
    from safetensors.torch import load_file, save_file

    renamed = {}
    for key, t in load_file(str(path)).items():
        module, _, suffix = key.partition(".lora_")
        suffix = ".lora_" + suffix if suffix else ""
        if not suffix:
            module, suffix = key.rsplit(".", 1)[0], "." + key.rsplit(".", 1)[1]
        renamed["lora_unet_" + module[len("unet."):].replace(".", "_") + suffix] = t
    out = tmp_path / ("oracle-" + path.name)
    save_file(renamed, str(out))
    return out


def blended(base, paths, weights, kl_scale, mode="exact", batch_segments=None, side="auto", merge_static=True,
            swap=None):
    """The node's model; ``swap`` (bytes) sets the bank's swap budget (None: the node's default)."""
    import comfy.patcher_extension

    from diffusion_blend.blend.basis import make_basis
    from diffusion_blend.blend.lora_file import read_lora
    from diffusion_blend.nodes.blend_nodes import blend_model
    from diffusion_blend.nodes.comfy_wrapper import WRAPPER_KEY

    basis = tuple(make_basis(read_lora(p, strict=False), w) for p, w in zip(paths, weights))
    model = blend_model(base, basis, kl_scale, True, mode, merge_static=merge_static)
    for wrapper in model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        wrapper.batch_segments = batch_segments
        wrapper.bank.low_rank_side = side
        if swap is not None:
            wrapper.bank.swap_budget_bytes = swap
    return model


def bank_of(model):
    import comfy.patcher_extension

    from diffusion_blend.nodes.comfy_wrapper import WRAPPER_KEY

    return model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)[0].bank


def close(got, want) -> float:
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


@pytest.mark.parametrize("fam,fmt,kind", MATRIX, ids=[f"{a}-{b.split()[0]}-{c}" for a, b, c in MATRIX])
def test_blend_equals_the_stock_loader(models, tmp_path, fam, fmt, kind):
    f = family(models, fam)
    base = f.patcher
    files = [lora_formats.write_file(tmp_path / f"b{s}.safetensors", base.model, fmt, kind, seed=s) for s in (1, 2)]
    x, sigma, cond = f.make_inputs(2)
    eps_base = families.apply(base, x, sigma, cond)
    eps = [families.apply(stock(base, oracle_file(p, fmt, tmp_path)), x, sigma, cond) for p in files]
    effect = (eps[0] - eps_base).abs().max().item()
    assert effect > 1e-3, f"the {kind} file barely changes the model ({effect:.2e}): the check would be vacuous"

    # w = e_1, lambda = 1: LoRA 1 exactly -- merged into the weights at load (the default: the plan
    # never evaluates the base), and in the hooks with the low-rank deltas on the layers' outputs
    # and on ComfyUI's per-call weights (dense adapters always go there)
    got = families.apply(blended(base, files[:1], [1.0], 1.0), x, sigma, cond)
    assert close(got, eps[0]) <= TOL, ("resident", close(got, eps[0]))
    for side, swap in (("output", 0), ("weight", 0), ("auto", 2**30)):
        got = families.apply(blended(base, files[:1], [1.0], 1.0, side=side, merge_static=False, swap=swap),
                             x, sigma, cond)
        assert close(got, eps[0]) <= TOL, (side, swap, close(got, eps[0]))
    # lambda = 0: the base model
    assert close(families.apply(blended(base, files[:1], [1.0], 0.0), x, sigma, cond), eps_base) <= 1e-6
    # m = 2: the affine combination of the stock predictions, batched and sequential
    w, lam = [0.3, 0.7], 0.8
    c = blend_coefficients(w, [0.5, 0.5], lam)
    want = eps_base + sum(ci * (e - eps_base) for ci, e in zip(c, eps))
    for mode, batch, side, swap in (("exact", True, "auto", None), ("sequential", None, "output", 0),
                                    ("sequential", None, "weight", 0), ("sequential", None, "auto", 2**30)):
        model = blended(base, files, w, lam, mode, batch, side, swap=swap)
        got = families.apply(model, x, sigma, cond)
        assert close(got, want) <= TOL, (mode, side, swap, close(got, want))
        assert (bank_of(model).swapped_bytes > 0) == bool(swap), (mode, side, swap)  # the path it names ran
    # lambda = 1: the base drops out, LoRA 1 is merged at load and LoRA 2 runs relative to it
    # (its terms minus LoRA 1's), batched and sequential
    c = blend_coefficients(w, [0.5, 0.5], 1.0)
    want = sum(ci * e for ci, e in zip(c, eps))
    for batch in (True, False):
        got = families.apply(blended(base, files, w, 1.0, "exact", batch), x, sigma, cond)
        assert close(got, want) <= TOL, ("resident + relative", batch, close(got, want))
    # the merge with equal weights (equal gains of two bases on every layer), merged at load and in the hooks
    got = families.apply(blended(base, files, [0.5, 0.5], 0.5, "merged"), x, sigma, cond)
    want = families.apply(blended(base, files, [0.5, 0.5], 0.5, "merged", merge_static=False), x, sigma, cond)
    assert (got - eps_base).abs().max() > 1e-3 and close(got, want) <= TOL, ("merged at load", close(got, want))


def test_slices_and_key_transforms_stay_low_rank(models, tmp_path):
    """Flux's diffusers q/k/v (and proj_mlp) slices of one fused weight become one low-rank product
    on that layer (ranks concatenated); SD3's ``swap_scale_shift`` moves rows of the up factor."""
    from diffusion_blend.blend.lora_file import read_lora
    from diffusion_blend.nodes.comfy_wrapper import host_deltas

    flux = family(models, "Flux").patcher
    path = lora_formats.write_file(tmp_path / "flux.safetensors", flux.model, "diffusers transformer.*", seed=3)
    deltas = host_deltas(flux, read_lora(path, strict=False))
    qkv = deltas["double_blocks.0.img_attn.qkv"]
    assert qkv.weight is None and qkv.low_rank.rank == 3 * 2  # to_q, to_k, to_v at rank 2
    single = deltas["single_blocks.0.linear1"]
    names = lora_formats.names_for(flux.model, "diffusers transformer.*")
    on_linear1 = [n for n, t in names.items() if lora_formats._module_key(t)[0].endswith("single_blocks.0.linear1.weight")]
    # q, k, v and proj_mlp slices (v0.33.0's key map adds Flux 2's fused name for the whole weight)
    assert len(on_linear1) >= 4 and single.weight is None and single.low_rank.rank == 2 * len(on_linear1)
    sd3 = family(models, "SD3").patcher
    path = lora_formats.write_file(tmp_path / "sd3.safetensors", sd3.model, "diffusers transformer.*", seed=4)
    deltas = host_deltas(sd3, read_lora(path, strict=False))
    assert all(d.weight is None for d in deltas.values())
    assert "final_layer.adaLN_modulation.1" in deltas  # norm_out.linear, via swap_scale_shift


def test_dense_adapters_report_their_memory(models, tmp_path):
    """LoHa/LoKr/DoRA/diff become dense deltas (computed by ComfyUI's own adapters); the bank says
    how many bytes they hold, one weight-sized tensor per adapted layer."""
    from diffusion_blend.blend.lora_file import read_lora
    from diffusion_blend.nodes.comfy_wrapper import bind_bank

    base = family(models, "Flux").patcher
    path = lora_formats.write_file(tmp_path / "loha.safetensors", base.model, "comfyui", "loha", seed=5)
    bank = bind_bank(base, [read_lora(path, strict=False)])
    weights = sum(base.model.diffusion_model.get_submodule(p).weight.numel() * 4 for p in bank.paths)
    assert bank.dense_bytes() == weights > 0


def test_a_lora_for_another_family_names_the_family_and_keys(models, tmp_path):
    """Keys no layer claims are listed (a few) with the detected family; keys that name a layer of
    another shape (SD3's and Flux's diffusers names overlap) say which shapes differ."""
    from diffusion_blend.blend.lora_file import LoraFormatError, read_lora
    from diffusion_blend.nodes.comfy_wrapper import bind_bank

    sdxl = family(models, "SDXL").patcher
    qwen = family(models, "QwenImage").patcher
    path = lora_formats.write_file(tmp_path / "qwen.safetensors", qwen.model, "diffusers transformer.*", seed=6)
    with pytest.raises(LoraFormatError) as err:
        bind_bank(sdxl, [read_lora(path, strict=False)])
    message = str(err.value)
    assert "qwen.safetensors" in message and "detected as SDXL" in message
    assert "'transformer." in message and "more;" in message

    sd3 = family(models, "SD3").patcher
    flux = family(models, "Flux").patcher
    shared = set(lora_formats.names_for(flux.model, "diffusers transformer.*"))
    for kind in ("lora", "loha"):
        path = lora_formats.write_file(tmp_path / f"sd3-{kind}.safetensors", sd3.model, "diffusers transformer.*",
                                       kind, seed=6, only=shared)
        with pytest.raises(LoraFormatError) as err:
            bind_bank(flux, [read_lora(path, strict=False)])
        message = str(err.value)
        assert f"sd3-{kind}.safetensors" in message and "detected as Flux" in message and "(64, 64)" in message


def _cond(fam: str, f: families.Family, batch: int, seed: int):
    x, _, c = f.make_inputs(batch, seed)
    extra = {}
    if "y" in c:
        extra["pooled_output"] = c["y"]
    if "guidance" in c:
        extra["guidance"] = 3.5
    return [[c["c_crossattn"], extra]], x


@pytest.mark.parametrize("fam", families.FAMILIES)
def test_a_few_sampling_steps_agree_with_the_stock_loader(models, tmp_path, fam, monkeypatch):
    """``comfy.sample.sample`` (euler, 3 steps, CFG 2.5) on the blend at w = e_1 and on the stock
    loader's model give the same latent.  SDXL's tiny label embedding is 48 wide, not the 2816 of
    ComfyUI's size conditioning, so its ``encode_adm`` returns the pooled vector as is."""
    import comfy.sample

    f = family(models, fam)
    base = f.patcher
    if fam == "SDXL":
        monkeypatch.setattr(base.model, "encode_adm", lambda **kw: kw["pooled_output"])
    path = lora_formats.write_file(tmp_path / "s.safetensors", base.model, "comfyui", "lora", seed=7)
    positive, latent = _cond(fam, f, 1, 1)
    negative, _ = _cond(fam, f, 1, 2)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    run = lambda model: comfy.sample.sample(model, noise, 3, 2.5, "euler", "simple", positive, negative,  # noqa: E731
                                            torch.zeros_like(latent), seed=5, disable_pbar=True)
    want = run(stock(base, path))
    got = run(blended(base, [path], [1.0], 1.0))
    plain = run(base)
    assert close(got, want) <= 1e-4
    assert close(plain, want) > 1e-3  # the LoRA changes the samples


def test_the_swap_budget_follows_the_device_and_the_environment(comfy_inprocess, monkeypatch):
    """Merged copies are swapped in by default on the CPU only (at most 2 GiB, a quarter of RAM,
    one pool shared by every blend);
    ``DIFFUSION_BLEND_SWAP_MB`` sets the budget on any device (0: never), and a value that is not
    a number is refused with the variable's name."""
    from diffusion_blend.nodes.comfy_wrapper import SWAP_ENV, swap_budget, swap_pool

    monkeypatch.delenv(SWAP_ENV, raising=False)
    assert 0 < swap_budget(torch.device("cpu")) <= 2 * 2**30
    assert swap_budget(torch.device("cuda", 0)) == 0
    pool = swap_pool(torch.device("cpu"))  # one pool for every blend on the CPU
    assert pool is swap_pool(torch.device("cpu")) and pool.budget_bytes == swap_budget(torch.device("cpu"))
    assert swap_pool(torch.device("cuda", 0)) is None
    monkeypatch.setenv(SWAP_ENV, "0")
    assert swap_budget(torch.device("cpu")) == 0 and swap_pool(torch.device("cpu")) is None
    monkeypatch.setenv(SWAP_ENV, "512")
    assert swap_budget(torch.device("cuda", 0)) == 512 * 2**20
    monkeypatch.setenv(SWAP_ENV, "lots")
    with pytest.raises(ValueError, match=SWAP_ENV):
        swap_budget(torch.device("cpu"))


@pytest.mark.parametrize("fam", ["SD3", "Flux"])
def test_the_smc_sampler_node_on_flow_models_is_comfys_euler_ancestral(models, fam):
    """The SMC sampler node inside ``comfy.sample.sample_custom`` on a flow model (ComfyUI's
    ``model_sampling`` CONST): with a zero reward weight nothing is reweighted or resampled, so its
    chain must be ComfyUI's own ``euler_ancestral`` (the rectified-flow form) on the same noise and
    seed -- which it is only if the node detects the flow parametrisation.  Particles: a batch of 4."""
    import comfy.sample
    import comfy.samplers

    from diffusion_blend.nodes.smc_nodes import smc_sampler

    f = family(models, fam)
    positive, latent = _cond(fam, f, 4, 1)
    negative, _ = _cond(fam, f, 4, 2)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    sigmas = comfy.samplers.calculate_sigmas(f.patcher.get_model_object("model_sampling"), "simple", 4)
    assert float(sigmas[0]) == pytest.approx(1.0)  # the flow schedule starts at pure noise

    def run(sampler):
        return comfy.sample.sample_custom(f.patcher, noise, 2.5, sampler, sigmas, positive, negative,
                                          torch.zeros_like(latent), seed=5, disable_pbar=True)

    smc, log = smc_sampler(None, score_every=1, resample_below=0.5, eta=1.0,
                                                      rewards="brightness:0", alpha=1.0)
    ours = run(smc)
    stock = run(comfy.samplers.ksampler("euler_ancestral", {"eta": 1.0, "s_noise": 1.0}))
    assert close(ours, stock) <= 1e-5
    assert log.particles == 4 and [e["step"] for e in log.steps if e["resampled"]] == [4]
