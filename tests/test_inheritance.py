"""Feature inheritance (pysdcpp.inheritance, kernels/inherit.h): DeepCache's branch caching against the DeepCache
package's own helper on the diffusers UNet, unit-level schedules against a reference written here (forward hooks
that reuse each unit's last contribution), both over a sequence of component UNet evaluations of the SD1.5 and
SD2.1 fixtures; plans that compute everything against no inheritance, bit for bit; schedules and MAC counts."""

from __future__ import annotations

import ast
import gc
import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import model_gguf, rel_l2, torch_reference
from pysdcpp import StableDiffusion
from pysdcpp.format.macs import evaluation_macs, unet_macs
from pysdcpp.format.unet import inheritable_units, skip_entries, unet_blocks
from pysdcpp.inheritance import DeepCache, Plan, UnitSchedule, parse_inheritance

UNET_TOL = 2e-3   # test_components' bound for one dense UNet evaluation against diffusers
LATENT = 16
TIMESTEPS = [981.0, 901.0, 801.0, 701.0, 601.0, 501.0]


# ---- schedules and MACs (no native library) ----------------------------------------------------------------

def _deepcache_function(name: str):
    """A function of DeepCache's own pipeline module, read from the installed package (the module itself imports
    diffusers internals that current diffusers no longer has)."""
    path = Path(importlib.util.find_spec("DeepCache").origin).parent / "sd" / "pipeline_stable_diffusion.py"
    fn = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {"np": np}
    exec(compile(ast.Module([fn], []), str(path), "exec"), scope)
    return scope[name]


@pytest.mark.parametrize("steps,interval,center,power", [(50, 3, 15, 1.4), (20, 3, 5, 1.4), (50, 5, 15, 1.4),
                                                         (25, 3, 10, 1.2)])
