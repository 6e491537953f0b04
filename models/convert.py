"""MUGDiT checkpoint converters: MUG-V inference ``dit.pt`` <-> ours <-> Megatron-Core, and tensor-parallel shards.

Three layouts of the same weights (docs/mugv.md §6.7):

- **mugv**: the released inference checkpoint (`Shopee-MUG/MUG-V` ``mug_v/dit/model.py``, loaded there with
  ``model.load_state_dict(torch.load(path), strict=True)``: a flat dict, bf16). No null caption: MUG-V ships it
  separately as ``fixtures/y_embedding.pt`` [300, 4096].
- **ours**: ``models/dit.py`` MUGDiT, the mugv names plus the buffer ``y_embedder.y_embedding`` (the null caption).
- **megatron**: the training repo's Megatron-Core model (``decoder.layers.{i}.self_attention.linear_qkv.weight``,
  ...). Fused projections keep their rows per head: qkv rows (3, heads, head_dim) become (heads, 3, head_dim), kv
  rows (2, heads, head_dim) become (heads, 2, head_dim). With Transformer Engine, the linears and scale-shift tables
  also carry an ``_extra_state`` entry (``None`` after conversion).

Tensor parallelism (``shard_tp``/``merge_tp``): column-parallel weights and biases are split on dim 0, row-parallel
weights on dim 1 (their biases are replicated), everything else is replicated. In the ours layout the fused qkv/kv
rows are split per part (rank r keeps heads [r*nh/tp, (r+1)*nh/tp) of each of q, k, v), which is what
``trainer/parallel.py`` does; in the megatron layout the per-head row order makes that a contiguous chunk.

Conversions are pure renames and row permutations: no dtype change, so every round trip is bitwise. Only torch is
imported (safetensors lazily, for the ``.safetensors`` files).

    python -m models.convert import dit.pt ours.safetensors --y-embedding fixtures/y_embedding.pt
    python -m models.convert export ours.safetensors dit.pt --y-embedding-out y_embedding.pt
    python -m models.convert to-megatron ours.safetensors mcore_ckpt/ --tp 4 --use-te
    python -m models.convert from-megatron mcore_ckpt/ ours.safetensors
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from models.weights import StateDict, WeightsError, read_state_dict, unwrap_state_dict

Y_EMBEDDING = "y_embedder.y_embedding"
FREQ_DIM = 256                         # sinusoid width of the timestep/fps embedders (models/dit.py FREQ_DIM)

# ------------------------------------------------------------------------------------------------ name map (§6.7)
# per block: (ours/mugv leaf, megatron leaf, TP rule, fused parts). TP rule: "column" = split dim 0 (per part in the
# ours layout), "row" = split dim 1, None = replicated.
_BLOCK_MAP: List[Tuple[str, str, Optional[str], int]] = [
    ("attn.qkv.weight", "self_attention.linear_qkv.weight", "column", 3),
    ("attn.qkv.bias", "self_attention.linear_qkv.bias", "column", 3),
    ("attn.q_norm.weight", "self_attention.q_layernorm.weight", None, 1),
    ("attn.k_norm.weight", "self_attention.k_layernorm.weight", None, 1),
    ("attn.proj.weight", "self_attention.linear_proj.weight", "row", 1),
    ("attn.proj.bias", "self_attention.linear_proj.bias", None, 1),
    ("cross_attn_norm.weight", "pre_cross_attn_layernorm.weight", None, 1),
    ("cross_attn_norm.bias", "pre_cross_attn_layernorm.bias", None, 1),
    ("cross_attn.q_linear.weight", "cross_attention.linear_q.weight", "column", 1),
    ("cross_attn.q_linear.bias", "cross_attention.linear_q.bias", "column", 1),
    ("cross_attn.kv_linear.weight", "cross_attention.linear_kv.weight", "column", 2),
    ("cross_attn.kv_linear.bias", "cross_attention.linear_kv.bias", "column", 2),
    ("cross_attn.q_norm.weight", "cross_attention.q_layernorm.weight", None, 1),
    ("cross_attn.k_norm.weight", "cross_attention.k_layernorm.weight", None, 1),
    ("cross_attn.proj.weight", "cross_attention.linear_proj.weight", "row", 1),
    ("cross_attn.proj.bias", "cross_attention.linear_proj.bias", None, 1),
    ("mlp.fc1.weight", "mlp.linear_fc1.weight", "column", 1),
    ("mlp.fc1.bias", "mlp.linear_fc1.bias", "column", 1),
    ("mlp.fc2.weight", "mlp.linear_fc2.weight", "row", 1),
    ("mlp.fc2.bias", "mlp.linear_fc2.bias", None, 1),
    ("scale_shift_table", "scale_shift_table.bias", None, 1),
]
# outside the blocks: exact names first, then prefixes (all replicated under TP)
_TOP_EXACT = [(Y_EMBEDDING, "context_embedder.drop_emb"),
              ("final_layer.scale_shift_table", "final_layer.scale_shift_table.bias")]
_TOP_PREFIX = [("t_embedder.", "timestep_embedder."), ("t_block.", "timestep_block."),
               ("y_embedder.y_proj.", "context_embedder.proj."), ("x_embedder.", "x_embedder."),
               ("fps_embedder.", "fps_embedder."), ("final_layer.linear.", "final_layer.linear."),
               ("start_token", "start_token"), ("end_token", "end_token")]
# Megatron modules that get an `_extra_state` entry with --use-te (the training repo's hf2mcore converter)
_TE_EXTRA_STATE = ("linear_qkv", "linear_q", "linear_kv", "linear_proj", "linear_fc1", "linear_fc2",
                   "scale_shift_table")

_OURS_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_MCORE_BLOCK = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_MCORE_STACKED = re.compile(r"decoder\.layers\.([a-z_].*)")   # torch_dist: one tensor [depth, ...] per name
_BY_OURS = {o: (m, rule, parts) for o, m, rule, parts in _BLOCK_MAP}
_BY_MCORE = {m: (o, rule, parts) for o, m, rule, parts in _BLOCK_MAP}


class ConversionError(WeightsError):
    """A state dict that cannot be converted (wrong keys/shapes, bad TP layout)."""


# ------------------------------------------------------------------------------------------------ shapes


def dit_config_from_state_dict(sd: StateDict) -> SimpleNamespace:
    """The DiT dimensions a mugv/ours state dict implies (hidden, depth, heads, caption width, patch, ...)."""
    need = ["start_token", "x_embedder.proj.weight", "blocks.0.attn.q_norm.weight", "blocks.0.mlp.fc1.weight",
            "y_embedder.y_proj.fc1.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise ConversionError(f"not a MUG-V DiT state dict (ours or mugv layout): no {absent}; "
                              f"first keys: {sorted(sd)[:5]}")
    h = sd["start_token"].shape[0]
    head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
    conv = sd["x_embedder.proj.weight"]                      # [h, in_channels, pt, ph, pw]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _OURS_BLOCK.fullmatch(k)))
    y = sd.get(Y_EMBEDDING)
    return SimpleNamespace(hidden_size=h, depth=depth, num_heads=h // head_dim, head_dim=head_dim,
                           in_channels=conv.shape[1], patch_size=list(conv.shape[2:]),
                           caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
                           mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / h,
                           max_text_len=None if y is None else y.shape[0])


def mugv_key_shapes(cfg) -> Dict[str, Tuple[int, ...]]:
    """Every key of the MUG-V inference DiT's state dict with its shape, for a config (DiTConfig or the namespace of
    ``dit_config_from_state_dict``). Ours is this plus ``y_embedder.y_embedding`` [max_text_len, caption]."""
    h, nh, depth = cfg.hidden_size, cfg.num_heads, cfg.depth
    d, f = h // nh, int(h * cfg.mlp_ratio)
    ci, cc, patch = cfg.in_channels, cfg.caption_channels, tuple(cfg.patch_size)
    out = 2 * ci * math.prod(patch)                           # velocity + unused learned-sigma half, per voxel
    shapes: Dict[str, Tuple[int, ...]] = {"start_token": (h,), "end_token": (h,),
                                          "x_embedder.proj.weight": (h, ci, *patch), "x_embedder.proj.bias": (h,)}
    for emb in ("t_embedder", "fps_embedder"):
        shapes.update({f"{emb}.mlp.0.weight": (h, FREQ_DIM), f"{emb}.mlp.0.bias": (h,),
                       f"{emb}.mlp.2.weight": (h, h), f"{emb}.mlp.2.bias": (h,)})
    shapes.update({"t_block.1.weight": (6 * h, h), "t_block.1.bias": (6 * h,),
                   "y_embedder.y_proj.fc1.weight": (h, cc), "y_embedder.y_proj.fc1.bias": (h,),
                   "y_embedder.y_proj.fc2.weight": (h, h), "y_embedder.y_proj.fc2.bias": (h,)})
    block = {"attn.qkv.weight": (3 * h, h), "attn.qkv.bias": (3 * h,), "attn.q_norm.weight": (d,),
             "attn.k_norm.weight": (d,), "attn.proj.weight": (h, h), "attn.proj.bias": (h,),
             "cross_attn_norm.weight": (h,), "cross_attn_norm.bias": (h,),
             "cross_attn.q_linear.weight": (h, h), "cross_attn.q_linear.bias": (h,),
             "cross_attn.kv_linear.weight": (2 * h, h), "cross_attn.kv_linear.bias": (2 * h,),
             "cross_attn.q_norm.weight": (d,), "cross_attn.k_norm.weight": (d,),
             "cross_attn.proj.weight": (h, h), "cross_attn.proj.bias": (h,),
             "mlp.fc1.weight": (f, h), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (h, f), "mlp.fc2.bias": (h,),
             "scale_shift_table": (6, h)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.{leaf}": s for leaf, s in block.items()})
    shapes.update({"final_layer.scale_shift_table": (2, h), "final_layer.linear.weight": (out, h),
                   "final_layer.linear.bias": (out,)})
    return shapes


def _describe(cfg) -> str:
    return (f"hidden {cfg.hidden_size}, depth {cfg.depth}, heads {cfg.num_heads}, caption {cfg.caption_channels}, "
            f"in {cfg.in_channels}, patch {tuple(cfg.patch_size)}")


def _check(sd: StateDict, expected: Dict[str, Tuple[int, ...]], what: str, cfg) -> None:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: {tuple(sd[k].shape)} != {expected[k]}" for k in sorted(set(sd) & set(expected))
             if tuple(sd[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        raise ConversionError(
            f"{what} does not match the DiT config ({_describe(cfg)}): "
            f"{len(missing)} missing {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}, "
            f"{len(wrong)} with the wrong shape {wrong[:8]}")


def validate_ours(sd: StateDict, cfg=None) -> None:
    """Raise ``ConversionError`` naming every missing/unexpected key and wrong shape of an ours-layout state dict."""
    cfg = cfg or dit_config_from_state_dict(sd)
    expected = mugv_key_shapes(cfg)
    y_len = getattr(cfg, "max_text_len", None) or (sd[Y_EMBEDDING].shape[0] if Y_EMBEDDING in sd else 0)
    expected[Y_EMBEDDING] = (y_len, cfg.caption_channels)
    _check(sd, expected, "state dict (ours layout)", cfg)


# ------------------------------------------------------------------------------------------------ mugv <-> ours


def import_mugv_dit(state_dict, cfg=None, *, y_embedding: Optional[torch.Tensor] = None,
                    keep_y_embedding: bool = False) -> StateDict:
    """MUG-V inference ``dit.pt`` (raw or nested) -> our MUGDiT state dict, every key and shape validated.

    The null caption ``y_embedder.y_embedding`` is not in MUG-V's ``dit.pt``. It comes from ``y_embedding`` (MUG-V's
    ``fixtures/y_embedding.pt``, [300, 4096]) if given, else from the state dict if it has one; with neither, pass
    ``keep_y_embedding=True`` to leave the key out and keep the model's own buffer: load the result with
    ``model.load_state_dict(sd, strict=False)`` (its only missing key is ``y_embedder.y_embedding``). Tensors keep
    their dtype (the release is bf16): cast after loading if needed.
    """
    sd = unwrap_state_dict(state_dict)
    cfg = cfg or dit_config_from_state_dict(sd)
    expected = mugv_key_shapes(cfg)
    y = y_embedding if y_embedding is not None else sd.get(Y_EMBEDDING)
    sd = {k: v for k, v in sd.items() if k != Y_EMBEDDING}
    _check(sd, expected, "MUG-V DiT state dict", cfg)
    if y is None:
        if not keep_y_embedding:
            raise ConversionError(
                "MUG-V's dit.pt has no null caption (y_embedder.y_embedding): pass y_embedding= (MUG-V's "
                "fixtures/y_embedding.pt, CLI --y-embedding) or keep_y_embedding=True to keep the model's own")
        return dict(sd)
    y_len = getattr(cfg, "max_text_len", None) or y.shape[0]
    if tuple(y.shape) != (y_len, cfg.caption_channels):
        raise ConversionError(f"y_embedding has shape {tuple(y.shape)}, the DiT config needs "
                              f"({y_len}, {cfg.caption_channels}) (dit.max_text_len x dit.caption_channels)")
    return {**sd, Y_EMBEDDING: y}


def export_mugv_dit(ours_sd: StateDict) -> StateDict:
    """Our state dict -> MUG-V's ``dit.pt`` layout (strict-loadable by ``mug_v.dit.MUGDiT``): drops the null caption,
    which MUG-V keeps apart (save ``ours_sd["y_embedder.y_embedding"]`` as its ``fixtures/y_embedding.pt``)."""
    sd = unwrap_state_dict(ours_sd)
    validate_ours(sd)
    return {k: v for k, v in sd.items() if k != Y_EMBEDDING}


# ------------------------------------------------------------------------------------------------ ours <-> megatron


def _head_dim(sd: StateDict, block_prefix: str, norm_leaf: str) -> int:
    key = f"{block_prefix}.{norm_leaf}"
    if key not in sd:
        raise ConversionError(f"{key} is missing: it gives head_dim, needed to reorder the fused qkv/kv rows")
    return sd[key].shape[0]


def _heads_first(t: torch.Tensor, parts: int, head_dim: int) -> torch.Tensor:
    """Rows (parts, heads, head_dim) -> (heads, parts, head_dim)."""
    return t.reshape(parts, -1, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def _parts_first(t: torch.Tensor, parts: int, head_dim: int) -> torch.Tensor:
    """Rows (heads, parts, head_dim) -> (parts, heads, head_dim)."""
    return t.reshape(-1, parts, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def _top_to_megatron(name: str) -> Optional[str]:
    for o, m in _TOP_EXACT:
        if name == o:
            return m
    for o, m in _TOP_PREFIX:
        if name.startswith(o):
            return m + name[len(o):]
    return None


def _top_from_megatron(name: str) -> Optional[str]:
    for o, m in _TOP_EXACT:
        if name == m:
            return o
    for o, m in _TOP_PREFIX:
        if name.startswith(m):
            return o + name[len(m):]
    return None


def to_megatron(ours_sd: StateDict, cfg=None, *, extra_state: bool = False) -> StateDict:
    """Ours -> the Megatron-Core model state dict of the training repo (docs/mugv.md §6.7 names; qkv/kv rows per head).

    Works on full or TP-sharded dicts (head_dim comes from the QK-norm weights). ``extra_state=True`` adds the
    ``_extra_state: None`` entries Transformer Engine layers expect (``--use-te``). ``cfg`` (a DiTConfig) adds a full
    key/shape validation first; without it the map still rejects any unknown key.
    """
    sd = unwrap_state_dict(ours_sd)
    if cfg is not None:
        validate_ours(sd, cfg)
    out: StateDict = {}
    for name, t in sd.items():
        if m := _OURS_BLOCK.fullmatch(name):
            i, leaf = m.groups()
            if leaf not in _BY_OURS:
                raise ConversionError(f"no Megatron name for {name} (known block leaves: {sorted(_BY_OURS)})")
            new, _, parts = _BY_OURS[leaf]
            if parts > 1:
                norm = "attn.q_norm.weight" if leaf.startswith("attn.") else "cross_attn.q_norm.weight"
                t = _heads_first(t, parts, _head_dim(sd, f"blocks.{i}", norm))
            new = f"decoder.layers.{i}.{new}"
        elif (new := _top_to_megatron(name)) is None:
            raise ConversionError(f"no Megatron name for {name}")
        out[new] = t
        module, _, leaf = new.rpartition(".")
        if extra_state and module.rpartition(".")[2] in _TE_EXTRA_STATE:
            out[f"{module}._extra_state"] = None
    return out


def _unstack_layers(sd: StateDict) -> StateDict:
    """torch_dist (DCP) checkpoints store ``decoder.layers.<name>`` as one [depth, ...] tensor: split per layer."""
    out: StateDict = {}
    for k, v in sd.items():
        m = _MCORE_STACKED.fullmatch(k)
        if m and v is not None:
            for i in range(v.shape[0]):
                out[f"decoder.layers.{i}.{m.group(1)}"] = v[i]
        else:
            out[k] = v
    return out


def from_megatron(mcore_sd: StateDict, cfg=None, *, y_embedding: Optional[torch.Tensor] = None) -> StateDict:
    """Megatron-Core model state dict (legacy per-layer names or torch_dist stacked layers) -> ours.

    ``_extra_state`` entries are dropped; optimizer/RNG entries must not be passed (unwrap ``["model"]`` first, as
    ``unwrap_state_dict`` does). ``context_embedder.drop_emb`` becomes the null caption; ``y_embedding`` supplies (or
    replaces) it when the checkpoint lacks it. The result is validated (against ``cfg`` when given).
    """
    sd = _unstack_layers({k[len("model."):] if k.startswith("model.") else k: v
                          for k, v in unwrap_state_dict(mcore_sd).items() if not k.endswith("._extra_state")})
    out: StateDict = {}
    for name, t in sd.items():
        if m := _MCORE_BLOCK.fullmatch(name):
            i, leaf = m.groups()
            if leaf not in _BY_MCORE:
                raise ConversionError(f"unexpected Megatron key {name} (known layer leaves: {sorted(_BY_MCORE)})")
            new, _, parts = _BY_MCORE[leaf]
            if parts > 1:
                attn = "self_attention" if leaf.startswith("self_attention.") else "cross_attention"
                t = _parts_first(t, parts, _head_dim(sd, f"decoder.layers.{i}", f"{attn}.q_layernorm.weight"))
            new = f"blocks.{i}.{new}"
        elif (new := _top_from_megatron(name)) is None:
            raise ConversionError(f"unexpected Megatron key {name}")
        out[new] = t
    if y_embedding is not None:
        out[Y_EMBEDDING] = y_embedding
    if Y_EMBEDDING not in out:
        raise ConversionError("the Megatron checkpoint has no context_embedder.drop_emb: pass y_embedding= "
                              "(MUG-V's fixtures/y_embedding.pt)")
    validate_ours(out, cfg)
    return out


# ------------------------------------------------------------------------------------------------ tensor parallel


def shard_tensor(t: torch.Tensor, rule: Optional[str], parts: int, rank: int, tp_size: int) -> torch.Tensor:
    """One tensor's slice for TP rank ``rank`` (a clone). ``rule``: "column" splits dim 0 separately inside each of
    ``parts`` fused blocks of rows (q,k,v = 3; k,v = 2), "row" splits dim 1 (a row-parallel bias is replicated),
    None replicates. The trainer's parallel layers hold exactly these slices (trainer/parallel.py)."""
    if rule is None or (rule == "row" and t.ndim == 1):
        return t.clone()
    if rule == "row":
        return t.chunk(tp_size, dim=1)[rank].clone()
    grouped = t.reshape(parts, t.shape[0] // parts, *t.shape[1:])          # (parts, heads*head_dim, [in])
    return grouped.chunk(tp_size, dim=1)[rank].reshape(-1, *t.shape[1:]).clone()


def merge_tensors(ts: Sequence[torch.Tensor], rule: Optional[str], parts: int) -> torch.Tensor:
    """Inverse of ``shard_tensor`` given every rank's slice in TP-rank order."""
    if rule is None or (rule == "row" and ts[0].ndim == 1):
        return ts[0]
    if rule == "row":
        return torch.cat(list(ts), dim=1)
    grouped = [t.reshape(parts, t.shape[0] // parts, *t.shape[1:]) for t in ts]
    return torch.cat(grouped, dim=1).reshape(-1, *ts[0].shape[1:])


def tp_rule(name: str, layout: str = "ours") -> Tuple[Optional[str], int]:
    """(rule, fused parts) of a state-dict key under tensor parallelism: rule "column" | "row" | None."""
    rule, parts, _ = _tp_rule(name, layout)
    return rule, parts


def _tp_rule(name: str, layout: str) -> Tuple[Optional[str], int, str]:
    """(rule, fused parts, block prefix) of a key: rule "column" | "row" | None (replicated)."""
    pattern, table = (_OURS_BLOCK, _BY_OURS) if layout == "ours" else (_MCORE_BLOCK, _BY_MCORE)
    m = pattern.fullmatch(name)
    if not m or m.group(2) not in table:
        return None, 1, ""
    _, rule, parts = table[m.group(2)]
    return rule, parts, name[: m.start(2) - 1]


def _check_layout(layout: str) -> None:
    if layout not in ("ours", "megatron"):
        raise ValueError(f"layout must be 'ours' or 'megatron', got {layout!r}")


def _tp_heads(sd: StateDict, name: str, block: str, layout: str, t: torch.Tensor, parts: int) -> int:
    norm = {("ours", True): "attn.q_norm.weight", ("ours", False): "cross_attn.q_norm.weight",
            ("megatron", True): "self_attention.q_layernorm.weight",
            ("megatron", False): "cross_attention.q_layernorm.weight"}
    self_attn = ".attn." in name or ".self_attention." in name
    return t.shape[0] // parts // _head_dim(sd, block, norm[layout, self_attn])


def shard_tp(full_sd: StateDict, tp_size: int, rank: int, layout: str = "ours") -> StateDict:
    """Rank ``rank``'s slice of a full state dict for tensor parallelism over ``tp_size`` ranks (clones)."""
    _check_layout(layout)
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} out of range for tp_size {tp_size}")
    out: StateDict = {}
    for name, t in full_sd.items():
        rule, parts, block = _tp_rule(name, layout)
        if t is None or rule is None or (rule == "row" and t.ndim == 1):
            out[name] = t if t is None else t.clone()
            continue
        if rule == "column" and parts > 1:
            heads = _tp_heads(full_sd, name, block, layout, t, parts)
            if heads % tp_size:
                raise ValueError(f"{name}: {heads} heads cannot be split over tp={tp_size}")
        dim = 0 if rule == "column" else 1
        if t.shape[dim] % (tp_size * (parts if layout == "ours" else 1)):
            raise ValueError(f"{name} {tuple(t.shape)} cannot be split over tp={tp_size} on dim {dim}")
        out[name] = shard_tensor(t, rule, parts if layout == "ours" else 1, rank, tp_size)
    return out


def merge_tp(shards: Sequence[StateDict], layout: str = "ours", check_replicated: bool = True) -> StateDict:
    """Inverse of ``shard_tp``: every rank's state dict in TP-rank order -> the full one.

    Replicated entries are taken from rank 0; ``check_replicated`` first verifies that every rank holds the same.
    """
    _check_layout(layout)
    if not shards:
        raise ValueError("merge_tp needs at least one shard")
    keys = set(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if set(s) != keys:
            raise ConversionError(f"TP rank {r} has different keys than rank 0: "
                                  f"{sorted(set(s) ^ keys)[:8]}")
    out: StateDict = {}
    for name in shards[0]:
        ts = [s[name] for s in shards]
        rule, parts, _ = _tp_rule(name, layout)
        if ts[0] is None or rule is None or (rule == "row" and ts[0].ndim == 1):
            if check_replicated and ts[0] is not None and not all(torch.equal(ts[0], t) for t in ts[1:]):
                raise ConversionError(f"{name} should be replicated over TP but differs between ranks")
            out[name] = ts[0]
        else:
            out[name] = merge_tensors(ts, rule, parts if layout == "ours" else 1)
    return out


# ------------------------------------------------------------------------------------------------ files


def save_safetensors_export(path: str | os.PathLike, sd: StateDict, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as ``.safetensors`` (contiguous CPU copies; views and shared storage are materialised)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items() if v is not None}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})


load_state_dict_file = read_state_dict   # the CLI's name for it


def _save_ours(path: Path, sd: StateDict) -> None:
    if path.suffix == ".safetensors":
        save_safetensors_export(path, sd, {"layout": "ours"})
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, path)


