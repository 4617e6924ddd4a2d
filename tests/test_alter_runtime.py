"""ALTER routing at run time: one UNet evaluation of the accelerated library with pruned units skipped against the
PyTorch reference of ALTER's eval path (tests/alter_reference.py, written independently of the runtime), for
every expert and both skip semantics; dense equivalence of all-ones masks; --drop-unused files; the per-step
report; argument errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import FIXTURE_SEED, _cached, expert_rows, model_gguf, rel_l2, torch_reference
from pysdcpp.format.families import context_width
from pysdcpp.format.macs import unet_macs

LATENT = 16
# Units each fixture expert skips (LDM names), chosen to cover every kind of skip in alter-format.md section 3:
# down-block and middle ResNets (identity), transformer blocks, a ResNet of a cross-attention up block (pop,
# concat, discard) and ResNets of the plain up block output_blocks 0..2 where `reference` and `consume` differ.
EXPERT_SKIPS = [
    ["input_blocks.2.0", "input_blocks.4.1.transformer_blocks.0", "output_blocks.1.0", "middle_block.2",
     "output_blocks.7.0"],
    None,  # a random third of the units (seeded)
    ["output_blocks.0.0", "output_blocks.1.0", "middle_block.1.transformer_blocks.0", "input_blocks.11.0",
     "output_blocks.5.1.transformer_blocks.0", "input_blocks.1.0"],
]
# Training timesteps 0..332 -> expert 2, 333..665 -> expert 1, 666..999 -> expert 0.
TABLE = [2] * 333 + [1] * 333 + [0] * 334
# Model timesteps that hit every expert, fractional ones included (rounded to the nearest training step).
TIMESTEPS = [950.0, 665.6, 400.0, 332.4, 20.0]


def _expert_masks(family: str, skips=EXPERT_SKIPS, seed: int = 11) -> tuple[list[str], list[list[int]]]:
    return expert_rows(family, skips, seed)


def mask_file(family: str, name: str, rows, table=TABLE):
    """A JSON mask file (docs/alter-gguf.md) over the family's units (cached; a few KB)."""
    units, _ = _expert_masks(family)

    def make(p):
        doc = {"format": "pysdcpp.alter-masks", "version": 1, "units": units, "experts": rows}
        if table is not None:
            doc["timestep_expert"] = table
        p.write_text(json.dumps(doc))

    return _cached(f"{family}-alter-{name}.json", make)


def dropped_gguf(folder, family: str, rows, table):
    """The fixture model with JSON masks and --drop-unused, written by the converter's own routing and writer
    steps straight from the synthetic weights into `folder` (2 GB: the caller deletes it)."""
    from pysdcpp.format import keys
    from pysdcpp.format.families import DEFAULT_PREDICTION
    from pysdcpp.format.routing import routing_metadata
    from pysdcpp.converters import alter, gguf_out, synthetic

    masks = mask_file(family, "dropped", rows, table)
    tensors, routing = alter.attach_routing(masks, synthetic.ldm_sources(family, FIXTURE_SEED), family, masks,
                                            drop_unused=True)
    path = folder / f"{family}-dropped.gguf"
    meta = {keys.FAMILY: family, keys.PREDICTION: DEFAULT_PREDICTION[family], **routing_metadata(routing)}
    gguf_out.write_gguf(path, tensors, "f16", meta)
    return path


