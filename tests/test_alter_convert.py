"""ALTER routing: the unit table against alter-format.md, the three mask sources (pruning_mask.pth read without
torch, hypernet/, JSON), clear errors, --drop-unused, MACs against a hook count on the diffusers UNet,
`pysdcpp inspect`, and the PyTorch reference of ALTER's eval path (tests/alter_reference.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pysdcpp.format import keys
from pysdcpp.format.families import UNET_CONFIGS
from pysdcpp.format.macs import unet_macs
from pysdcpp.format.routing import read_alter, routing_metadata
from pysdcpp.converters import ConversionError, alter
from pysdcpp.cli import main
from pysdcpp.modelfile import read_model_file

sys.path.insert(0, str(Path(__file__).parent))
from alter_reference import alter_unet_forward, alter_units  # noqa: E402
from conftest import FIXTURE_SEED, _cached, diffusers_folder  # noqa: E402
from pysdcpp.converters import synthetic  # noqa: E402

# The table of alter-format.md section 2, typed from the document (the independent reference).
DOC_UNITS = (
    ["input_blocks.1.1.transformer_blocks.0", "input_blocks.2.1.transformer_blocks.0", "input_blocks.1.0",
     "input_blocks.2.0"]
    + ["input_blocks.4.1.transformer_blocks.0", "input_blocks.5.1.transformer_blocks.0", "input_blocks.5.0"]
    + ["input_blocks.7.1.transformer_blocks.0", "input_blocks.8.1.transformer_blocks.0", "input_blocks.8.0"]
    + ["input_blocks.10.0", "input_blocks.11.0"]
    + ["output_blocks.0.0", "output_blocks.1.0", "output_blocks.2.0"]
    + ["output_blocks.3.1.transformer_blocks.0", "output_blocks.4.1.transformer_blocks.0",
       "output_blocks.5.1.transformer_blocks.0", "output_blocks.3.0", "output_blocks.4.0", "output_blocks.5.0"]
    + ["output_blocks.6.1.transformer_blocks.0", "output_blocks.7.1.transformer_blocks.0",
       "output_blocks.8.1.transformer_blocks.0", "output_blocks.7.0", "output_blocks.8.0"]
    + ["output_blocks.9.1.transformer_blocks.0", "output_blocks.10.1.transformer_blocks.0",
       "output_blocks.11.1.transformer_blocks.0", "output_blocks.10.0", "output_blocks.11.0"]
    + ["middle_block.1.transformer_blocks.0", "middle_block.0", "middle_block.2"]
)
DOC_PIECES = [[1, 1, 2], [1, 1, 1], [1, 1, 1], [2], [3], [1, 1, 1, 3], [1, 1, 1, 2], [1, 1, 1, 2], [1, 2]]
PRUNED_NAMES = {"CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn"}

# Fixture masks: four experts; units 5 and 12 kept by none (for --drop-unused); expert 0 serves two
# separate intervals, so first-appearance order differs from index order.
N_EXPERTS = 4
NEVER_KEPT = (5, 12)
SEGMENTS = [(0, 180, 2), (180, 400, 0), (400, 650, 3), (650, 820, 0), (820, 1000, 1)]


def _kind(name: str) -> str:
    return "transformer" if "transformer_blocks" in name else "resnet"


def _fixture_expert_masks() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    masks = (torch.rand(N_EXPERTS, 34, generator=g) < 0.75).float()
    masks[:, list(NEVER_KEPT)] = 0.0
    masks[:, 0] = torch.tensor([1.0, 0.0, 1.0, 0.0])   # the experts differ whatever the draw
    masks[:, 1] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    return masks


def _timestep_rows() -> torch.Tensor:
    masks = _fixture_expert_masks()
    rows = torch.empty(1000, 34)
    for a, b, e in SEGMENTS:
        rows[a:b] = masks[e]
    return rows


def _save_pruning_mask(path: Path, rows: torch.Tensor, pieces=DOC_PIECES) -> None:
    """torch.save of the nested list: one list per group, one (1000, piece) float tensor per piece."""
    nested, col = [], 0
    for group in pieces:
        inner = []
        for size in group:
            inner.append(rows[:, col:col + size].clone())
            col += size
        nested.append(inner)
    torch.save(nested, str(path))


def _hypernet_class():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class Router(torch.nn.Module):
        def __init__(self, time_embedding, n_experts, input_dim):
            super().__init__()
            self.time_embedding = torch.nn.Parameter(torch.tensor(time_embedding), requires_grad=False)
            self.linear1 = torch.nn.Linear(self.time_embedding.shape[1], input_dim)
            self.ln = torch.nn.LayerNorm(input_dim)
            self.linear2 = torch.nn.Linear(input_dim, n_experts, bias=False)

        def forward(self):
            return self.linear2(torch.relu(self.ln(self.linear1(self.time_embedding))))

    class AlterHyperNet(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, time_embedding, n_intervals, p_structures, T=0.4, base=4, input_dim=64, hidden_dim=256):
            super().__init__()
            n_units = sum(sum(p) for p in p_structures)
            self.inputs = torch.nn.Parameter(torch.empty(n_intervals, n_units, input_dim), requires_grad=False)
            torch.nn.init.orthogonal_(self.inputs.data.view(n_intervals * n_units, input_dim))
            self.ln = torch.nn.LayerNorm(input_dim)
            self.linear1 = torch.nn.Linear(input_dim, hidden_dim)
            self.ln2 = torch.nn.LayerNorm(hidden_dim)
            self.linear2 = torch.nn.Linear(hidden_dim, 1, bias=False)
            self.router = Router(time_embedding, n_intervals, input_dim)

        def forward(self):
            expert_logits = self.linear2(torch.relu(self.ln2(self.linear1(self.ln(self.inputs))))).squeeze(-1)
            return expert_logits, self.router()

    return AlterHyperNet


def _sinusoidal_time_embedding() -> list:
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(torch.arange(1000), 320, flip_sin_to_cos=True, downscale_freq_shift=0).tolist()


def _save_hypernet(folder: Path, seed: int = 3, **overrides) -> None:
    torch.manual_seed(seed)
    cfg = dict(time_embedding=_sinusoidal_time_embedding(), n_intervals=N_EXPERTS, p_structures=DOC_PIECES, T=0.4,
               base=4, input_dim=64, hidden_dim=256)
    cfg.update(overrides)
    net = _hypernet_class()(**cfg)
    with torch.no_grad():   # spread the gate logits so that some units are skipped
        net.linear2.weight.mul_(40.0)
        net.router.linear2.weight.mul_(5.0)
    net.save_pretrained(str(folder))


def _link_components(src: Path, dst: Path, pruned_config: bool = True) -> None:
    for comp in ("text_encoder", "vae", "scheduler"):
        (dst / comp).symlink_to(src / comp, target_is_directory=True)
    (dst / "unet").mkdir(parents=True)
    (dst / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(
        src / "unet" / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((src / "unet" / "config.json").read_text())
    if pruned_config:
        cfg["_class_name"] = "UNet2DConditionModelPruned"
        cfg["down_block_types"] = [t + "Pruned" for t in cfg["down_block_types"]]
        cfg["up_block_types"] = [t + "Pruned" for t in cfg["up_block_types"]]
        cfg["mid_block_type"] = "UNetMidBlock2DCrossAttnPruned"
    (dst / "unet" / "config.json").write_text(json.dumps(cfg, indent=2))


def _make_alter_folder(dst: Path) -> None:
    """An ALTER run's output folder over a reduced SD2.1 (the converter never runs the model: its 34 units, names
    and cross-attention width are SD2.1's, the channels few)."""
    dst.mkdir(parents=True)
    base = synthetic.write_diffusers_folder(dst.parent / (dst.name + ".base"), "sd2", FIXTURE_SEED, reduced=True)
    _link_components(base, dst)
    _save_pruning_mask(dst / "pruning_mask.pth", _timestep_rows())
    _save_hypernet(dst / "hypernet")


