"""Run the PyTorch originals (diffusers / transformers, float32) of a synthetic fixture on given inputs, in a process
of their own, so that a 10 GB SDXL UNet and our runtime never share one process: `python torch_reference.py FAMILY
INPUTS.npz OUTPUTS.npz`. Inputs and outputs are named arrays (see `compute`); conftest.reference_arrays caches the
outputs beside the fixture."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


def compute(family: str, inputs: dict[str, np.ndarray], variant: str = "base") -> dict[str, np.ndarray]:
    """ids -> text_encoder (hidden states before the last layer, as SDXL and upstream use them) and, with two
    encoders, text_encoder_2 and pooled; latent + timesteps + context (+ y) -> unet; alter_* (latent, context, y,
    timesteps, keep rows, consume flags) -> alter and alter_dense (tests/alter_reference.py's eval path with the
    units skipped, and with none); vae_latent -> vae (raw decoder output of latent / scaling factor).
    unet_q8_0 (any value): the UNet's weights rounded as a q8_0 file holds them (see _round_q8_0), which adds
    unet_q8_0_counts (tensors, elements rounded). deepcache_* (latents (S, 1, C, h, w), timesteps (S,), context,
    y, branches, interval) -> deepcache (branches, S, 1, C', h, w): the sequence of evaluations under the DeepCache
    package's own helper, once per branch. conv_in_variants (names of variants that differ from `variant` in conv_in
    alone: inpaint, pix2pix) with latent.NAME, context.NAME (+ y.NAME) and timesteps -> unet.NAME: the UNet with that
    variant's conv_in in place of its own, one UNet built for all of them."""
    from conftest import FIXTURE_SEED, synthetic, torch_reference

    out: dict[str, np.ndarray] = {}
    torch.set_num_threads(2)
    with torch.no_grad():
        if "ids" in inputs:
            ids = torch.from_numpy(inputs["ids"].astype(np.int64))
            names = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
            for name in names:
                module = torch_reference(family, name, variant)
                tokens = ids
                if name == "text_encoder_2":
                    # SDXL's second tokenizer pads with "!" (id 0) after the end token, where the first pads with
                    # the end token itself (diffusers' tokenizer_2; upstream does the same)
                    tokens = ids.clone()
                    for row in tokens:
                        end = int((row == 49407).nonzero()[0])
                        row[end + 1:] = 0
                result = module(tokens, output_hidden_states=True)
                out[f"{name}.last"] = result.last_hidden_state.numpy()
                out[f"{name}.penultimate"] = result.hidden_states[-2].numpy()
                if name == "text_encoder_2":
                    out["pooled"] = result.text_embeds.numpy()
                del module, result
                gc.collect()
        if "latent" in inputs or "alter_keep" in inputs or "conv_in_variants" in inputs:
            unet = torch_reference(family, "unet", variant)
            if "unet_q8_0" in inputs:
                out["unet_q8_0_counts"] = _round_q8_0(unet)
            kwargs = _feed_y(unet, inputs["y"]) if "latent" in inputs and "y" in inputs else {}
            if "latent" in inputs:
                out["unet"] = unet(torch.from_numpy(inputs["latent"]), torch.from_numpy(inputs["timesteps"]),
                                   encoder_hidden_states=torch.from_numpy(inputs["context"]), **kwargs).sample.numpy()
            for name in inputs.get("conv_in_variants", []):
                name = str(name)
                sources = {t.name: t for t in synthetic.synthetic_sources(family, FIXTURE_SEED, variant=name)["unet"]}
                weight = torch.from_numpy(sources["conv_in.weight"].load().astype(np.float32))
                conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
                conv.weight.copy_(weight)
                conv.bias.copy_(torch.from_numpy(sources["conv_in.bias"].load().astype(np.float32)))
                own, unet.conv_in = unet.conv_in, conv
                extra = _feed_y(unet, inputs[f"y.{name}"]) if f"y.{name}" in inputs else {}
                try:
                    out[f"unet.{name}"] = unet(torch.from_numpy(inputs[f"latent.{name}"]),
                                               torch.from_numpy(inputs["timesteps"]),
                                               encoder_hidden_states=torch.from_numpy(inputs[f"context.{name}"]),
                                               **extra).sample.numpy()
                finally:
                    unet.conv_in = own
            if "deepcache_latents" in inputs:
                out["deepcache"] = _deepcache(unet, inputs)
            if "alter_keep" in inputs:
                from alter_reference import alter_unet_forward

                x, c = torch.from_numpy(inputs["alter_latent"]), torch.from_numpy(inputs["alter_context"])
                y = torch.from_numpy(inputs["alter_y"]) if "alter_y" in inputs else None
                skipped, dense = [], []
                for t, keep, consume in zip(inputs["alter_timesteps"], inputs["alter_keep"], inputs["alter_consume"]):
                    tt = torch.tensor([float(t)])
                    skipped.append(alter_unet_forward(unet, x, tt, c, [bool(k) for k in keep],
                                                      "consume" if consume else "reference", y).numpy())
                    dense.append(alter_unet_forward(unet, x, tt, c, [True] * len(keep), "reference", y).numpy())
                out["alter"], out["alter_dense"] = np.stack(skipped), np.stack(dense)
            del unet
            gc.collect()
        if "vae_latent" in inputs:
            vae = torch_reference(family, "vae", variant)
            scale = synthetic.model_configs(family, variant=variant)["vae"]["scaling_factor"]
            out["vae"] = vae.decode(torch.from_numpy(inputs["vae_latent"]) / scale).sample.numpy()
            del vae
    return out


