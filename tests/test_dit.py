"""MUGDiT: shapes, exact parameter counts, AdaLN-Zero init, gradient flow, 3D RoPE, dual modulation, TP contract."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from models.attention import attention
from models.config import DiTConfig, dit_mugv_10b, dit_tiny
from models.dit import (
    MLP,
    CrossAttention,
    SelfAttention,
    apply_rope,
    count_params,
    mugv_10b,
    rope_angles,
    rope_positions,
    tiny,
)
from models.rectified_flow import euler_sample, flow_loss, training_step_inputs

B, C, T, H, W, S, D = 2, 24, 3, 8, 8, 16, 64


def expected_params(cfg: DiTConfig) -> int:
    """Hand formula of docs/mugv.md §3.2, written out per module."""
    h, hd, f = cfg.hidden_size, cfg.head_dim, int(cfg.hidden_size * cfg.mlp_ratio)
    dc, c = cfg.caption_channels, cfg.in_channels
    p = math.prod(cfg.patch_size)
    block = ((3 * h * h + 3 * h) + (h * h + h) + 2 * hd            # self-attn qkv, proj, q/k RMSNorm
             + 2 * h + (h * h + h) + (2 * h * h + 2 * h) + 2 * hd + (h * h + h)   # cross LN(affine), q, kv, norms, proj
             + (h * f + f) + (f * h + h) + 6 * h)                  # MLP, scale_shift_table
    embed = ((c * p * h + h)                                       # x_embedder Conv3d
             + 2 * (256 * h + h + h * h + h)                       # t_embedder, fps_embedder
             + (6 * h * h + 6 * h)                                 # t_block
             + (dc * h + h + h * h + h)                            # y_embedder MLP (y_embedding is a buffer)
             + (h * p * 2 * c + p * 2 * c) + 2 * h                 # final linear, final table
             + 2 * h)                                              # start/end tokens
    return cfg.depth * block + embed


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, H, W, generator=g)
    t = torch.tensor([100.0, 900.0])
    text = torch.randn(B, S, D, generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 10:] = False
    return x, t, text, mask


@torch.no_grad()
def perturb(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def test_tiny_output_shape_and_zero_init():
    torch.manual_seed(0)
    model = tiny()
    out = model(*make_inputs())
    assert out.shape == (B, C, T, H, W) and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0  # AdaLN-Zero: final linear is zero


def test_tiny_param_count_exact():
    model = tiny()
    assert count_params(model) == expected_params(dit_tiny()) == 983_856
    assert "y_embedder.y_embedding" in model.state_dict() and model.y_embedder.y_embedding.shape == (32, 64)


def test_mugv_10b_param_count_on_meta():
    with torch.device("meta"):
        model = mugv_10b()
    n = count_params(model)
    print(f"mugv_10b parameters: {n:,}")
    assert n == expected_params(dit_mugv_10b()) == 10_830_321_984
    assert abs(n - 10.83e9) / 10.83e9 < 0.01
    assert model.blocks[55].attn.qkv.weight.shape == (3 * 3456, 3456)


def test_meta_then_to_empty_then_init_weights():
    with torch.device("meta"):
        model = tiny()
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.count_nonzero(model(*make_inputs())) == 0


def test_tp_linear_names_are_plain_linears():
    model = tiny()
    names = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    for i in range(2):
        for leaf in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                     "mlp.fc1", "mlp.fc2"):
            assert f"blocks.{i}.{leaf}" in names


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = perturb(tiny()).train()
    x, t, text, mask = make_inputs()
    cond = torch.tensor([[True, False, False], [False, False, False]])
    out = model(x, t, text, mask, cond_mask_BT=cond)
    flow_loss(out, x, torch.zeros_like(x), frame_mask_BT=~cond).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


def test_one_training_step_moves_zero_init_output():
    torch.manual_seed(0)
    model = tiny()
    x, t, text, mask = make_inputs()   # x is randn from seed 0: the noise must come from another seed
    x_t, t, noise = training_step_inputs(x, torch.Generator().manual_seed(1), 0.0, 1.0, True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    flow_loss(model(x_t, t, text, mask), x, noise).mean().backward()
    opt.step()
    assert torch.count_nonzero(model(x_t, t, text, mask)) > 0


def test_dual_modulation_and_caption_drop():
    model = perturb(tiny()).eval()
    x, t, text, mask = make_inputs()
    all_cond = torch.ones(B, T, dtype=torch.bool)
    no_cond = torch.zeros(B, T, dtype=torch.bool)
    # every token on the t=0 branch: the timestep no longer matters
    torch.testing.assert_close(model(x, t, text, mask, all_cond), model(x, t.flip(0), text, mask, all_cond))
    assert not torch.allclose(model(x, t, text, mask), model(x, t.flip(0), text, mask))
    torch.testing.assert_close(model(x, t, text, mask), model(x, t, text, mask, no_cond))
    # force_drop == feeding the null caption by hand; fps defaults to 24
    null = model.y_embedder.y_embedding[:S].expand(B, S, D)
    drop = torch.tensor([True, False])
    expected = torch.cat([model(x, t, null, mask)[:1], model(x, t, text, mask)[1:]])
    torch.testing.assert_close(model(x, t, text, mask, force_drop_B=drop), expected)
    torch.testing.assert_close(model(x, t, text, mask), model(x, t, text, mask, fps_B=torch.tensor([24.0, 24.0])))


def test_model_is_an_euler_model_fn_for_i2v():
    model = perturb(tiny()).eval()
    x, _, text, mask = make_inputs()
    out = euler_sample(model, torch.randn_like(x), text, mask, text[:1, :5], mask[:1, :5], steps=2, cfg_scale=4.0,
                       height_px=H * 8, width_px=W * 8, cond_latent=x[:, :, :1])
    assert out.shape == x.shape and torch.equal(out[:, :, 0], x[:, :, 0])


def test_shape_errors():
    model = tiny()
    x, t, text, mask = make_inputs()
    with pytest.raises(ValueError, match="divisible"):
        model(x[..., :7], t, text, mask)
    with pytest.raises(ValueError, match="max_text_len"):
        model(x, t, torch.zeros(B, 40, D), torch.ones(B, 40, dtype=torch.bool))


def test_rope_positions_and_angles_by_hand():
    pos = rope_positions(2, 2, 3)                  # (h, w, frame) of [start, 12 video tokens, end]
    assert pos.shape == (14, 3)
    assert pos[0].tolist() == [0, 0, 0] and pos[-1].tolist() == [1, 2, 3]
    assert pos[1].tolist() == [0, 0, 1] and pos[2].tolist() == [0, 1, 1] and pos[7].tolist() == [0, 0, 2]
    ang = rope_angles(torch.tensor([[1, 2, 3]]), head_dim=12)   # inv_freq = [1, 10000^(-1/2)]
    torch.testing.assert_close(ang, torch.tensor([[1.0, 0.01, 2.0, 0.02, 3.0, 0.03]]))
    x = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]])   # pairs (1, 0), (0, 1) rotated by pi/2 and 0
    out = apply_rope(x, torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 1.0, 0.0, 1.0]]]]))


def test_rope_scores_depend_on_relative_frame_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 14, 72, generator=g)
    pos = rope_positions(2, 2, 3)

    def scores(p):
        a = rope_angles(p, 72)
        return apply_rope(q, a.cos(), a.sin()) @ apply_rope(k, a.cos(), a.sin()).transpose(-1, -2)

    shifted = pos + torch.tensor([0, 0, 5])
    torch.testing.assert_close(scores(pos), scores(shifted), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(pos), scores(pos * torch.tensor([1, 1, 2])), atol=1e-3)


def test_attention_matches_manual_softmax_with_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 6, generator=g)
    keep = torch.tensor([[True] * 5, [True, True, False, False, False]])[:, None, None, :]
    logits = (q @ k.transpose(-1, -2) / math.sqrt(6)).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, mask=keep), logits.softmax(-1) @ v)


def _col_shard(lin: nn.Linear, groups: int, r: int, parts: int = 2) -> nn.Linear:
    """Rows laid out (groups, heads, head_dim) (or plain rows for groups=1): keep rank r's heads of every group."""
    w = lin.weight.view(groups, parts, -1, lin.in_features)[:, r].reshape(-1, lin.in_features)
    out = nn.Linear(lin.in_features, w.shape[0])
    out.weight.data.copy_(w)
    out.bias.data.copy_(lin.bias.view(groups, parts, -1)[:, r].reshape(-1))
    return out


