"""Checkpoint converters (models/convert.py): MUG-V <-> ours <-> Megatron-Core names, and TP shards.

The fixture ``fixtures/mugv_dit_tiny_keys.json`` holds the key names and shapes of the *reference* module's state dict
for our tiny config (hidden 144, depth 2, 2 heads, caption 64, in 24, patch 1x2x2). It was produced by building
``MUGDiT(input_channels=24, patch_size=(1, 2, 2), hidden_size=144, depth=2, num_heads=2, text_input_channels=64,
qk_norm=True)`` from a /tmp copy of Shopee-MUG/MUG-V@34be017 ``mug_v/dit/{model,module}.py`` on CPU, with stub
``flash_attn``/``xformers`` modules so the imports resolve (no forward was run), and dumping ``state_dict()``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import convert
from models.config import dit_tiny
from models.convert import (
    ConversionError,
    export_mugv_dit,
    from_megatron,
    import_mugv_dit,
    merge_tp,
    shard_tp,
    to_megatron,
)
from models.dit import tiny

FIXTURE = Path(__file__).parent / "fixtures" / "mugv_dit_tiny_keys.json"
Y = "y_embedder.y_embedding"


def _perturbed(seed: int = 0, **kw) -> dict:
    """A tiny MUGDiT state dict with every tensor moved off its (zero/identity) init, so permutations show."""
    torch.manual_seed(seed)
    sd = tiny(**kw).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    return {k: v + torch.randn(v.shape, generator=g) for k, v in sd.items()}


def _assert_bitwise(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        if a[k] is None:
            assert b[k] is None, k
            continue
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ mugv <-> ours


def test_our_keys_and_shapes_equal_the_reference_module():
    ref = {k: tuple(s) for k, s in json.loads(FIXTURE.read_text())["keys"].items()}
    ours = {k: tuple(v.shape) for k, v in tiny().state_dict().items()}
    assert ours.pop(Y) == (32, 64)
    assert ours == ref
    assert convert.mugv_key_shapes(dit_tiny()) == ref            # the converter's own shape table


def test_import_export_round_trip_is_bitwise_and_keeps_dtype():
    ours = {k: v.to(torch.bfloat16) for k, v in _perturbed().items()}   # the release is bf16
    mugv = export_mugv_dit(ours)
    assert set(mugv) == set(json.loads(FIXTURE.read_text())["keys"])
    back = import_mugv_dit(mugv, dit_tiny(), y_embedding=ours[Y])
    _assert_bitwise(back, ours)
    # nested wrappers and DDP / torch.compile prefixes are unwrapped; the config can be inferred
    nested = {"model": {f"module.{k}": v for k, v in mugv.items()}, "iteration": 3}
    _assert_bitwise(import_mugv_dit(nested, y_embedding=ours[Y]), ours)
    _assert_bitwise(import_mugv_dit({"state_dict": {f"_orig_mod.{k}": v for k, v in mugv.items()}},
                                    y_embedding=ours[Y]), ours)
    model = tiny().to(torch.bfloat16)
    model.load_state_dict(back, strict=True)


def test_import_null_caption_sources():
    ours = _perturbed()
    mugv = export_mugv_dit(ours)
    with pytest.raises(ConversionError, match="no null caption .* y_embedding= .* keep_y_embedding=True"):
        import_mugv_dit(mugv)
    kept = import_mugv_dit(mugv, keep_y_embedding=True)
    model = tiny()
    own = model.y_embedder.y_embedding.clone()
    res = model.load_state_dict(kept, strict=False)
    assert res.missing_keys == [Y] and not res.unexpected_keys and torch.equal(model.y_embedder.y_embedding, own)
    _assert_bitwise(import_mugv_dit(ours), ours)                 # already in the dict (a training export)
    with pytest.raises(ConversionError, match=r"y_embedding has shape \(300, 4096\).*\(32, 64\)"):
        import_mugv_dit(mugv, dit_tiny(), y_embedding=torch.zeros(300, 4096))


def test_import_names_every_bad_key():
    mugv = export_mugv_dit(_perturbed())
    bad = dict(mugv)
    del bad["blocks.1.mlp.fc2.bias"], bad["start_token"]
    bad["blocks.0.attn.extra.weight"] = torch.zeros(1)
    bad["final_layer.linear.weight"] = torch.zeros(10, 144)
    with pytest.raises(ConversionError) as e:
        import_mugv_dit(bad, dit_tiny(), y_embedding=torch.zeros(32, 64))
    msg = str(e.value)
    for part in ("2 missing", "blocks.1.mlp.fc2.bias", "start_token", "1 unexpected", "blocks.0.attn.extra.weight",
                 "1 with the wrong shape", "final_layer.linear.weight: (10, 144) != (192, 144)", "hidden 144"):
        assert part in msg, (part, msg)
    with pytest.raises(ConversionError, match="wrong shape"):   # a 10B config against tiny weights
        from models.config import dit_mugv_10b
        import_mugv_dit(mugv, dit_mugv_10b(), y_embedding=torch.zeros(300, 4096))


# ------------------------------------------------------------------------------------------------ megatron


MEGATRON_BLOCK0 = {   # docs/mugv.md §6.7, HF -> mcore
    "blocks.0.attn.qkv.weight": "decoder.layers.0.self_attention.linear_qkv.weight",
    "blocks.0.attn.qkv.bias": "decoder.layers.0.self_attention.linear_qkv.bias",
    "blocks.0.attn.proj.weight": "decoder.layers.0.self_attention.linear_proj.weight",
    "blocks.0.attn.proj.bias": "decoder.layers.0.self_attention.linear_proj.bias",
    "blocks.0.attn.q_norm.weight": "decoder.layers.0.self_attention.q_layernorm.weight",
    "blocks.0.attn.k_norm.weight": "decoder.layers.0.self_attention.k_layernorm.weight",
    "blocks.0.cross_attn_norm.weight": "decoder.layers.0.pre_cross_attn_layernorm.weight",
    "blocks.0.cross_attn_norm.bias": "decoder.layers.0.pre_cross_attn_layernorm.bias",
    "blocks.0.cross_attn.q_linear.weight": "decoder.layers.0.cross_attention.linear_q.weight",
    "blocks.0.cross_attn.q_linear.bias": "decoder.layers.0.cross_attention.linear_q.bias",
    "blocks.0.cross_attn.kv_linear.weight": "decoder.layers.0.cross_attention.linear_kv.weight",
    "blocks.0.cross_attn.kv_linear.bias": "decoder.layers.0.cross_attention.linear_kv.bias",
    "blocks.0.cross_attn.proj.weight": "decoder.layers.0.cross_attention.linear_proj.weight",
    "blocks.0.cross_attn.proj.bias": "decoder.layers.0.cross_attention.linear_proj.bias",
    "blocks.0.cross_attn.q_norm.weight": "decoder.layers.0.cross_attention.q_layernorm.weight",
    "blocks.0.cross_attn.k_norm.weight": "decoder.layers.0.cross_attention.k_layernorm.weight",
    "blocks.0.mlp.fc1.weight": "decoder.layers.0.mlp.linear_fc1.weight",
    "blocks.0.mlp.fc1.bias": "decoder.layers.0.mlp.linear_fc1.bias",
    "blocks.0.mlp.fc2.weight": "decoder.layers.0.mlp.linear_fc2.weight",
    "blocks.0.mlp.fc2.bias": "decoder.layers.0.mlp.linear_fc2.bias",
    "blocks.0.scale_shift_table": "decoder.layers.0.scale_shift_table.bias",
}
MEGATRON_TOP = {
    "start_token": "start_token", "end_token": "end_token",
    "x_embedder.proj.weight": "x_embedder.proj.weight", "x_embedder.proj.bias": "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight": "timestep_embedder.mlp.0.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.mlp.2.bias",
    "fps_embedder.mlp.0.weight": "fps_embedder.mlp.0.weight",
    "t_block.1.weight": "timestep_block.1.weight", "t_block.1.bias": "timestep_block.1.bias",
    "y_embedder.y_proj.fc1.weight": "context_embedder.proj.fc1.weight",
    "y_embedder.y_proj.fc2.bias": "context_embedder.proj.fc2.bias",
    Y: "context_embedder.drop_emb",
    "final_layer.scale_shift_table": "final_layer.scale_shift_table.bias",
    "final_layer.linear.weight": "final_layer.linear.weight", "final_layer.linear.bias": "final_layer.linear.bias",
}


def test_to_megatron_names_and_head_major_rows():
    ours = _perturbed(num_heads=4)                       # head_dim 36
    mc = to_megatron(ours, dit_tiny(num_heads=4))
    assert len(mc) == len(ours)
    for o, m in {**MEGATRON_BLOCK0, **MEGATRON_TOP}.items():
        assert m in mc, m
        if "qkv" not in o and "kv_linear" not in o:
            assert torch.equal(mc[m], ours[o]), o
    # (3, nh, d) -> (nh, 3, d): megatron row (j, p, i) is ours row (p, j, i); kv likewise with 2 parts
    nh, d = 4, 36
    q = ours["blocks.1.attn.qkv.weight"].view(3, nh, d, -1)
    m = mc["decoder.layers.1.self_attention.linear_qkv.weight"].view(nh, 3, d, -1)
    for j in range(nh):
        for p in range(3):
            assert torch.equal(m[j, p], q[p, j])
    kv = ours["blocks.0.cross_attn.kv_linear.bias"].view(2, nh, d)
    assert torch.equal(mc["decoder.layers.0.cross_attention.linear_kv.bias"].view(nh, 2, d), kv.transpose(0, 1))


def test_megatron_round_trip_is_bitwise_with_te_extra_state_and_stacked_layers():
    ours = _perturbed(num_heads=4)
    _assert_bitwise(from_megatron(to_megatron(ours), dit_tiny(num_heads=4)), ours)
    te = to_megatron(ours, extra_state=True)
    extra = sorted(k for k in te if k.endswith("._extra_state"))
    per_layer = ["cross_attention.linear_kv", "cross_attention.linear_proj", "cross_attention.linear_q",
                 "mlp.linear_fc1", "mlp.linear_fc2", "scale_shift_table", "self_attention.linear_proj",
                 "self_attention.linear_qkv"]
    assert extra == sorted(["final_layer.scale_shift_table._extra_state"] +
                           [f"decoder.layers.{i}.{m}._extra_state" for i in range(2) for m in per_layer])
    assert all(te[k] is None for k in extra)
    _assert_bitwise(from_megatron({"model": te}), ours)
    # torch_dist (DCP) form: decoder.layers.<name> stacked over layers
    stacked = {k: v for k, v in te.items() if not k.startswith("decoder.layers.")}
    for name in {k.split(".", 3)[3] for k in te if k.startswith("decoder.layers.")}:
        if not name.endswith("_extra_state"):
            stacked[f"decoder.layers.{name}"] = torch.stack([te[f"decoder.layers.{i}.{name}"] for i in range(2)])
    _assert_bitwise(from_megatron(stacked), ours)
    with pytest.raises(ConversionError, match="unexpected Megatron key decoder.layers.0.mlp.linear_fc3.weight"):
        from_megatron({**te, "decoder.layers.0.mlp.linear_fc3.weight": torch.zeros(1)})
    no_y = {k: v for k, v in te.items() if k != "context_embedder.drop_emb"}
    with pytest.raises(ConversionError, match="no context_embedder.drop_emb"):
        from_megatron(no_y)
    _assert_bitwise(from_megatron(no_y, y_embedding=ours[Y]), ours)


# ------------------------------------------------------------------------------------------------ tensor parallel

COLUMN = {"attn.qkv": 3, "cross_attn.q_linear": 1, "cross_attn.kv_linear": 2, "mlp.fc1": 1}
ROW = ("attn.proj", "cross_attn.proj", "mlp.fc2")


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_merge_round_trip_both_layouts(tp):
    ours = _perturbed(num_heads=4)
    mc = to_megatron(ours, extra_state=True)
    for layout, full in (("ours", ours), ("megatron", mc)):
        shards = [shard_tp(full, tp, r, layout) for r in range(tp)]
        _assert_bitwise(merge_tp(shards, layout), full)
    for r in range(tp):   # the per-head row order makes the two layouts' shards the same weights
        local = shard_tp(ours, tp, r, "ours")
        assert local["blocks.0.attn.qkv.weight"].shape == (3 * 144 // tp, 144)
        assert local["blocks.0.attn.proj.weight"].shape == (144, 144 // tp)
        assert torch.equal(local["blocks.0.attn.proj.bias"], ours["blocks.0.attn.proj.bias"])
        _assert_bitwise(shard_tp(mc, tp, r, "megatron"), to_megatron(local, extra_state=True))
    with pytest.raises(ValueError, match="4 heads cannot be split over tp=3"):
        shard_tp(ours, 3, 0)
    bad = [shard_tp(ours, 2, r) for r in range(2)]
    bad[1]["start_token"] = bad[1]["start_token"] + 1
    with pytest.raises(ConversionError, match="start_token should be replicated"):
        merge_tp(bad)


@pytest.mark.parametrize("tp", [2, 4])
@torch.no_grad()
def test_simulated_tp_matmuls_equal_the_full_ones(tp):
    """Column: rank outputs concatenated (per q/k/v part in ours, plainly in megatron) = full output. Row: rank
    partial products summed (+ the replicated bias once) = full output."""
    ours = _perturbed(num_heads=4)
    mc = to_megatron(ours)
    g = torch.Generator().manual_seed(0)
    shards = [shard_tp(ours, tp, r) for r in range(tp)]
    mc_shards = [shard_tp(mc, tp, r, "megatron") for r in range(tp)]
    for i in range(2):
        for leaf, parts in COLUMN.items():
            w, b = (f"blocks.{i}.{leaf}.{s}" for s in ("weight", "bias"))
            x = torch.randn(5, ours[w].shape[1], generator=g, dtype=torch.float64)
            full = x @ ours[w].double().T + ours[b].double()
            outs = [x @ s[w].double().T + s[b].double() for s in shards]
            merged = torch.cat([o.view(5, parts, -1) for o in outs], dim=2).view(5, -1)
            torch.testing.assert_close(merged, full, rtol=1e-12, atol=1e-12)
            mname = f"decoder.layers.{i}.{convert._BY_OURS[leaf + '.weight'][0]}"
            mbias = mname.replace(".weight", ".bias")
            full_mc = x @ mc[mname].double().T + mc[mbias].double()
            torch.testing.assert_close(torch.cat([x @ s[mname].double().T + s[mbias].double() for s in mc_shards], 1),
                                       full_mc, rtol=1e-12, atol=1e-12)
        for leaf in ROW:
            w, b = f"blocks.{i}.{leaf}.weight", f"blocks.{i}.{leaf}.bias"
            x = torch.randn(5, ours[w].shape[1], generator=g, dtype=torch.float64)
            xs = x.chunk(tp, dim=1)                       # the column-parallel layer before left x sharded
            total = sum(xr @ s[w].double().T for xr, s in zip(xs, shards)) + shards[0][b].double()
            torch.testing.assert_close(total, x @ ours[w].double().T + ours[b].double(), rtol=1e-12, atol=1e-12)


def test_trainer_tp_plan_is_the_converter_rule():
    """The trainer shards exactly the linears the converter's rules name, with the same kind and fused parts
    (parallel_output_check.py tp then checks the live shards bitwise against shard_tp)."""
    from models.dit import tiny
    from trainer.parallel.tensor_parallel import _plan_for

    plan = {n: _plan_for(n) for n, m in tiny().named_modules() if isinstance(m, torch.nn.Linear)}
    sharded = {n.split(".", 2)[2]: p for n, p in plan.items() if p and n.startswith("blocks.0.")}
    assert sharded == {"attn.qkv": ("column", 3), "attn.proj": ("row", 1), "cross_attn.q_linear": ("column", 1),
                       "cross_attn.kv_linear": ("column", 2), "cross_attn.proj": ("row", 1),
                       "mlp.fc1": ("column", 1), "mlp.fc2": ("row", 1)}
    assert all(p is None for n, p in plan.items() if not n.startswith("blocks."))


@pytest.mark.timeout(180)
def test_tp2_output_and_gradients_equal_tp1(tmp_path):
    """torchrun, 2 gloo CPU processes (tests/parallel_output_check.py tp): fp32, only the reduction order differs, so
    the output must match TP=1 to 1e-5 absolute (|out| <= ~3; measured 9.5e-7) and the gradients to 1e-5 relative
    (L2 per tensor; measured 5.7e-7); each rank's megatron-layer weights equal shard_tp(layout="ours") bitwise."""
    from parallel_output_check import run_check

    res = run_check("tp", tmp_path, timeout=170)
    assert res["tp"] == 2 and res["backend"] == "local" and res["state_dict_keys_unchanged"]
    assert res["layer_types"] == ["DiTColumnParallelLinear", "DiTRowParallelLinear"]
    assert res["shard_mismatch"] == []
    assert res["out_max_abs"] < 1e-5 and res["out_scale"] > 0.1
    assert res["grad_max_rel"] < 1e-5