def save_megatron_legacy(out_dir: str | os.PathLike, full_mcore_sd: StateDict, tp_size: int = 1,
                         iteration: int = 1) -> List[Path]:
    """Megatron ``torch`` format: ``iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt`` = ``{"model": shard}`` per TP rank
    and ``latest_checkpointed_iteration.txt`` (the layout the training repo's hf2mcore converter writes)."""
    out = Path(out_dir)
    files = []
    for r in range(tp_size):
        f = out / f"iter_{iteration:07d}" / f"mp_rank_{r:02d}" / "model_optim_rng.pt"
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": shard_tp(full_mcore_sd, tp_size, r, layout="megatron")}, f)
        files.append(f)
    (out / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return files


def load_megatron_legacy(path: str | os.PathLike, trust_pickle: bool = False) -> StateDict:
    """The merged (TP=1) model state dict of a Megatron ``torch``-format checkpoint: its root (with
    ``latest_checkpointed_iteration.txt``), one ``iter_*`` folder, or a single ``model_optim_rng.pt``."""
    p = Path(path)
    if p.is_file():
        return load_state_dict_file(p, trust_pickle)
    if (p / "latest_checkpointed_iteration.txt").exists():
        it = (p / "latest_checkpointed_iteration.txt").read_text().strip()
        p = p / ("release" if it == "release" else f"iter_{int(it):07d}")
    ranks = sorted(p.glob("mp_rank_*/model_optim_rng.pt"))
    if not ranks:
        raise ConversionError(f"{path}: no mp_rank_*/model_optim_rng.pt (expected a Megatron torch-format checkpoint)")
    if any(re.fullmatch(r"mp_rank_\d+_\d+", f.parent.name) for f in ranks):
        raise ConversionError(f"{p}: pipeline-parallel checkpoints (mp_rank_XX_YYY) are not supported; convert "
                              "with PP=1")
    return merge_tp([load_state_dict_file(f, trust_pickle) for f in ranks], layout="megatron")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["import", "export", "to-megatron", "from-megatron"])
    ap.add_argument("input", help="import: MUG-V dit.pt; export/to-megatron: ours (.safetensors, .pt or a trainer "
                                  "step folder); from-megatron: Megatron torch-format folder or model_optim_rng.pt")
    ap.add_argument("output", help="a .safetensors or .pt file; to-megatron: a folder")
    ap.add_argument("--tp", type=int, default=1, help="to-megatron: tensor-parallel shards to write")
    ap.add_argument("--use-te", action="store_true", help="to-megatron: add Transformer Engine _extra_state entries")
    ap.add_argument("--y-embedding", help="import/from-megatron: the null caption file (MUG-V fixtures/y_embedding.pt)")
    ap.add_argument("--keep-y-embedding", action="store_true",
                    help="import: leave the null caption out (the model keeps its own; load with strict=False)")
    ap.add_argument("--y-embedding-out", help="export: also write the null caption here (torch .pt)")
    ap.add_argument("--trust-pickle", action="store_true", help="allow torch.load(weights_only=False) on trusted files")
    args = ap.parse_args(argv)
    out = Path(args.output)
    y = None
    if args.y_embedding:
        y = torch.load(args.y_embedding, map_location="cpu", weights_only=True)
        if isinstance(y, dict):                   # {"y_embedder.y_embedding": tensor} or a one-entry dict
            y = y.get(Y_EMBEDDING, next(iter(y.values())))
    if args.command == "import":
        sd = import_mugv_dit(load_state_dict_file(args.input, args.trust_pickle), y_embedding=y,
                             keep_y_embedding=args.keep_y_embedding)
        _save_ours(out, sd)
    elif args.command == "export":
        ours = load_state_dict_file(args.input, args.trust_pickle)
        sd = export_mugv_dit(ours)
        if out.suffix == ".safetensors":
            save_safetensors_export(out, sd, {"layout": "mugv"})
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(sd, out)
        if args.y_embedding_out:
            torch.save(ours[Y_EMBEDDING].clone(), args.y_embedding_out)
    elif args.command == "to-megatron":
        ours = load_state_dict_file(args.input, args.trust_pickle)
        validate_ours(ours)
        save_megatron_legacy(out, to_megatron(ours, extra_state=args.use_te), tp_size=args.tp)
    else:
        if args.tp != 1:
            ap.error("--tp is for to-megatron; from-megatron merges every mp_rank_* folder it finds")
        _save_ours(out, from_megatron(load_megatron_legacy(args.input, args.trust_pickle), y_embedding=y))
    print(f"{args.command}: wrote {out}")


if __name__ == "__main__":
    main()