@pytest.fixture(scope="session")
def alter_folder() -> Path:
    folder = _cached("sd2-alter-v2", _make_alter_folder)
    return folder


def _independent_dedup(pth: Path) -> tuple[list[list[bool]], list[int]]:
    nested = torch.load(str(pth))
    rows = torch.cat([t for group in nested for t in group], dim=1)
    experts: dict[tuple, int] = {}
    table = []
    for row in rows.tolist():
        key = tuple(v == 1.0 for v in row)
        table.append(experts.setdefault(key, len(experts)))
    return [list(k) for k in experts], table


# ---- the unit table ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unit_table_matches_the_document(family):
    units = alter.prunable_units(family)
    assert [u.name for u in units] == DOC_UNITS
    assert [u.kind for u in units] == [_kind(n) for n in DOC_UNITS]
    assert sum(u.kind == "transformer" for u in units) == 16
    assert alter.piece_structure(family) == DOC_PIECES
    pruned = dict(UNET_CONFIGS[family], _class_name="UNet2DConditionModelPruned",
                  down_block_types=[t + "Pruned" for t in UNET_CONFIGS[family]["down_block_types"]],
                  up_block_types=[t + "Pruned" for t in UNET_CONFIGS[family]["up_block_types"]])
    assert [u.name for u in alter.prunable_units(pruned)] == DOC_UNITS