def test_tp_layer_specs_one_place():
    from megatron.core.transformer.spec_utils import ModuleSpec

    from trainer.parallel.tensor_parallel import tp_layer_specs

    for backend in ("local", "te"):                  # no TE / CUDA here: "te" falls back to the local layers
        specs = tp_layer_specs(backend)
        assert set(specs) == {"column", "row"} and all(isinstance(s, ModuleSpec) for s in specs.values())
        assert specs["column"].params["gather_output"] is False and specs["row"].params["input_is_parallel"] is True
    if not torch.cuda.is_available():
        assert tp_layer_specs("te")["column"].metainfo["backend"] == "local"
    with pytest.raises(ValueError, match="backend must be"):
        tp_layer_specs("apex")


# ------------------------------------------------------------------------------------------------ files and CLI


def test_cli_round_trip_through_every_format(tmp_path):
    ours = _perturbed(num_heads=4)
    mugv = export_mugv_dit(ours)
    torch.save(mugv, tmp_path / "dit.pt")
    torch.save(ours[Y].clone(), tmp_path / "y_embedding.pt")
    convert.main(["import", str(tmp_path / "dit.pt"), str(tmp_path / "ours.safetensors"),
                  "--y-embedding", str(tmp_path / "y_embedding.pt")])
    convert.main(["to-megatron", str(tmp_path / "ours.safetensors"), str(tmp_path / "mcore"), "--tp", "2",
                  "--use-te"])
    ranks = sorted((tmp_path / "mcore").rglob("model_optim_rng.pt"))
    assert [p.relative_to(tmp_path / "mcore").as_posix() for p in ranks] == [
        "iter_0000001/mp_rank_00/model_optim_rng.pt", "iter_0000001/mp_rank_01/model_optim_rng.pt"]
    assert (tmp_path / "mcore" / "latest_checkpointed_iteration.txt").read_text() == "1"
    rank1 = torch.load(ranks[1], weights_only=True)["model"]
    assert rank1["decoder.layers.0.mlp.linear_fc1.weight"].shape == (288, 144)
    assert rank1["decoder.layers.0.self_attention.linear_qkv._extra_state"] is None
    convert.main(["from-megatron", str(tmp_path / "mcore"), str(tmp_path / "back.pt")])
    convert.main(["export", str(tmp_path / "back.pt"), str(tmp_path / "dit2.safetensors"),
                  "--y-embedding-out", str(tmp_path / "y2.pt")])
    from safetensors.torch import load_file

    _assert_bitwise(torch.load(tmp_path / "back.pt", weights_only=True), ours)
    _assert_bitwise(load_file(str(tmp_path / "dit2.safetensors")), mugv)
    assert torch.equal(torch.load(tmp_path / "y2.pt", weights_only=True), ours[Y])
    with pytest.raises(ConversionError, match="no null caption"):
        convert.main(["import", str(tmp_path / "dit.pt"), str(tmp_path / "x.pt")])


def test_save_safetensors_export_materialises_views(tmp_path):
    from safetensors.torch import load_file, safe_open

    base = torch.arange(12.0)
    sd = {"a": base[:6], "b": base.view(3, 4).T, "c": torch.ones(2, dtype=torch.bfloat16)}   # shared, strided
    convert.save_safetensors_export(tmp_path / "x.safetensors", sd, {"layout": "ours"})
    _assert_bitwise(load_file(str(tmp_path / "x.safetensors")), {k: v.contiguous() for k, v in sd.items()})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "layout": "ours"}
