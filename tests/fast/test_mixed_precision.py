"""`contract`, the matmul every Dense runs: bf16 products with float32 accumulation, and its
hand-written backward pass against autodiff of the same contraction in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnx_caption.layers import contract


@pytest.mark.parametrize("out_shape", [(7,), (2, 7)])  # e.g. Dense(E, F), Dense(E, (3, H, D))
@pytest.mark.parametrize("n_in", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_contract_gradients_match_autodiff(n_in, dtype, out_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 4, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((4, 6)[2 - n_in :] + out_shape), jnp.float32)
    x = x if n_in == 2 else x[..., 0, :]
    probe = jnp.asarray(rng.standard_normal((*x.shape[: x.ndim - n_in], *out_shape)), jnp.float32)

    def ours(x, kernel):
        return jnp.sum(contract(x, kernel, n_in, dtype) * probe)

    def reference(x, kernel):  # float32 autodiff of the same contraction
        return jnp.sum(jnp.tensordot(x, kernel, axes=n_in) * probe)

    got = jax.grad(ours, argnums=(0, 1))(x, kernel)
    want = jax.grad(reference, argnums=(0, 1))(x, kernel)
    # bf16 rounds each operand to 8 bits of mantissa; float32 is exact to rounding.
    rtol = 1e-6 if dtype == jnp.float32 else 2e-2
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.float32 and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())
    assert contract(x, kernel, n_in, dtype).dtype == jnp.float32


def test_backward_matmuls_run_in_the_compute_dtype():
    """The point of the hand-written backward: in bf16, every dot of the gradient takes bf16
    operands (autodiff would upcast them to float32)."""
    x, kernel = jnp.ones((8, 16)), jnp.ones((16, 32))
    grad = jax.grad(lambda x, k: contract(x, k, 1, jnp.bfloat16).sum(), argnums=(0, 1))
    hlo = jax.jit(grad).lower(x, kernel).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line and "=" in line]
    assert len(dots) == 2
    for line in dots:
        operands = line.split("(", 1)[1]
        assert operands.count("bf16") == 2, line