def test_non_uniform_full_steps_are_deepcaches(steps, interval, center, power):
    import warnings

    theirs = _deepcache_function("sample_from_quad_center")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # their curve goes through complex numbers, and numpy says so
        expected = sorted(int(v) for v in theirs(steps, -(-steps // interval), center=center, pow=power)[0])
    policy = DeepCache(interval=interval, schedule="non-uniform", center=center, pow=power)
    assert policy.full_steps(steps) == expected


def test_uniform_deepcache_plan():
    plan = DeepCache(interval=3, branch=2).plan(8, "sd1")
    assert plan.units == ("branch.2",)
    assert plan.inherit[:, 0].tolist() == [False, True, True, False, True, True, False, True]


def test_unit_schedule_plan():
    plan = UnitSchedule(interval=3, first=1, last=2).plan(9, "sd1")
    assert plan.inherit.shape == (9, len(plan.units))
    assert plan.inherit.any(axis=1).tolist() == [False, False, True, True, False, True, True, False, False]
    # the default units: every transformer block, and the ResNets below the outermost level
    assert "input_blocks.1.0" not in plan.units and "output_blocks.11.0" not in plan.units
    assert {"input_blocks.4.0", "input_blocks.1.1.transformer_blocks.0", "middle_block.1.transformer_blocks.0",
            "middle_block.0"} <= set(plan.units)
    assert len(plan.units) == len(inheritable_units("sd1")) - 5   # two down and three up ResNets at level 0


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_evaluation_macs(family):
    dense = unet_macs(family, 64, 64).dense
    assert evaluation_macs(family, 64, 64) == dense
    shares = [evaluation_macs(family, 64, 64, branch=b) for b in range(skip_entries(family))]
    assert shares == sorted(shares) and shares[-1] < dense
    # the deepest branch leaves out the middle block alone: its units and its attention's proj_in/proj_out
    hw = 8 * 8 if family == "sd1" else 16 * 16   # the lowest level of a 64x64 latent
    mid_units = [u for u in inheritable_units(family) if u.startswith("middle_block.")]
    assert dense - shares[-1] == dense - evaluation_macs(family, 64, 64, inherited=mid_units) + 2 * 1280 * 1280 * hw
    # an inherited ResNet saves its two 3x3 convs and its time projection; a channel-changing shortcut still runs
    res = next(b for b in unet_blocks(family) if b.kind == "resnet" and b.section == "up")
    assert res.resnet_in != res.cout
    saved = dense - evaluation_macs(family, 64, 64, inherited=[res.ldm])
    assert saved == 9 * res.resnet_in * res.cout * hw + 1280 * res.cout + 9 * res.cout * res.cout * hw


def test_parse_inheritance():
    assert parse_inheritance("deepcache") == DeepCache()
    assert parse_inheritance("deepcache:interval=5,branch=1,schedule=non-uniform,center=10") == \
        DeepCache(interval=5, branch=1, schedule="non-uniform", center=10)
    assert parse_inheritance("units:interval=2,units=input_blocks.4.0+middle_block.0") == \
        UnitSchedule(("input_blocks.4.0", "middle_block.0"), interval=2)
    assert parse_inheritance(UnitSchedule(interval=4, last=0).spec()) == UnitSchedule(interval=4, last=0)
    assert parse_inheritance(DeepCache(5, 2, "non-uniform").spec()) == DeepCache(5, 2, "non-uniform")
    for bad, message in [("cache", "deepcache or units"), ("deepcache:interval=0", "positive"),
                         ("deepcache:speed=2", "unknown DeepCache setting"), ("deepcache:branch", "key=value"),
                         ("deepcache:schedule=fast", "uniform, non-uniform"), ("units:every=2", "unknown unit")]:
        with pytest.raises(ValueError, match=message):
            parse_inheritance(bad)


def test_bad_plans_fail_before_anything_runs(sd15_f16):
    with StableDiffusion(sd15_f16, threads=2) as sd:
        for policy, message in [(DeepCache(branch=12), "branches are 0 to 11"),
                                (UnitSchedule(("input_blocks.1.5",)), "no inheritable unit"),
                                (Plan(("input_blocks.1.0",), np.zeros((3, 1), bool)), "covers 3 steps"),
                                ("deepcache", "must be a DeepCache")]:
            with pytest.raises((ValueError, TypeError), match=message):
                sd.generate("x", width=64, height=64, num_inference_steps=4, inheritance=policy)
    with StableDiffusion(sd15_f16, threads=2, backend="upstream") as sd:
        with pytest.raises(ValueError, match="accelerated library"):
            sd.generate("x", width=64, height=64, num_inference_steps=4, inheritance=DeepCache())


# ---- against the PyTorch references (full-size fixtures) ---------------------------------------------------

def _sequence(family: str, steps: int):
    """Latents, timesteps and a text context for `steps` evaluations: the latent drifts a little per step, as in
    sampling."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    xs = [x + 0.05 * i * rng.standard_normal(x.shape).astype(np.float32) for i in range(steps)]
    width = 768 if family == "sd1" else 1024
    ctx = rng.standard_normal((1, 77, width)).astype(np.float32)
    return xs, TIMESTEPS[:steps], ctx


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request):
    family = request.param
    unet = torch_reference(family, "unet", shared=False)   # DeepCache's helper rewraps its blocks
    sd = StableDiffusion(model_gguf(family), threads=2)
    yield family, sd, unet
    sd.close()
    del unet
    gc.collect()


def _torch_unet(unet, x, t, ctx):
    import torch

    with torch.no_grad():
        return unet(torch.from_numpy(x), torch.tensor([t]), encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("branch", [0, 1])
def test_deepcache_against_the_deepcache_helper(pair, branch):
    """DeepCacheSDHelper (the DeepCache package) wraps the diffusers UNet's blocks so that, between full steps, all
    but the shallow branch return their cached outputs; our plan must give the same evaluations."""
    import torch
    from DeepCache import DeepCacheSDHelper

    family, sd, unet = pair
    steps = 5
    xs, ts, ctx = _sequence(family, steps)
    pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=torch.tensor(ts)))
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        expected = [_torch_unet(pipe.unet, xs[i], ts[i], ctx) for i in range(steps)]
    finally:
        helper.disable()
    with sd.inheriting(DeepCache(interval=3, branch=branch), steps) as run:
        ours = [run.unet(xs[i], ts[i], ctx, step=i) for i in range(steps)]
        report = [(e.step, e.inherited) for e in run.evaluations]
    assert report == [(0, []), (1, [f"branch.{branch}"]), (2, [f"branch.{branch}"]), (3, []),
                      (4, [f"branch.{branch}"])]
    errors = [rel_l2(o, e) for o, e in zip(ours, expected)]
    print(f"{family} DeepCache branch {branch}: rel. L2 per step {['%.1e' % e for e in errors]}")
    assert max(errors) <= UNET_TOL
    # the helper really cached: a cached step differs from the dense evaluation of the same input
    assert rel_l2(expected[1], _torch_unet(unet, xs[1], ts[1], ctx)) > 10 * UNET_TOL


class _InheritingHooks:
    """The unit-level reference: each listed diffusers module (a ResNet or a transformer block) records what it
    contributed when it runs, and at the steps the plan marks adds that instead of running (a ResNet still runs
    its shortcut); with nothing recorded yet it runs."""

    def __init__(self, unet, units: dict[str, str]):
        self.unet, self.units, self.step_inherits = unet, units, set()
        self.cache: dict[str, object] = {}
        self.saved = {}
        for ldm, name in units.items():
            module = unet.get_submodule(name)
            self.saved[name] = module.forward
            module.forward = self._wrap(ldm, module, module.forward)

    def _wrap(self, ldm, module, forward):
        is_resnet = hasattr(module, "conv_shortcut")

        def run(hidden_states, *args, **kwargs):
            shortcut = None
            if is_resnet:
                shortcut = module.conv_shortcut(hidden_states) if module.conv_shortcut is not None else hidden_states
            if ldm in self.step_inherits and ldm in self.cache:
                return (shortcut if is_resnet else hidden_states) + self.cache[ldm]
            out = forward(hidden_states, *args, **kwargs)
            self.cache[ldm] = out - (shortcut if is_resnet else hidden_states)
            return out
        return run

    def remove(self):
        for name, forward in self.saved.items():
            self.unet.get_submodule(name).forward = forward


# a mixed set: ResNets of a down block, channel-changing up ResNets, transformer blocks at three levels, and units
# the ALTER test's expert 0 prunes (input_blocks.4.1's block, middle_block.2)
UNITS = ["input_blocks.4.0", "input_blocks.4.1.transformer_blocks.0", "input_blocks.5.1.transformer_blocks.0",
         "middle_block.0", "middle_block.1.transformer_blocks.0", "middle_block.2", "output_blocks.3.0",
         "output_blocks.8.0", "output_blocks.11.1.transformer_blocks.0"]


def _diffusers_names(family: str, names) -> dict[str, str]:
    diffusers = {b.ldm: b.diffusers for b in unet_blocks(family)}
    return {u: (diffusers[u] if u in diffusers else
                diffusers[u.split(".transformer_blocks.")[0]] + ".transformer_blocks." + u.rsplit(".", 1)[1])
            for u in names}


@pytest.mark.slow
def test_unit_schedule_against_hooks(pair):
    family, sd, unet = pair
    steps = 5
    xs, ts, ctx = _sequence(family, steps)
    names = UNITS
    units = _diffusers_names(family, names)
    policy = UnitSchedule(tuple(names), interval=2, first=1, last=1)
    plan = policy.plan(steps, family)
    hooks = _InheritingHooks(unet, units)
    try:
        expected = []
        for i in range(steps):
            hooks.step_inherits = {u for u, k in zip(plan.units, plan.inherit[i]) if k}
            expected.append(_torch_unet(unet, xs[i], ts[i], ctx))
    finally:
        hooks.remove()
    with sd.inheriting(policy, steps) as run:
        ours = [run.unet(xs[i], ts[i], ctx, step=i) for i in range(steps)]
        inherited = [sorted(e.inherited) for e in run.evaluations]
    assert inherited == [sorted(u for u, k in zip(plan.units, row) if k) for row in plan.inherit]
    assert plan.inherit[2].all() and not plan.inherit[1].any()
    errors = [rel_l2(o, e) for o, e in zip(ours, expected)]
    print(f"{family} unit schedule: rel. L2 per step {['%.1e' % e for e in errors]}")
    assert max(errors) <= UNET_TOL
    assert rel_l2(expected[2], _torch_unet(unet, xs[2], ts[2], ctx)) > 10 * UNET_TOL


@pytest.mark.slow
def test_unit_schedule_with_alter_masks(pair):
    """ALTER first: a unit its expert prunes is skipped at that step (never inherited, and its cache stays from
    the last step that computed it); the reference is tests/alter_reference.py's eval path with the hooks."""
    import torch
    from alter_reference import alter_unet_forward
    from test_alter_runtime import TIMESTEPS as ALTER_TIMESTEPS
    from test_alter_runtime import _expert_masks, _expert_of, mask_file

    family, _, unet = pair
    _, rows = _expert_masks(family)
    steps = 5
    xs, _, ctx = _sequence(family, steps)
    ts = ALTER_TIMESTEPS[:steps]   # experts 0, 0, 1, 2, 2
    policy = UnitSchedule(tuple(UNITS), interval=2, first=1, last=0)   # inherit at steps 2 and 4
    plan = policy.plan(steps, family)
    hooks = _InheritingHooks(unet, _diffusers_names(family, UNITS))
    try:
        expected = []
        for i in range(steps):
            hooks.step_inherits = {u for u, k in zip(plan.units, plan.inherit[i]) if k}
            keep = [bool(k) for k in rows[_expert_of(ts[i])]]
            with torch.no_grad():
                expected.append(alter_unet_forward(unet, torch.from_numpy(xs[i]), torch.tensor([ts[i]]),
                                                   torch.from_numpy(ctx), keep, "reference").numpy())
    finally:
        hooks.remove()
    with StableDiffusion(model_gguf(family), threads=2, alter_masks=mask_file(family, "fixture", rows)) as sd:
        with sd.inheriting(policy, steps) as run:
            ours = [run.unet(xs[i], ts[i], ctx, step=i) for i in range(steps)]
            report = run.evaluations
    from pysdcpp.format.unet import prunable_units

    units = [u.name for u in prunable_units(family)]
    for i in (2, 4):   # inheriting steps: the expert's pruned units are neither inherited nor computed
        pruned = {u for u, k in zip(units, rows[_expert_of(ts[i])]) if not k}
        assert not pruned & set(report[i].inherited) and not pruned & set(report[i].computed)
        assert report[i].inherited and set(report[i].inherited) | pruned >= set(UNITS) - set(report[i].computed)
    assert any(set(UNITS) & {u for u, k in zip(units, rows[_expert_of(ts[i])]) if not k} for i in (2, 4))
    errors = [rel_l2(o, e) for o, e in zip(ours, expected)]
    print(f"{family} unit schedule + ALTER: rel. L2 per step {['%.1e' % e for e in errors]}")
    assert max(errors) <= UNET_TOL


@pytest.mark.slow
def test_deepcache_with_alter_masks(pair):
    """ALTER and DeepCache together, branches 0 and 1: the full steps and the shallow blocks of the others follow
    the step's expert; the reference is tests/alter_reference.py's eval path with DeepCache's branch cut."""
    import torch
    from alter_reference import alter_unet_forward
    from test_alter_runtime import TIMESTEPS as ALTER_TIMESTEPS
    from test_alter_runtime import _expert_masks, _expert_of, mask_file

    family, dense_sd, unet = pair
    _, rows = _expert_masks(family)
    steps = 5
    xs, _, ctx = _sequence(family, steps)
    ts = ALTER_TIMESTEPS[:steps]   # experts 0, 0, 1, 2, 2; full steps 0 and 3
    with StableDiffusion(model_gguf(family), threads=2, alter_masks=mask_file(family, "fixture", rows)) as sd:
        for branch in (0, 1):
            cache: dict = {}
            expected = []
            for i in range(steps):
                keep = [bool(k) for k in rows[_expert_of(ts[i])]]
                with torch.no_grad():
                    expected.append(alter_unet_forward(
                        unet, torch.from_numpy(xs[i]), torch.tensor([ts[i]]), torch.from_numpy(ctx), keep,
                        "reference", deepcache={"branch": branch, "inherit": i % 3 != 0, "cache": cache}).numpy())
            with sd.inheriting(DeepCache(interval=3, branch=branch), steps) as run:
                ours = [run.unet(xs[i], ts[i], ctx, step=i) for i in range(steps)]
                report = run.evaluations
            with dense_sd.inheriting(DeepCache(interval=3, branch=branch), steps) as run:
                for i in range(steps):
                    run.unet(xs[i], ts[i], ctx, step=i)
                dense_report = run.evaluations
            cut = [f"branch.{branch}"]
            assert [e.inherited for e in report] == [[], cut, cut, [], cut]
            # the experts prune the full steps, and for branch 1 blocks outside the branch too (branch 0 leaves
            # only output_blocks.11 outside, which these experts keep)
            assert report[0].macs < dense_report[0].macs and report[3].macs < dense_report[3].macs
            if branch == 1:
                assert any(report[i].macs < dense_report[i].macs for i in (1, 2, 4))
            errors = [rel_l2(o, e) for o, e in zip(ours, expected)]
            print(f"{family} DeepCache branch {branch} + ALTER: rel. L2 per step {['%.1e' % e for e in errors]}")
            assert max(errors) <= UNET_TOL
            with torch.no_grad():   # the reference's cut is real: an inheriting step is not the uncut evaluation
                uncut = alter_unet_forward(unet, torch.from_numpy(xs[2]), torch.tensor([ts[2]]), torch.from_numpy(ctx),
                                           [bool(k) for k in rows[_expert_of(ts[2])]], "reference").numpy()
            assert rel_l2(expected[2], uncut) > 10 * UNET_TOL


@pytest.mark.slow
def test_guidance_slots_keep_their_own_caches(pair):
    """Two conditions interleaved step by step (as a guided generation runs them) give what each gives alone."""
    family, sd, _ = pair
    steps = 4
    xs, ts, ctx = _sequence(family, steps)
    ctx2 = ctx[:, ::-1].copy()
    policy = DeepCache(interval=2, branch=1)
    alone = []
    for c in (ctx, ctx2):
        with sd.inheriting(policy, steps) as run:
            alone.append([run.unet(xs[i], ts[i], c, step=i) for i in range(steps)])
    with sd.inheriting(policy, steps) as run:
        both = [[run.unet(xs[i], ts[i], c, step=i, slot=k) for k, c in enumerate((ctx, ctx2))] for i in range(steps)]
        assert run.cache_bytes() > 0
    for i in range(steps):
        for k in range(2):
            np.testing.assert_array_equal(both[i][k], alone[k][i])


@pytest.mark.slow
def test_generation_plan_that_computes_everything_is_bit_identical(sd15_f16):
    # a plan's steps evaluate cond and uncond separately (no batched guidance under a plan): the plain run too
    with StableDiffusion(sd15_f16, threads=2, batch_guidance=False) as sd:
        kwargs = dict(width=128, height=128, num_inference_steps=4, seed=3)
        plain = sd.generate("a red house", **kwargs)[0]
        every = sd.generate_with_info("a red house", inheritance=UnitSchedule(interval=1), **kwargs)
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(every.images[0]))
        cached = sd.generate_with_info("a red house", inheritance=DeepCache(interval=2, branch=0), **kwargs)
        assert int(sd.native.lib.pysdcpp_inherit_cache_bytes()) == 0   # freed with the generation
    # guided: cond and uncond per step, full steps 0 and 2
    assert [(e.step, e.slot, bool(e.inherited)) for e in cached.inherited] == \
        [(s, k, s % 2 == 1) for s in range(4) for k in range(2)]
    assert all(e.macs < e.dense_macs / 5 for e in cached.inherited if e.inherited)
    assert not np.array_equal(np.asarray(plain), np.asarray(cached.images[0]))


@pytest.mark.slow
def test_deepcache_does_not_depend_on_the_conv_path(sd15_f16):
    """The same DeepCache sequence through Winograd and through im2col: within test_winograd's bound for one
    evaluation (2e-3)."""
    steps = 4
    xs, ts, ctx = _sequence("sd1", steps)
    out = {}
    for conv in ("im2col", "winograd"):
        with StableDiffusion(sd15_f16, threads=2, conv=conv) as sd:
            with sd.inheriting(DeepCache(interval=2, branch=2), steps) as run:
                out[conv] = [run.unet(xs[i], ts[i], ctx, step=i) for i in range(steps)]
    errors = [rel_l2(a, b) for a, b in zip(out["winograd"], out["im2col"])]
    print(f"DeepCache winograd vs im2col: {['%.1e' % e for e in errors]}")
    assert max(errors) <= 2e-3


@pytest.mark.slow
def test_samplers_with_two_evaluations_per_step(sd15_f16):
    """heun evaluates twice per step (once at the last step): both evaluations follow their step's row."""
    with StableDiffusion(sd15_f16, threads=2) as sd:
        r = sd.generate_with_info("a red house", width=128, height=128, num_inference_steps=4, seed=3,
                                  sampler="heun", inheritance=DeepCache(interval=2, branch=1))
    per_step: dict[int, list[bool]] = {}
    for e in r.inherited:
        per_step.setdefault(e.step, []).append(bool(e.inherited))
    assert {s: len(v) for s, v in per_step.items()} == {0: 4, 1: 4, 2: 4, 3: 2}   # x2 slots (cond, uncond)
    assert {s: set(v) for s, v in per_step.items()} == {0: {False}, 1: {True}, 2: {False}, 3: {True}}