def _feed_y(unet, y: np.ndarray) -> dict:
    """The forward's keyword arguments that feed a given SDXL y through diffusers' own forward. diffusers builds y
    as [text_embeds, add_time_proj(time_ids)]: add_time_proj is made to hand back y's tail (the size embeddings)
    for dummy time ids."""
    y = torch.from_numpy(y)
    unet.add_time_proj = _Fixed(y[:, 1280:].reshape(-1, unet.config.addition_time_embed_dim))
    return {"added_cond_kwargs": {"text_embeds": y[:, :1280], "time_ids": torch.zeros(len(y), 6)}}


def _deepcache(unet, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """DeepCacheSDHelper over a sequence of evaluations, on a stand-in pipeline holding the UNet and the
    sequence's timesteps (the helper finds each call's step by its timestep)."""
    import types

    from DeepCache import DeepCacheSDHelper

    ts = [float(t) for t in inputs["deepcache_timesteps"]]
    c = torch.from_numpy(inputs["deepcache_context"])
    kwargs = _feed_y(unet, inputs["deepcache_y"]) if "deepcache_y" in inputs else {}
    pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=torch.tensor(ts)))
    per_branch = []
    for branch in inputs["deepcache_branches"]:
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=int(inputs["deepcache_interval"][0]), cache_branch_id=int(branch))
        helper.enable()
        try:
            per_branch.append(np.stack([
                pipe.unet(torch.from_numpy(x), torch.tensor([t]), encoder_hidden_states=c, **kwargs).sample.numpy()
                for x, t in zip(inputs["deepcache_latents"], ts)]))
        finally:
            helper.disable()
    return np.stack(per_branch)


def _q8_0_roundtrip(a: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    a = np.ascontiguousarray(a, dtype=np.float32)
    return dequantize(quantize(a, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0).reshape(a.shape)


def _round_q8_0(unet) -> np.ndarray:
    """Round the weights a q8_0 file quantizes (those whose rows are whole 32-value blocks, norms' included; biases
    and the time and label embeddings excepted: upstream's rule, restated here) through gguf-py's own Q8_0
    quantize/dequantize (the loader widens a q8_0 norm weight to F32). ggml's q8_0 product also rounds its input
    rows to q8_0 blocks; that is not mimicked: where the inputs already differ by float rounding, the two
    roundings fall apart and an imitation only adds noise (measured). Returns (tensors, elements) rounded, for the
    test to hold against the file's count of q8_0 tensors."""
    tensors = elements = 0
    for name, p in unet.named_parameters():
        if name.endswith(".bias") or p.shape[-1] % 32 or name.startswith(("time_embedding.", "add_embedding.")):
            continue
        p.data.copy_(torch.from_numpy(_q8_0_roundtrip(p.detach().numpy())))
        tensors, elements = tensors + 1, elements + p.numel()
    return np.array([tensors, elements], dtype=np.int64)


class _Fixed(torch.nn.Module):
    """Stands in for a module: returns the same tensor whatever it is given."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


def main(argv: list[str]) -> int:
    family, src, dst = argv[1], Path(argv[2]), Path(argv[3])
    variant = argv[4] if len(argv) > 4 else "base"
    with np.load(src) as f:
        inputs = {k: f[k] for k in f.files}
    out = compute(family, inputs, variant)
    tmp = dst.with_name(dst.name + ".partial.npz")
    np.savez(tmp, **out)
    tmp.replace(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