def _row_shard(lin: nn.Linear, r: int, parts: int = 2) -> nn.Linear:
    """Input columns split across ranks; the bias is added once (rank 0), as a row-parallel Linear does."""
    w = lin.weight.view(lin.out_features, parts, -1)[:, r]
    out = nn.Linear(w.shape[1], lin.out_features)
    out.weight.data.copy_(w)
    out.bias.data.copy_(lin.bias if r == 0 else torch.zeros_like(lin.bias))
    return out


@torch.no_grad()
def test_tensor_parallel_head_inference_contract():
    model = perturb(tiny(num_heads=4))           # head_dim 36: 2 heads per rank at TP=2
    blk = model.blocks[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 14, 144, generator=g)
    y = torch.randn(B, S, 144, generator=g)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, 9:] = False
    ang = rope_angles(rope_positions(2, 2, 3), 36)
    cos, sin = ang.cos(), ang.sin()

    def local(mod, **linears):
        shard = copy.deepcopy(mod)
        for name, lin in linears.items():
            setattr(shard, name, lin)
        return shard

    attn_parts = [local(blk.attn, qkv=_col_shard(blk.attn.qkv, 3, r), proj=_row_shard(blk.attn.proj, r))
                  for r in range(2)]
    torch.testing.assert_close(sum(a(x, cos, sin) for a in attn_parts), blk.attn(x, cos, sin), atol=1e-5, rtol=1e-5)
    ca = blk.cross_attn
    cross_parts = [local(ca, q_linear=_col_shard(ca.q_linear, 1, r), kv_linear=_col_shard(ca.kv_linear, 2, r),
                         proj=_row_shard(ca.proj, r)) for r in range(2)]
    torch.testing.assert_close(sum(m(x, y, keep) for m in cross_parts), ca(x, y, keep), atol=1e-5, rtol=1e-5)
    mlp_parts = [local(blk.mlp, fc1=_col_shard(blk.mlp.fc1, 1, r), fc2=_row_shard(blk.mlp.fc2, r)) for r in range(2)]
    torch.testing.assert_close(sum(m(x) for m in mlp_parts), blk.mlp(x), atol=1e-5, rtol=1e-5)
    assert isinstance(blk.attn, SelfAttention) and isinstance(ca, CrossAttention) and isinstance(blk.mlp, MLP)


