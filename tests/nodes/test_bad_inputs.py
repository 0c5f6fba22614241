"""Bad inputs give a clear node error naming the input, and the server keeps serving."""

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_blend.client.api import ComfyError

from hostkit import blend_chain, run, sample_graph

GOOD = "bad_inputs_good.safetensors"


@pytest.fixture(scope="module")
def bad_files(models_dir, make_lora):
    loras = models_dir / "loras"
    make_lora(GOOD, seed=31)
    make_lora("bad_inputs_no_alpha_ref.safetensors", seed=32, alpha_ref=None)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    # SD2-style cross-attention (context 1024) on an SD1 model: shapes mismatch
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 1024), f"{key}.lora_up.weight": torch.zeros(320, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(loras / "bad_other_arch.safetensors"),
              metadata={"db.alpha_ref": "1e-4"})
    missing = "lora_unet_down_blocks_3_attentions_1_proj_in"
    save_file({f"{missing}.lora_down.weight": torch.zeros(4, 1280), f"{missing}.lora_up.weight": torch.zeros(1280, 4)},
              str(loras / "bad_no_such_layer.safetensors"), metadata={"db.alpha_ref": "1e-4"})
    save_file({f"{key}.lora_down.weight": torch.full((4, 768), float("nan")), f"{key}.lora_up.weight": torch.zeros(320, 4)},
              str(loras / "bad_nan.safetensors"), metadata={"db.alpha_ref": "1e-4"})
    good = (loras / GOOD).read_bytes()
    (loras / "bad_truncated.safetensors").write_bytes(good[: len(good) // 3])
    (loras / "bad_pickle.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    return loras


CASES = {
    "other_arch": (dict(bases=[("bad_other_arch.safetensors", 1.0)]),
                   r"bad_other_arch\.safetensors: module 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k' "
                   r"has up \(320, 4\) / down \(4, 1024\), but the model's weight there is \(320, 768\); this model "
                   r"was detected as SD15"),
    "no_such_layer": (dict(bases=[("bad_no_such_layer.safetensors", 1.0)]),
                      r"bad_no_such_layer\.safetensors: 2 of its 2 keys match no layer of this model \(detected as SD15\), "
                      r"e\.g\. 'lora_unet_down_blocks_3_attentions_1_proj_in\.lora_down\.weight'"),
    "truncated": (dict(bases=[("bad_truncated.safetensors", 1.0)]), r"bad_truncated\.safetensors: .*truncated or corrupt"),
    "pickle": (dict(bases=[("bad_pickle.ckpt", 1.0)]), r"bad_pickle\.ckpt: pickle-based LoRA files are refused"),
    "nan": (dict(bases=[("bad_nan.safetensors", 1.0)]), r"bad_nan\.safetensors: .*contains NaN or inf"),
    "weights_sum_zero": (dict(bases=[(GOOD, 1.0), (GOOD, -1.0)]), r"weight: the weights sum to 0"),
    "no_alpha_ref": (dict(bases=[("bad_inputs_no_alpha_ref.safetensors", 1.0)]), r"alpha_ref: .*has no db\.alpha_ref"),
    "negative_kl_scale": (dict(bases=[(GOOD, 1.0)], kl_scale=-0.5), r"kl_scale"),
    "stochastic_negative": (dict(bases=[(GOOD, 1.0), (GOOD, 1.0)], kl_scale=3.0, normalize=False, mode="stochastic"),
                            r"mode=stochastic: the coefficient of the base model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error_and_the_server_survives(comfy_server, bad_files, case):
    kwargs, match = CASES[case]
    bases = kwargs.pop("bases")
    with pytest.raises(ComfyError, match=match):
        run(comfy_server, sample_graph(blend_chain(bases, **kwargs), seed=1, steps=1))
    assert comfy_server.proc.poll() is None
    ok = run(comfy_server, sample_graph(blend_chain([(GOOD, 1.0)]), seed=1, steps=1))
    assert ok["latent"] is not None


def test_a_lora_rewritten_or_truncated_on_disk_counts_as_a_change(comfy_server, bad_files, diffusers_unet):
    """ComfyUI caches a node's output while its inputs are the same: a basis file rewritten under the same
    name must be read again (new weights, new images), a truncated one refused naming it, not served from
    the cache."""
    import os

    import tiny_fixtures

    name = "rewritten_on_disk.safetensors"
    path = bad_files / name
    graph = lambda: sample_graph(blend_chain([(name, 1.0)]), seed=1, steps=1)  # noqa: E731
    tiny_fixtures.make_basis_lora(diffusers_unet, path, seed=41)
    first = run(comfy_server, graph())
    assert torch.equal(run(comfy_server, graph())["latent"], first["latent"])  # unchanged: the same result
    stat = path.stat()
    tiny_fixtures.make_basis_lora(diffusers_unet, path, seed=42)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later time even on coarse clocks
    second = run(comfy_server, graph())
    assert not torch.equal(second["latent"], first["latent"])
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])
    with pytest.raises(ComfyError, match=r"rewritten_on_disk\.safetensors: .*truncated or corrupt"):
        run(comfy_server, graph())
    path.write_bytes(good)
    assert torch.equal(run(comfy_server, graph())["latent"], second["latent"])



DROPDOWNS = {
    "lora_name": (dict(bases=[("no_such_lora.safetensors", 1.0)]), r"lora_name='no_such_lora\.safetensors': expected one of"),
    "mode": (dict(bases=[(GOOD, 1.0)], mode="exact_please"),
             r"mode='exact_please': expected one of 'exact', 'sequential', 'merged', 'stochastic'"),
}


@pytest.mark.parametrize("case", list(DROPDOWNS))
def test_a_dropdown_value_the_node_does_not_offer_is_refused_before_anything_runs(comfy_server, bad_files, case):
    """The nodes are V3: a dropdown is ("COMBO", {"options": ...}), which ComfyUI 0.3.75 does not check
    against its options; the nodes' validate_inputs does, so a saved workflow or API call with a value
    the node does not offer is refused at submission (nothing queued) on every host."""
    kwargs, match = DROPDOWNS[case]
    bases = kwargs.pop("bases")
    prompt = sample_graph(blend_chain(bases, **kwargs), seed=1, steps=1).prompt()
    with pytest.raises(ComfyError, match=r"HTTP 400: .*" + match):
        comfy_server.client.submit(prompt)
    assert comfy_server.proc.poll() is None


def test_a_lora_deleted_while_queued_fails_that_prompt_only(comfy_server, bad_files, diffusers_unet):
    """A basis file removed while its prompt waits in the queue: that prompt fails naming the file; the
    prompt running before it and the one queued after it complete, the latter bit-identical to its run
    alone."""
    import tiny_fixtures

    name = "deleted_while_queued.safetensors"
    tiny_fixtures.make_basis_lora(diffusers_unet, bad_files / name, seed=43)
    client = comfy_server.client
    after = sample_graph(blend_chain([(GOOD, 0.5)]), seed=3, steps=1)
    alone = run(comfy_server, after)
    first = client.submit(sample_graph(blend_chain([(GOOD, 1.0)]), seed=2, steps=40).prompt())  # a while
    doomed = client.submit(sample_graph(blend_chain([(name, 1.0)]), seed=1, steps=1).prompt())
    last = client.submit(after.prompt())
    (bad_files / name).unlink()
    pending = [item[1] for item in client.get("/queue")["queue_pending"]]
    assert doomed in pending  # it was removed while the prompt waited
    client.wait(first)
    with pytest.raises(ComfyError, match=r"lora_name='deleted_while_queued\.safetensors': no such file in ComfyUI's "
                                         r"loras folders"):
        client.wait(doomed)
    result = client.wait(last)
    latent = next(load_file(str(comfy_server.output_dir / e.get("subfolder", "") / e["filename"]))["latent_tensor"]
                  for out in result.history["outputs"].values() for e in out.get("latents", []))
    assert torch.equal(latent, alone["latent"])