def _tiny_config(linear: bool) -> dict:
    cfg = dict(UNET_CONFIGS["sd2" if linear else "sd1"], block_out_channels=[32, 64, 128, 128], norm_num_groups=8,
               cross_attention_dim=16, sample_size=16)
    cfg["attention_head_dim"] = [2, 4, 8, 8] if linear else 4
    cfg.pop("_class_name")
    return cfg


def _tiny_unet(linear: bool, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**_tiny_config(linear)).eval()


def test_unit_table_agrees_with_the_torch_module_tree():
    unet = _tiny_unet(linear=True)
    ours = alter.prunable_units(_tiny_config(True))
    assert [(u.kind, u.diffusers) for u in ours] == alter_units(unet)
    modules = dict(unet.named_modules())
    assert all(u.diffusers in modules for u in ours)


# ---- pruning_mask.pth, converted without torch -----------------------------------------------------

_NO_TORCH_CONVERT = """
import json, sys
sys.modules["torch"] = None          # any `import torch` now raises ImportError
from pysdcpp._converters import converters
convert = converters().convert
r = convert(sys.argv[1], sys.argv[2], "f16", drop_unused=True)
print(json.dumps({"source": r.alter.source, "experts": r.alter.n_experts, "dropped": r.alter.dropped}))
"""