def test_token_padding_is_exact_and_pads_get_no_gradient():
    """token_multiple (set by the parallel splits) pads [start, video, end] at its end; with the pad keys dropped the
    output and gradients are the unpadded model's, and the pad tokens receive exactly zero gradient."""
    torch.manual_seed(0)
    model = perturb(tiny(num_heads=4, caption_dropout_prob=0.0))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, C, 1, 2, 6, generator=g)                 # 1*1*3 video tokens + 2 = 5: odd
    _, t, text, mask = make_inputs()
    weight = torch.randn(x.shape, generator=g)
    ref = copy.deepcopy(model)
    out1 = ref(x, t, text, mask)
    (out1 * weight).sum().backward()
    for multiple in (2, 4, 7):
        padded = copy.deepcopy(model)
        padded.token_multiple = multiple
        seen = {}

        def keep_block_input(mod, args, seen=seen):   # called in this iteration
            args[0].retain_grad()
            seen["x"] = args[0]

        padded.blocks[0].register_forward_pre_hook(keep_block_input)
        out2 = padded(x, t, text, mask)
        (out2 * weight).sum().backward()
        n_pad = -5 % multiple
        assert seen["x"].shape[1] == 5 + n_pad
        assert torch.count_nonzero(seen["x"].grad[:, 5:]) == 0 and torch.count_nonzero(seen["x"].grad[:, :5]) > 0
        torch.testing.assert_close(out2, out1, atol=1e-5, rtol=0)
        for (name, p1), p2 in zip(ref.named_parameters(), padded.parameters()):
            rel = ((p2.grad - p1.grad).norm() / p1.grad.norm().clamp_min(1e-12)).item()
            assert rel < 1e-5, (multiple, name, rel)
