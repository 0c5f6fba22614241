import math

import pytest

from diffusion_blend.blend.coefficients import BlendInputError, affine_coefficients, blend_coefficients


def reference(w, a, lam, normalize):
    """Independent transcription of the paper's definitions (alpha = alpha_bar / lambda)."""
    wt = [x / sum(w) for x in w] if normalize else list(w)
    alpha_bar = sum(x * y for x, y in zip(wt, a)) / sum(wt)
    alpha = alpha_bar / lam
    return [x * y / alpha for x, y in zip(wt, a)]


@pytest.mark.parametrize("w,a,lam,normalize", [
    ([1.0], [1e-4], 1.0, True),
    ([0.3, 0.7], [1e-4, 1e-4], 0.5, True),
    ([0.2, 0.5, 0.3], [1e-4, 2e-4, 5e-5], 2.0, True),
    ([2.0, -0.5], [1e-3, 1e-4], 1.3, False),
    ([1.0, 1.0], [0.1, 0.3], 4.0, False),
])
def test_matches_definition(w, a, lam, normalize):
    got = blend_coefficients(w, a, lam, normalize)
    want = reference(w, a, lam, normalize)
    assert got == pytest.approx(want, rel=1e-12)


def test_single_basis_as_trained_is_the_lora_itself():
    assert blend_coefficients([1.0], [3e-4], 1.0) == [1.0]
    assert affine_coefficients([1.0]) == [0.0, 1.0]


def test_kl_scale_zero_is_base():
    assert blend_coefficients([0.3, 0.7], [1e-4, 2e-4], 0.0) == [0.0, 0.0]
    assert affine_coefficients([0.0, 0.0]) == [1.0, 0.0, 0.0]


def test_db_mpa_at_lambda_one_needs_no_base_forward():
    c = blend_coefficients([0.25, 0.75], [1e-4, 3e-4], 1.0, True)
    assert math.fsum(c) == pytest.approx(1.0, abs=1e-15)
    assert affine_coefficients(c)[0] == 0.0


def test_equal_alpha_refs_give_lambda_times_normalized_weights():
    assert blend_coefficients([1, 3], [1e-4, 1e-4], 0.8) == pytest.approx([0.2, 0.6])


@pytest.mark.parametrize("kwargs,match", [
    (dict(weights=[1, -1], alpha_refs=[1e-4, 1e-4], kl_scale=1.0, normalize=True), "weight"),
    (dict(weights=[1], alpha_refs=[1e-4], kl_scale=-1.0), "kl_scale"),
    (dict(weights=[1], alpha_refs=[0.0], kl_scale=1.0), r"alpha_ref\[0\]"),
    (dict(weights=[float("nan")], alpha_refs=[1e-4], kl_scale=1.0), r"weight\[0\]"),
    (dict(weights=[1], alpha_refs=[1e-4], kl_scale=float("inf")), "kl_scale"),
    (dict(weights=[], alpha_refs=[], kl_scale=1.0), "basis"),
    (dict(weights=[1, 1], alpha_refs=[1e-4], kl_scale=1.0), "alpha_ref"),
])
def test_bad_inputs_name_the_input(kwargs, match):
    with pytest.raises(BlendInputError, match=match):
        blend_coefficients(**kwargs)