@pytest.fixture(scope="session")
def alter_gguf(alter_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("alter") / "alter-f16.gguf"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    res = subprocess.run([sys.executable, "-c", _NO_TORCH_CONVERT, str(alter_folder), str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    yield out, json.loads(res.stdout.strip().splitlines()[-1])
    out.unlink()  # 2.6 GB: pytest keeps its last temporary folders around


def test_alter_folder_converts_without_torch_and_round_trips(alter_folder, alter_gguf):
    path, summary = alter_gguf
    assert summary["source"] == "pruning_mask.pth"   # it wins over hypernet/
    experts, table = _independent_dedup(alter_folder / "pruning_mask.pth")
    mf = read_model_file(path)
    routing = read_alter(mf.metadata)
    assert routing.units == DOC_UNITS
    assert routing.kinds == [_kind(n) for n in DOC_UNITS]
    assert routing.masks.tolist() == experts
    assert routing.table.tolist() == table
    assert routing.n_experts == N_EXPERTS
    assert routing.semantics == "reference" and routing.source == "pruning_mask.pth"
    md = mf.metadata
    assert md[keys.ALTER_VERSION] == 1 and md[keys.ALTER_N_EXPERTS] == N_EXPERTS
    assert md[keys.ALTER_EXPERT_MASKS] == [int(v) for row in experts for v in row]
    assert md[keys.ALTER_TIMESTEP_EXPERT] == table
    assert md[keys.FAMILY] == "sd2"
    # Fractional timesteps: nearest integer, clamped.
    assert routing.expert_for_timestep(179.4) == table[179] and routing.expert_for_timestep(179.5) == table[180]
    assert routing.expert_for_timestep(-3.0) == table[0] and routing.expert_for_timestep(1e6) == table[999]


def test_drop_unused_leaves_out_exactly_the_never_kept_units(alter_folder, alter_gguf):
    from pysdcpp.converters import load_model_tensors

    path, summary = alter_gguf
    never = [DOC_UNITS[i] for i in NEVER_KEPT]
    assert summary["dropped"] == never
    mf = read_model_file(path)
    assert mf.metadata[keys.ALTER_DROPPED_UNITS] == never
    all_names = {t.name for t in load_model_tensors(alter_folder)[0]}
    expected_gone = {n for n in all_names if any(n.startswith(f"model.diffusion_model.{u}.") for u in never)}
    assert len(expected_gone) > 10
    # 'output_blocks.1.0.' must not take 'output_blocks.10.0.' with it, etc.
    assert {t.name for t in mf.tensors} == all_names - expected_gone


def test_pruning_mask_bad_inputs(tmp_path):
    rows = _timestep_rows()
    cases = {
        "mask pieces": lambda p: _save_pruning_mask(p, rows, DOC_PIECES[:-1]),
        "exactly 0 or 1": lambda p: _save_pruning_mask(p, rows * 0.5),
        "one per timestep": lambda p: _save_pruning_mask(p, rows[:999]),
        "nested list": lambda p: torch.save({"masks": rows}, str(p)),
    }
    for message, make in cases.items():
        p = tmp_path / "pruning_mask.pth"
        make(p)
        with pytest.raises(ConversionError, match=message):
            alter.read_pruning_mask(p, "sd2")
    good = tmp_path / "good.pth"
    _save_pruning_mask(good, rows)
    with pytest.raises(ConversionError, match="mask pieces"):   # SD2 masks against a UNet with fewer units
        alter.read_pruning_mask(good, dict(UNET_CONFIGS["sd2"], layers_per_block=1))


# ---- hypernet/ -----------------------------------------------------------------------------------------

def _hypernet_only_folder(alter_folder: Path, dst: Path) -> Path:
    (dst / "unet").mkdir(parents=True)
    (dst / "unet" / "config.json").write_text((alter_folder / "unet" / "config.json").read_text())
    (dst / "hypernet").symlink_to(alter_folder / "hypernet", target_is_directory=True)
    return dst


def test_hypernet_masks_match_a_torch_float64_forward(alter_folder, tmp_path):
    folder = _hypernet_only_folder(alter_folder, tmp_path / "run")
    routing = alter.find_routing(folder, "sd2")
    assert routing.source == "hypernet"
    net = _hypernet_class().from_pretrained(str(alter_folder / "hypernet")).double().eval()
    with torch.no_grad():
        expert_logits, router_logits = net()
    keep = (expert_logits + net.config.base >= 0).numpy()
    table = router_logits.argmax(dim=1).numpy()
    assert routing.masks.shape == (N_EXPERTS, 34)
    np.testing.assert_array_equal(routing.masks, keep)
    np.testing.assert_array_equal(routing.table, table)
    assert 0 < keep.mean() < 1 and len(set(table.tolist())) > 1   # the fixture exercises both outcomes
    assert alter.find_routing(alter_folder, "sd2").source == "pruning_mask.pth"


def test_hypernet_config_mismatches(tmp_path):
    cases = {"p_structures": dict(p_structures=[[1, 1, 2]] * 9),
             "inputs has shape": dict(p_structures=DOC_PIECES[:-1] + [[1, 1]])}
    for message, overrides in cases.items():
        folder = tmp_path / message.replace(" ", "_")
        _save_hypernet(folder, **overrides)
        if message == "inputs has shape":   # a consistent hypernet for 33 units: the UNet has 34
            cfg = json.loads((folder / "config.json").read_text())
            cfg["p_structures"] = DOC_PIECES
            (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConversionError, match=message):
            alter.read_hypernet(folder, "sd2")
    folder = tmp_path / "n_intervals"
    _save_hypernet(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_intervals"] = 7
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="n_intervals is 7"):
        alter.read_hypernet(folder, "sd2")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConversionError, match="without diffusion_pytorch_model.safetensors"):
        alter.read_hypernet(folder, "sd2")


def test_alter_folder_without_masks_is_an_error(alter_folder, tmp_path):
    folder = tmp_path / "run"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text((alter_folder / "unet" / "config.json").read_text())
    with pytest.raises(ConversionError, match="neither pruning_mask.pth nor hypernet"):
        alter.find_routing(folder, "sd2")


# ---- JSON mask files -----------------------------------------------------------------------------------

def _write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_json_masks_forms(tmp_path):
    rng = np.random.default_rng(0)
    experts = (rng.random((3, 34)) < 0.7).astype(int)
    table = rng.integers(0, 3, 1000)
    r = alter.read_mask_json(_write_json(tmp_path / "a.json", {"experts": experts.tolist(),
                                                                "timestep_expert": table.tolist()}), "sd1")
    assert r.source == "json:a.json" and r.units == DOC_UNITS
    np.testing.assert_array_equal(r.masks, experts.astype(bool))
    np.testing.assert_array_equal(r.table, table)

    # Per-timestep rows are deduplicated in order of first appearance.
    rows = experts[table]
    r = alter.read_mask_json(_write_json(tmp_path / "b.json", {"timestep_masks": rows.tolist(),
                                                                "skip_semantics": "consume"}), "sd1")
    order = list(dict.fromkeys(table.tolist()))
    np.testing.assert_array_equal(r.masks, experts[order].astype(bool))
    np.testing.assert_array_equal(r.table, [order.index(e) for e in table])
    assert r.semantics == "consume"

    # A subset of units, named in any of the accepted spellings; unlisted units are kept.
    doc = {"units": ["output_blocks.1.0", "model.diffusion_model.middle_block.0",
                     "down_blocks.0.attentions.1.transformer_blocks.0"], "experts": [[0, 1, 0]]}
    r = alter.read_mask_json(_write_json(tmp_path / "c.json", doc), "sd2")
    skipped = [u for u, k in zip(r.units, r.masks[0]) if not k]
    assert skipped == ["input_blocks.2.1.transformer_blocks.0", "output_blocks.1.0"]
    assert r.table.tolist() == [0] * 1000 and r.never_kept() == skipped


@pytest.mark.parametrize("doc, message", [
    ({"experts": [[1] * 33]}, "must have 34 entries"),
    ({"experts": [[1] * 33 + [2]]}, "exactly 0 or 1"),
    ({"experts": [[1] * 33 + ["1"]]}, "only the numbers 0 and 1"),
    ({"experts": [[1] * 34, [0] * 34]}, "no 'timestep_expert'"),
    ({"experts": [[1] * 34], "timestep_expert": [1] * 1000}, "refers to expert 1"),
    ({"experts": [[1] * 34], "timestep_expert": [0] * 999}, "list of 1000 integers"),
    ({"units": ["input_blocks.3.0"], "experts": [[0]]}, "unknown unit 'input_blocks.3.0'"),
    ({"units": ["middle_block.0", "mid_block.resnets.0"], "experts": [[0, 0]]}, "listed twice"),
    ({"timestep_masks": [[1] * 34] * 10}, "one row per timestep"),
    ({"timestep_masks": [[1] * 34] * 1000, "experts": [[1] * 34]}, "not both"),
    ({"expert": [[1] * 34]}, "unknown key 'expert'"),
    ({"experts": [[1] * 34], "skip_semantics": "pop"}, "skip_semantics must be"),
    ("{not json", "not valid JSON"),
])
def test_json_mask_errors(tmp_path, doc, message):
    with pytest.raises(ConversionError, match=message):
        alter.read_mask_json(_write_json(tmp_path / "m.json", doc), "sd2")


def test_cli_convert_with_json_masks_on_a_plain_folder(tmp_path):
    folder = diffusers_folder("sd1", tmp_path, reduced=True)
    masks = _write_json(tmp_path / "masks.json", {"units": ["input_blocks.10.0", "output_blocks.4.1.transformer_blocks.0"],
                                                  "experts": [[0, 1], [1, 0]],
                                                  "timestep_expert": [0] * 500 + [1] * 500})
    out = tmp_path / "sd1-alter.gguf"
    res = CliRunner().invoke(main, ["convert", str(folder), "-o", str(out), "--alter-masks", str(masks)])
    assert res.exit_code == 0, res.output
    assert "ALTER routing: 2 experts over 34 units, masks from json:masks.json" in res.output
    routing = read_alter(read_model_file(out).metadata)
    assert routing.source == "json:masks.json" and routing.dropped == []
    assert [u for u, k in zip(routing.units, routing.masks[0]) if not k] == ["input_blocks.10.0"]
    assert [u for u, k in zip(routing.units, routing.masks[1]) if not k] == ["output_blocks.4.1.transformer_blocks.0"]
    assert routing.table.tolist() == [0] * 500 + [1] * 500

    res = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "x.gguf"), "--drop-unused"])
    assert res.exit_code == 1 and "needs ALTER masks" in res.output