def _unet_inputs(family: str, seed: int, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((batch, 4, LATENT, LATENT)).astype(np.float32)
    context = rng.standard_normal((batch, 77, context_width(family))).astype(np.float32)
    return latent, context


def _expert_of(t: float) -> int:
    return TABLE[min(max(int(math.floor(t + 0.5)), 0), 999)]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family_setup(request):
    family = request.param
    _, rows = _expert_masks(family)
    path = (model_gguf(family), mask_file(family, "fixture", rows))
    unet = torch_reference(family, "unet")
    yield family, path, rows, unet
    del unet


@pytest.mark.slow
@pytest.mark.parametrize("semantics", ["reference", "consume"])
def test_unet_evaluation_matches_the_pytorch_reference(family_setup, semantics):
    import torch
    from alter_reference import alter_unet_forward

    from pysdcpp import StableDiffusion

    family, path, rows, unet = family_setup
    latent, context = _unet_inputs(family, 7)
    assert {_expert_of(t) for t in TIMESTEPS} == {0, 1, 2}
    model, masks = path
    with StableDiffusion(model, threads=2, alter_masks=masks, alter_semantics=semantics) as sd:
        assert sd.alter is not None and sd.alter.semantics == semantics
        outs = {t: sd.unet(latent, t, context) for t in TIMESTEPS}
    with StableDiffusion(model, threads=2) as sd:
        dense = sd.unet(latent, TIMESTEPS[0], context)
    with torch.no_grad():
        x, c = torch.from_numpy(latent), torch.from_numpy(context)
        dense_ref = unet(x, torch.tensor([TIMESTEPS[0]]), encoder_hidden_states=c).sample.numpy()
        dense_err = rel_l2(dense, dense_ref)
        for t, ours in outs.items():
            keep = [bool(k) for k in rows[_expert_of(t)]]
            ref = alter_unet_forward(unet, x, torch.tensor([t]), c, keep, semantics).numpy()
            err = rel_l2(ours, ref)
            # The dense UNet is ~1.4e-3 from diffusers (F16 activations in the convs, see test_components); with units skipped the error stays at that level, and the skipped model is far
            # from the dense one, so this cannot pass by accident.
            assert err <= max(2e-3, 1.25 * dense_err), (t, err, dense_err)
            dense_at_t = unet(x, torch.tensor([t]), encoder_hidden_states=c).sample.numpy()
            assert rel_l2(ref, dense_at_t) > 20 * err


def test_semantics_differ_only_where_plain_up_block_resnets_are_skipped(family_setup):
    """Expert 0 skips output_blocks.1.0 (plain up block) but keeps 2.0: `reference` and `consume` differ."""
    from pysdcpp import StableDiffusion

    family, path, rows, _ = family_setup
    latent, context = _unet_inputs(family, 8)
    out = {}
    model, masks = path
    for sem in ("reference", "consume"):
        with StableDiffusion(model, threads=2, alter_masks=masks, alter_semantics=sem) as sd:
            out[sem] = sd.unet(latent, 900.0, context)
    assert rel_l2(out["reference"], out["consume"]) > 1e-2


def test_batch_with_timesteps_of_different_experts(family_setup):
    """A batch whose elements go to different experts equals evaluating them one by one."""
    from pysdcpp import StableDiffusion

    family, path, _, _ = family_setup
    latent, context = _unet_inputs(family, 9, batch=2)
    ts = np.array([900.0, 100.0], np.float32)
    model, masks = path
    with StableDiffusion(model, threads=2, alter_masks=masks) as sd:
        both = sd.unet(latent, ts, context)
        one = [sd.unet(latent[i:i + 1], ts[i], context[i:i + 1]) for i in range(2)]
    np.testing.assert_allclose(both, np.concatenate(one), rtol=0, atol=1e-5)


def _generate(path, masks=None, **kwargs):
    from pysdcpp import StableDiffusion

    with StableDiffusion(path, threads=2, alter_masks=masks, **kwargs) as sd:
        result = sd.generate_with_info("a lighthouse at dusk", width=128, height=128, num_inference_steps=3,
                                       seed=5)
    return np.asarray(result.images[0]), result


@pytest.mark.slow
def test_all_ones_masks_reproduce_the_dense_image_bit_exactly(sd15_f16):
    units, _ = _expert_masks("sd1")
    ones = [[1] * len(units)] * 3
    dense, _ = _generate(sd15_f16)
    routed, info = _generate(sd15_f16, mask_file("sd1", "ones", ones))
    assert info.alter_steps and all(s.macs == s.dense_macs for s in info.alter_steps)
    np.testing.assert_array_equal(routed, dense)


@pytest.mark.slow
def test_drop_unused_gives_the_same_image_as_the_full_file(sd15_f16, tmp_path):
    """A file converted with the masks and --drop-unused against the full model routed by the same masks given
    at load time (which also holds the converted metadata against the JSON it came from)."""
    from pysdcpp import StableDiffusion
    from pysdcpp.errors import ModelLoadError

    # Every expert skips input_blocks.2.0 and output_blocks.1.0: their tensors can be left out.
    skips = [["input_blocks.2.0", "output_blocks.1.0"],
             ["input_blocks.2.0", "output_blocks.1.0", "middle_block.1.transformer_blocks.0"]]
    _, rows = _expert_masks("sd1", skips)
    table = [1] * 500 + [0] * 500
    dropped = dropped_gguf(tmp_path, "sd1", rows, table)
    a, info = _generate(sd15_f16, mask_file("sd1", "dropped", rows, table))
    b, _ = _generate(dropped)
    np.testing.assert_array_equal(a, b)
    assert {s.expert for s in info.alter_steps} == {0, 1}
    with pytest.raises(ModelLoadError, match="drop-unused"):
        StableDiffusion(dropped, alter=False)
    with pytest.raises(ModelLoadError, match="drop-unused"):
        StableDiffusion(dropped, backend="upstream")
    # Masks given at load time must not keep what the file left out.
    with pytest.raises(ModelLoadError, match="leaves out"):
        StableDiffusion(dropped, alter_masks=mask_file("sd1", "fixture", _expert_masks("sd1")[1]))
    dropped.unlink()


def test_per_step_report_follows_the_schedule(sd15_f16):
    """Each step's expert is the table's entry for the step's model timestep under sd.cpp's discrete schedule
    (computed independently in pysdcpp.alter_info), and its MACs are that expert's."""
    from pysdcpp.alter_info import discrete_step_timesteps

    _, rows = _expert_masks("sd1")
    _, info = _generate(sd15_f16, mask_file("sd1", "fixture", rows))
    expected_t = discrete_step_timesteps(3)
    macs = unet_macs("sd1", 16, 16)
    assert [s.step for s in info.alter_steps] == [1, 2, 3]
    for s, t in zip(info.alter_steps, expected_t):
        assert s.timestep == pytest.approx(t, abs=1e-2)
        assert s.expert == _expert_of(t)
        assert s.macs == macs.with_mask([bool(k) for k in rows[s.expert]])
        assert s.evaluations == 2   # euler_a: one model call per step, for the cond and the uncond half


def test_alter_arguments(sd15_f16):
    from pysdcpp import StableDiffusion

    _, rows = _expert_masks("sd1")
    masks = mask_file("sd1", "fixture", rows)
    with pytest.raises(ValueError, match="carries no ALTER routing"):
        StableDiffusion(sd15_f16, alter=True)
    with pytest.raises(ValueError, match="accelerated library"):
        StableDiffusion(sd15_f16, backend="upstream", alter_masks=masks)
    with pytest.raises(ValueError, match="alter_semantics"):
        StableDiffusion(sd15_f16, alter_masks=masks, alter_semantics="skip")
    with pytest.raises(ValueError, match="alter must be"):
        StableDiffusion(sd15_f16, alter="yes")
    with pytest.raises(ValueError, match="give one or the other"):
        StableDiffusion(sd15_f16, alter_masks=masks, alter=False)
    with pytest.raises(ValueError, match="no such mask file"):
        StableDiffusion(sd15_f16, alter_masks="/nonexistent.json")
    bad = masks.with_name("bad-masks.json")
    bad.write_text(json.dumps({"experts": [[2] * 34]}))
    with pytest.raises(ValueError, match="0/1|0 or 1"):
        StableDiffusion(sd15_f16, alter_masks=bad)



def test_cli_generate_with_alter_masks(sd15_f16, tmp_path):
    from click.testing import CliRunner

    from pysdcpp.cli import main

    _, rows = _expert_masks("sd1")
    masks = mask_file("sd1", "fixture", rows)
    out = tmp_path / "x.png"
    res = CliRunner().invoke(main, ["generate", str(sd15_f16), "-p", "x", "-W", "64", "-H", "64", "--steps", "2",
                                    "--alter-masks", str(masks), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert [s["step"] for s in summary["alter_steps"]] == [1, 2]
    assert all(0 < s["fraction_of_dense"] <= 1 for s in summary["alter_steps"])
    before = out.read_bytes()
    res = CliRunner().invoke(main, ["generate", str(sd15_f16), "-p", "x", "-W", "64", "-H", "64", "-o", str(out)])
    assert res.exit_code == 1 and "exists; pass --overwrite" in res.output and out.read_bytes() == before
    res = CliRunner().invoke(main, ["generate", str(sd15_f16), "-p", "x", "--alter-masks", str(masks),
                                    "--no-alter", "-o", str(out), "--overwrite"])
    assert res.exit_code == 1 and "give one or the other" in res.output
