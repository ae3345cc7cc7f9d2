import math

import pytest

from hf_emergence.schedule import exponents, middle_shrink, scale_factor


@pytest.mark.parametrize("L, variant, expected", [
    (1, "skip0", [0]),
    (2, "skip0", [-1, 1]),
    (3, "skip0", [-1, 0, 1]),
    (4, "skip0", [-2, -1, 1, 2]),
    (5, "half", [-2, -1, 0, 1, 2]),          # odd depth ignores the even-depth variant
    (4, "half", [-1.5, -0.5, 0.5, 1.5]),
    (4, "floor", [-2, -1, 0, 1]),
    (6, "skip0", [-3, -2, -1, 1, 2, 3]),
])
def test_exponents(L, variant, expected):
    assert exponents(L, variant) == expected


@pytest.mark.parametrize("L", range(1, 12))
@pytest.mark.parametrize("variant", ["skip0", "half"])
def test_symmetric_variants_cancel(L, variant):
    ks = exponents(L, variant)
    assert sum(ks) == 0                                     # prod(alpha**k) == 1: the chain's gain is unchanged
    assert ks == sorted(ks) and len(set(ks)) == L           # strictly increasing: early shrink, late grow


def test_floor_variant_shrinks_whole_chain():
    assert sum(exponents(6, "floor")) == -3


def test_explicit_pivot():
    assert exponents(5, pivot=1) == [-1, 0, 1, 2, 3]
    assert exponents(4, pivot=-1) == [-3, -2, -1, 0]
    with pytest.raises(ValueError, match="pivot=5 is outside a chain of 5 layers"):
        exponents(5, pivot=5)


def test_scale_factor_modes():
    assert scale_factor(1.2, 2) == pytest.approx(1.44)
    assert scale_factor(1.2, 2, "variance") == pytest.approx(1.2)
    assert scale_factor(1.2, -1) == pytest.approx(1 / 1.2)
    with pytest.raises(ValueError, match="scale_mode='std'"):
        scale_factor(1.2, 1, "std")


@pytest.mark.parametrize("n", [2, 6, 9])
def test_middle_shrink_matches_closed_form(n):
    # method notes section 1.4: the smallest cumulative scale of a 2n+1 chain is alpha**(-n(n+1)/2)
    alpha = 1.1
    assert middle_shrink(alpha, exponents(2 * n + 1)) == pytest.approx(alpha ** (-n * (n + 1) / 2))
    assert math.isclose(middle_shrink(1.0, exponents(2 * n + 1)), 1.0)