# ---- metadata reader -------------------------------------------------------------------------------------

def test_read_alter_errors_and_absence():
    units = alter.prunable_units("sd2")
    routing = alter.routing_from_timestep_masks(np.ones((1000, 34), bool), units, "test")
    md = routing_metadata(routing)
    assert read_alter({keys.FAMILY: "sd2"}) is None
    back = read_alter({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in md.items()})
    assert back.n_experts == 1 and back.masks.all() and back.dropped == []
    bad = dict(md)
    bad[keys.ALTER_EXPERT_MASKS] = md[keys.ALTER_EXPERT_MASKS][:-1]
    with pytest.raises(ConversionError, match="expert_masks has 33 entries"):
        read_alter(bad)
    bad = dict(md)
    bad[keys.ALTER_TIMESTEP_EXPERT] = np.full(1000, 3, np.uint32)
    with pytest.raises(ConversionError, match="timestep table"):
        read_alter(bad)
    bad = {k: v for k, v in md.items() if k != keys.ALTER_UNITS}
    with pytest.raises(ConversionError, match="incomplete"):
        read_alter(bad)


# ---- inspect ---------------------------------------------------------------------------------------------

def test_inspect_shows_experts_macs_and_steps(alter_gguf):
    from pysdcpp.alter_info import discrete_step_timesteps

    path, _ = alter_gguf
    res = CliRunner().invoke(main, ["inspect", str(path), "--json", "--size", "256", "--steps", "10"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)["alter"]
    routing = read_alter(read_model_file(path).metadata)
    # MACs against a hook count on diffusers' SD2.1 UNet (an independent count, see test_macs_match_a_hook_count)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{k: v for k, v in UNET_CONFIGS["sd2"].items() if k != "_class_name"}).eval()
    assert info["macs"]["dense"] == _counted_macs(unet, np.ones(34, bool), 32, 32)
    assert [e["macs"] for e in info["experts"]] == [_counted_macs(unet, m, 32, 32) for m in routing.masks]
    del unet
    # The discrete schedule's steps sit at t = 999 - i * 999 / (N - 1) (upstream's round trip t -> sigma -> t).
    np.testing.assert_allclose(info["schedule"]["timesteps"], np.linspace(999, 0, 10), atol=2e-3)
    assert info["schedule"]["timesteps"] == discrete_step_timesteps(10)
    assert info["schedule"]["experts"] == [int(routing.table[int(round(t))]) for t in np.linspace(999, 0, 10)]
    for e in info["experts"]:
        assert sorted(e["kept"] + e["skipped"]) == sorted(DOC_UNITS)
        assert sum(b - a + 1 for a, b in e["timesteps"]) == e["n_timesteps"] == int((routing.table == e["index"]).sum())
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    assert "ALTER routing: 4 experts over 34 units" in res.output and "expert 0 skips:" in res.output
    assert "(1000 entries)" in res.output


# ---- MACs against a hook count on the diffusers UNet -----------------------------------------------------

def _counted_macs(unet, keep, h, w):
    from diffusers.models.attention_processor import Attention

    total = [0]

    def conv_hook(mod, inp, out):
        total[0] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    def linear_hook(mod, inp, out):
        total[0] += out.numel() * mod.in_features

    def attention_hook(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states")
        n, m = x.shape[1], (ctx if ctx is not None else x).shape[1]
        inner = mod.to_q.out_features
        total[0] += 2 * x.shape[0] * n * m * inner   # Q K^T and P V over all heads

    handles = []
    for mod in unet.modules():
        if isinstance(mod, torch.nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, Attention):
            handles.append(mod.register_forward_pre_hook(attention_hook, with_kwargs=True))
    try:
        ctx_dim = unet.config.cross_attention_dim
        with torch.no_grad():
            alter_unet_forward(unet, torch.zeros(1, 4, h, w), 500, torch.zeros(1, 77, ctx_dim), keep)
    finally:
        for hd in handles:
            hd.remove()
    return total[0]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_macs_match_a_hook_count(family):
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in UNET_CONFIGS[family].items() if k != "_class_name"}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval()
    rng = np.random.default_rng(1)
    masks = [np.ones(34, bool), rng.random(34) < 0.6, rng.random(34) < 0.3]
    for (h, w), keep in [((32, 32), masks[0]), ((32, 32), masks[1]), ((32, 32), masks[2]), ((24, 40), masks[1])]:
        counted = _counted_macs(unet, keep, h, w)
        ours = unet_macs(family, h, w).with_mask(keep)
        assert abs(ours - counted) <= 0.005 * counted, (family, ours, counted)
        assert ours == counted   # the same definition, counted two ways: exact
    macs = unet_macs(family, 32, 32)
    assert unet_macs(family, 32, 32, batch=2).dense == 2 * macs.dense
    assert macs.experts(alter.routing_from_timestep_masks(np.ones((1000, 34), bool), alter.prunable_units(family),
                                                          "t")) == [macs.dense]


# ---- the PyTorch reference of ALTER's eval path ------------------------------------------------------------

def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 16, generator=g)


