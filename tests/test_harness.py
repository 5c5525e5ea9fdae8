"""The shared comparison must be able to fail: a slightly wrong op is caught, in output and gradient."""
import pytest
import torch

from pf_kernels import reference
from tests.cases import assert_matches_reference, backproj_inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_harness_accepts_the_reference_and_catches_errors(dtype):
    args = backproj_inputs(3, (4,), 5, 6, 7, True, dtype)
    assert_matches_reference(reference.backproj_concat, reference.backproj_concat, args)

    def off_by_a_bit(x, z, w, b):
        return reference.backproj_concat(x, z, w * 1.05, b)

    with pytest.raises(AssertionError):
        assert_matches_reference(off_by_a_bit, reference.backproj_concat, args)

    def wrong_gradient(x, z, w, b):
        out = reference.backproj_concat(x, z, w, b)
        return out + 0.1 * (out - out.detach())

    with pytest.raises(AssertionError, match="grad"):
        assert_matches_reference(wrong_gradient, reference.backproj_concat, args)
