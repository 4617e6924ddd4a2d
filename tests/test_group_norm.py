"""The fused group normalisation (kernels/groupnorm.cpp) against float64: group sizes from one channel to many,
maps from a handful of positions to 256x256, batches, inputs whose mean dwarfs their spread (the single-pass
variance must not cancel), 1 and 2 threads, SIMD and scalar builds; with the ResNets' time embedding added first
and SiLU after, both folded into the node; ggml's ops (upstream's graph) through the same harness as a control."""

from __future__ import annotations

import numpy as np
import pytest

from pysdcpp.layers import group_norm

CASES = [  # (N, C, H, W), groups, offset of the input's mean
    ((2, 64, 17, 9), 32, 0.0),
    ((1, 320, 32, 32), 32, 5.0),
    ((1, 96, 5, 3), 3, -1e3),
    ((3, 32, 4, 4), 32, 0.0),
    ((1, 128, 256, 256), 32, 300.0),
]


def _reference(x, groups, gamma, beta, eps, offset=None, silu=False):
    n, c, h, w = x.shape
    xd = x.astype(np.float64)
    if offset is not None:
        xd = xd + offset.astype(np.float64)[:, :, None, None]
    xd = xd.reshape(n, groups, -1)
    norm = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + eps)
    y = norm.reshape(n, c, h, w) * gamma[None, :, None, None] + beta[None, :, None, None]
    return y / (1.0 + np.exp(-y)) if silu else y


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1]}")
@pytest.mark.parametrize("path", ["fast", "fast_scalar", "upstream"])
@pytest.mark.parametrize("threads", [1, 2])
def test_group_norm_against_float64(case, path, threads):
    shape, groups, offset = case
    rng = np.random.default_rng(shape[1] + groups)
    x = (rng.standard_normal(shape) * 3 + offset).astype(np.float32)
    gamma = rng.standard_normal(shape[1]).astype(np.float32)
    beta = rng.standard_normal(shape[1]).astype(np.float32)
    y, _ = group_norm(x, groups, gamma, beta, eps=1e-6, path=path, threads=threads)
    ref = _reference(x, groups, gamma, beta, 1e-6)
    # An F32 input with mean m and spread s carries |m| / s * 2^-24 relative error into the normalised values.
    bound = 2e-6 * max(1.0, abs(offset) / 3) * np.abs(gamma).max() + 1e-6
    err = np.abs(y - ref).max()
    assert err <= bound, f"max error {err:.2e} > {bound:.1e}"


def test_eps_is_applied():
    """A constant group (zero variance) normalises to beta: eps keeps the division finite, and sets the scale of
    the group that varies."""
    x = np.full((1, 4, 3, 3), 2.5, np.float32)
    x[0, 2:] += np.arange(9, dtype=np.float32).reshape(3, 3)   # the second group varies
    gamma, beta = np.ones(4, np.float32), np.arange(4, dtype=np.float32)
    y, _ = group_norm(x, 2, gamma, beta, eps=1e-2)
    ref = _reference(x, 2, gamma, beta, 1e-2)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1]}")
@pytest.mark.parametrize("path", ["fast", "fast_scalar", "upstream"])
@pytest.mark.parametrize("with_offset, silu", [(False, True), (True, True), (True, False)],
                         ids=["silu", "temb-silu", "temb"])
def test_time_embedding_and_silu_folded_in(case, path, with_offset, silu):
    """A ResNet's h + emb -> GroupNorm -> SiLU in one node: the per-(image, channel) offset moves each group's mean
    and spread (offsets of the data's own scale and larger), SiLU takes both tails."""
    shape, groups, offset = case
    rng = np.random.default_rng(shape[1] + groups + 7)
    x = (rng.standard_normal(shape) * 3 + offset).astype(np.float32)
    emb = (rng.standard_normal(shape[:2]) * 4).astype(np.float32) if with_offset else None
    gamma = (rng.standard_normal(shape[1]) * 3).astype(np.float32)
    beta = rng.standard_normal(shape[1]).astype(np.float32)
    y, _ = group_norm(x, groups, gamma, beta, eps=1e-6, offset=emb, silu=silu, path=path, threads=2)
    ref = _reference(x, groups, gamma, beta, 1e-6, emb, silu=silu)
    bound = 2e-6 * max(1.0, (abs(offset) + 12) / 3) * np.abs(gamma).max() + 1e-6
    if path == "upstream":
        bound *= 4   # ggml's SiLU: its own exp, and an F32 division
    err = np.abs(y - ref).max()
    assert err <= bound, f"max error {err:.2e} > {bound:.1e}"
    assert (y < -0.2).any() and (y > 3).any()   # both tails of SiLU in play (and a spread without it)


@pytest.mark.parametrize("bad", [
    dict(groups=3), dict(groups=0), dict(gamma=np.ones(3)), dict(eps=-1.0), dict(path="ggml"), dict(threads=0),
    dict(offset=np.zeros((1, 3))),
])
def test_bad_arguments_raise(bad):
    args = dict(x=np.zeros((1, 4, 2, 2)), groups=2, gamma=np.ones(4), beta=np.zeros(4))
    args.update(bad)
    with pytest.raises(ValueError):
        group_norm(**args)