@pytest.mark.parametrize("linear", [False, True])
def test_reference_with_all_units_kept_is_the_diffusers_forward(linear):
    unet = _tiny_unet(linear)
    x, ctx = _inputs()
    with torch.no_grad():
        for t in (0, 999, 321.5):
            assert torch.equal(alter_unet_forward(unet, x, t, ctx, [True] * 34), unet(x, t, ctx).sample)


def _keep_all_but(*names):
    units = [u.name for u in alter.prunable_units(_tiny_config(True))]
    return [u not in names for u in units]


def _patched_forward(unet, x, t, ctx, module, replacement):
    original = module.forward
    module.forward = replacement
    try:
        with torch.no_grad():
            return unet(x, t, ctx).sample
    finally:
        module.forward = original


def test_reference_skips_match_manual_computations():
    unet = _tiny_unet(linear=True)
    x, ctx = _inputs(1)
    run = lambda keep, sem="reference": alter_unet_forward(unet, x, 250, ctx, keep, sem)  # noqa: E731

    with torch.no_grad():
        # Down-block ResNet: identity.
        want = _patched_forward(unet, x, 250, ctx, unet.down_blocks[0].resnets[0], lambda h, temb, *a, **k: h)
        assert torch.equal(run(_keep_all_but("input_blocks.1.0")), want)
        # Transformer unit: only the BasicTransformerBlock is bypassed.
        block = unet.up_blocks[2].attentions[1].transformer_blocks[0]
        want = _patched_forward(unet, x, 250, ctx, block, lambda h, *a, **k: h)
        assert torch.equal(run(_keep_all_but("output_blocks.7.1.transformer_blocks.0")), want)
        # ResNet in a cross-attention up block: the skip is popped and concatenated, then discarded.
        resnet = unet.up_blocks[1].resnets[1]
        c = resnet.out_channels
        want = _patched_forward(unet, x, 250, ctx, resnet, lambda h, temb, *a, **k: h[:, :c])
        assert torch.equal(run(_keep_all_but("output_blocks.4.0")), want)
        # Plain up block, "consume": pop and discard.
        resnet = unet.up_blocks[0].resnets[0]
        c = resnet.out_channels
        want = _patched_forward(unet, x, 250, ctx, resnet, lambda h, temb, *a, **k: h[:, :c])
        assert torch.equal(run(_keep_all_but("output_blocks.0.0"), "consume"), want)

        # Plain up block, "reference": resnets 1 and 2 take the skips resnets 0 and 1 would have; the last is dropped.
        block = unet.up_blocks[0]

        def manual_up0(hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None, *a, **k):
            h = block.resnets[1](torch.cat([hidden_states, res_hidden_states_tuple[-1]], 1), temb)
            h = block.resnets[2](torch.cat([h, res_hidden_states_tuple[-2]], 1), temb)
            return block.upsamplers[0](h, upsample_size)

        want = _patched_forward(unet, x, 250, ctx, block, manual_up0)
        got = run(_keep_all_but("output_blocks.0.0"))
        assert torch.equal(got, want)
        assert not torch.equal(got, run(_keep_all_but("output_blocks.0.0"), "consume"))
        # Skipping the last ResNet of the plain block: both semantics drop its skip.
        keep = _keep_all_but("output_blocks.2.0")
        assert torch.equal(run(keep), run(keep, "consume"))
