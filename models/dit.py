"""MUGDiT: the MUG-V video diffusion transformer (docs/mugv.md §3), one class for every size.

    import torch
    from models.dit import tiny, mugv_10b, count_params
    model = tiny()                                                   # DiTConfig defaults: h=144, 2 heads, depth 2
    v_BCTHW = model(x_BCTHW, t_B, text_BSD, text_mask_BS)            # T2V: velocity, float32, same shape as x
    v_BCTHW = model(x_BCTHW, t_B, text_BSD, text_mask_BS, cond_mask_BT=first_frame_BT)   # I2V
    with torch.device("meta"):
        big = mugv_10b()                                             # 10.83 B parameters, no memory used

Module names follow the released HF checkpoint (`blocks.{i}.attn.qkv`, `...cross_attn.kv_linear`, `...mlp.fc1`,
`final_layer.linear`, ...). Every Linear is a plain `nn.Linear`: the tensor-parallel step (trainer/) swaps them for
sharded ones. qkv rows are laid out (3, heads, head_dim) and kv rows (2, heads, head_dim); the attention modules infer
the number of local heads from the Linear's output width, so column-sharded qkv/kv and row-sharded proj work unchanged,
and the sequence length from the q/qkv Linear's output (sequence parallelism: those gather the sequence chunks).
This file imports nothing distributed: context/sequence parallelism (trainer/parallel/context_parallel.py) replace
identity hooks (`token_split`/`token_gather`, `seq_split`/`seq_gather`, `attn.kv_gather`) and set `token_multiple`,
to which the forward pads the token sequence so the splits divide it evenly (pad keys are never attended to: exact
for any L).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from einops import rearrange

from models.attention import attention
from models.config import DiTConfig, dit_mugv_10b, dit_tiny

DEFAULT_FPS = 24.0          # the released training loader's fps (the inference script passes 30)
FREQ_DIM = 256              # sinusoidal timestep/fps features (docs/mugv.md §3.3)
ROPE_THETA = 10000.0
ROPE_MAX_FRAME = 479        # reference frame table has time_end=480 (1 min of latents); later frames are clamped
EPS = 1e-6                  # LayerNorm and QK RMSNorm eps of the HF model (Megatron's LN default is 1e-5)
GATE_CHUNKS = (2, 5)        # gate_msa, gate_mlp in the (shift, scale, gate) x (msa, mlp) modulation layout


def timestep_embedding(t_B: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] sinusoid of scalar t (timestep in [0, 1000], or fps) -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args_BK = t_B.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args_BK), torch.sin(args_BK)], dim=-1)


def rope_positions(T: int, H: int, W: int, device=None) -> torch.Tensor:
    """(h, w, frame) position of every token of [start, video tokens in (t, h, w) order, end] -> [T*H*W + 2, 3].

    Video token (t, h, w) sits at frame t + 1; the start token at (0, 0, 0) and the end token at (H-1, W-1, T+1).
    """
    t, h, w = torch.meshgrid(torch.arange(T, device=device), torch.arange(H, device=device),
                             torch.arange(W, device=device), indexing="ij")
    video_N3 = torch.stack([h.flatten(), w.flatten(), t.flatten() + 1], dim=-1)
    start_13 = torch.zeros(1, 3, dtype=torch.long, device=device)
    end_13 = torch.tensor([[H - 1, W - 1, T + 1]], device=device)
    pos_L3 = torch.cat([start_13, video_N3, end_13])
    pos_L3[:, 2].clamp_(max=ROPE_MAX_FRAME)
    return pos_L3


def rope_angles(pos_L3: torch.Tensor, head_dim: int) -> torch.Tensor:
    """3D RoPE angles [L, head_dim/2] = concat over (h, w, frame) of pos * 10000^(-6k/head_dim), k < head_dim/6."""
    inv_freq_K = ROPE_THETA ** (-torch.arange(0, head_dim, 6, device=pos_L3.device)[: head_dim // 6].float() / head_dim)
    return torch.cat([pos_L3[:, a, None].float() * inv_freq_K[None] for a in range(3)], dim=-1)


def apply_rope(x_BHLD: torch.Tensor, cos_LK: torch.Tensor, sin_LK: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the per-token angles, in fp32 like the reference."""
    x = x_BHLD.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([x0 * cos_LK - x1 * sin_LK, x0 * sin_LK + x1 * cos_LK], dim=-1)
    return out.flatten(-2).type_as(x_BHLD)


def _identity(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x


def modulate(x_BLD: torch.Tensor, shift_BLD: torch.Tensor, scale_BLD: torch.Tensor) -> torch.Tensor:
    return x_BLD * (1 + scale_BLD) + shift_BLD


class RMSNorm(nn.Module):
    """Per-head QK norm: weight only, statistics in fp32 (HF reference)."""

    def __init__(self, dim: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=tuple(patch_size), stride=tuple(patch_size))

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCTHW).flatten(2).transpose(1, 2)  # (B, T*H*W, h), tokens in (t, h, w) order


class TimestepEmbedder(nn.Module):
    """Scalar (timestep or fps) -> sinusoid(256) -> Linear -> SiLU -> Linear -> [B, h]."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t_B).to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Text features -> LN -> MLP(GELU tanh) -> LN, with CFG dropout to the fixed null caption `y_embedding`."""

    def __init__(self, caption_channels: int, hidden_size: int, max_text_len: int, dropout_prob: float):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.pre_norm = nn.LayerNorm(caption_channels, eps=EPS, elementwise_affine=False)
        self.y_proj = MLP(caption_channels, hidden_size, hidden_size)
        self.post_norm = nn.LayerNorm(hidden_size, eps=EPS, elementwise_affine=False)
        # fixed (not trained) random null caption, ~N(0,1)/sqrt(D) like MUG-V's drop_emb; saved with checkpoints
        self.register_buffer("y_embedding", torch.randn(max_text_len, caption_channels) / caption_channels ** 0.5)

    def forward(self, text_BSD: torch.Tensor, force_drop_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, s, _ = text_BSD.shape
        drop_B = torch.zeros(b, dtype=torch.bool, device=text_BSD.device)
        if force_drop_B is not None:
            drop_B = drop_B | force_drop_B.to(device=text_BSD.device, dtype=torch.bool)
        if self.training and self.dropout_prob > 0:
            drop_B = drop_B | (torch.rand(b, device=text_BSD.device) < self.dropout_prob)
        text_BSD = torch.where(drop_B[:, None, None], self.y_embedding[:s].to(text_BSD.dtype), text_BSD)
        return self.post_norm(self.y_proj(self.pre_norm(text_BSD)))  # (B, S, h)


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # rows (3, heads, head_dim)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.kv_gather = _identity   # context parallelism (trainer/parallel/): all-gather local k, v along a dim

    def forward(self, x_BLD: torch.Tensor, cos_LK: torch.Tensor, sin_LK: torch.Tensor, pad: int = 0) -> torch.Tensor:
        """pad: the last `pad` tokens of the full (gathered) sequence are padding (MUGDiT.token_multiple): their keys
        and values are dropped, so no query attends to them; the pad queries' outputs are discarded by the caller."""
        qkv = self.qkv(x_BLD)          # sequence parallelism: the column-parallel qkv gathers the full sequence
        b, l = qkv.shape[:2]
        qkv = qkv.view(b, l, 3, -1, self.head_dim)                  # local heads inferred from the Linear's width
        q_BHLD, k_BHLD, v_BHLD = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHLD = apply_rope(self.q_norm(q_BHLD), cos_LK, sin_LK)
        k_BHLD = apply_rope(self.k_norm(k_BHLD), cos_LK, sin_LK)
        k_BHSD, v_BHSD = self.kv_gather(k_BHLD, 2), self.kv_gather(v_BHLD, 2)   # S: the full sequence's keys
        if pad:
            k_BHSD, v_BHSD = k_BHSD[:, :, :-pad], v_BHSD[:, :, :-pad]
        out_BHLD = attention(q_BHLD, k_BHSD, v_BHSD)
        return self.proj(out_BHLD.transpose(1, 2).reshape(b, l, -1))  # row-sharded proj: a partial sum


class CrossAttention(nn.Module):
    def __init__(self, hidden_size: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.q_linear = nn.Linear(hidden_size, hidden_size)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size)  # rows (2, heads, head_dim)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x_BLD: torch.Tensor, y_BSD: torch.Tensor, keep_BS: torch.Tensor) -> torch.Tensor:
        q_BLD, s = self.q_linear(x_BLD), y_BSD.shape[1]   # L of q, not x: sequence parallelism gathers it
        b, l = q_BLD.shape[:2]
        q_BHLD = self.q_norm(q_BLD.view(b, l, -1, self.head_dim).transpose(1, 2))
        k_BHSD, v_BHSD = self.kv_linear(y_BSD).view(b, s, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out_BHLD = attention(q_BHLD, self.k_norm(k_BHSD), v_BHSD, mask=keep_BS[:, None, None, :])
        return self.proj(out_BHLD.transpose(1, 2).reshape(b, l, -1))


class MUGDiTBlock(nn.Module):
    """AdaLN-Zero self-attention (QK norm, 3D RoPE) -> ungated cross-attention -> modulated MLP (docs/mugv.md §3.4)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.norm = nn.LayerNorm(h, eps=EPS, elementwise_affine=False)   # shared by attention and MLP
        self.attn = SelfAttention(h, cfg.head_dim)
        self.cross_attn_norm = nn.LayerNorm(h, eps=EPS)
        self.cross_attn = CrossAttention(h, cfg.head_dim)
        self.mlp = MLP(h, int(h * cfg.mlp_ratio), h)
        self.scale_shift_table = nn.Parameter(torch.randn(6, h) / h ** 0.5)

    def forward(self, x_BLD, y_BSD, keep_BS, tmod_BL6D, cos_LK, sin_LK, pad: int = 0) -> torch.Tensor:
        """pad: trailing pad tokens of the full sequence, never attended to (see SelfAttention)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table + tmod_BL6D).unbind(2)
        x_BLD = x_BLD + gate_msa * self.attn(modulate(self.norm(x_BLD), shift_msa, scale_msa), cos_LK, sin_LK, pad)
        x_BLD = x_BLD + self.cross_attn(self.cross_attn_norm(x_BLD), y_BSD, keep_BS)
        return x_BLD + gate_mlp * self.mlp(modulate(self.norm(x_BLD), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=EPS, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, out_features)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x_BND: torch.Tensor, c_BND: torch.Tensor) -> torch.Tensor:
        shift_BND, scale_BND = (self.scale_shift_table + c_BND[:, :, None]).unbind(2)
        return self.linear(modulate(self.norm_final(x_BND), shift_BND, scale_BND))


class MUGDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        # 1. patch embedding
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, h)
        # 2. conditioning: c = t_emb + fps_emb; t_block(c) -> 6 modulation vectors per block; text
        self.t_embedder = TimestepEmbedder(h)
        self.fps_embedder = TimestepEmbedder(h)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, h, cfg.max_text_len, cfg.caption_dropout_prob)
        # 3. blocks over [start, video tokens, end]
        self.start_token = nn.Parameter(torch.empty(h))
        self.end_token = nn.Parameter(torch.empty(h))
        self.blocks = nn.ModuleList([MUGDiTBlock(cfg) for _ in range(cfg.depth)])
        # 4. output: 2 x in_channels per patch voxel (the second half is MUG-V's unused learned-sigma legacy)
        self.final_layer = FinalLayer(h, math.prod(cfg.patch_size) * 2 * cfg.in_channels)
        # context parallelism hooks, identity here (set by trainer/parallel/context_parallel.py): keep this rank's
        # contiguous chunk of the L token dim / all-gather the chunks back (after the per-token final layer)
        self.token_split = _identity
        self.token_gather = _identity
        # sequence parallelism hooks, identity here (set by trainer.parallel.parallelize(sequence_parallel=True)):
        # after token_split, keep this TP rank's chunk of x and the per-token modulations (not the RoPE angles:
        # the column-parallel linears gather the sequence before attention); gather before token_gather
        self.seq_split = _identity
        self.seq_gather = _identity
        # the splits above need the token count to divide evenly: forward pads [start, video, end] at its end to a
        # multiple of token_multiple (set by the trainer to the product of the split factors: cp, times tp with
        # sequence parallelism). Pad tokens are zeros with the end token's (t=0) modulation and the identity RoPE
        # rotation; their keys are dropped in self-attention and their outputs before unpatchifying, so they change
        # nothing else (everything but self-attention is per token) and get no gradient.
        self.token_multiple = 1
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the null caption; call again after `to_empty()` from meta."""
        h = self.cfg.hidden_size
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.reset_parameters()
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (*self.t_embedder.mlp[::2], *self.fps_embedder.mlp[::2], self.t_block[1],
                    self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_embedding, std=self.cfg.caption_channels ** -0.5)
        nn.init.normal_(self.start_token, std=0.02)
        nn.init.normal_(self.end_token, std=0.02)
        # AdaLN-Zero: every residual branch starts closed, so each block is the identity and the output is 0
        for i in GATE_CHUNKS:
            self.t_block[1].weight.view(6, h, h)[i].zero_()
            self.t_block[1].bias.view(6, h)[i].zero_()
        for blk in self.blocks:
            nn.init.normal_(blk.scale_shift_table, std=h ** -0.5)
            for i in GATE_CHUNKS:
                blk.scale_shift_table[i].zero_()
            nn.init.zeros_(blk.cross_attn.proj.weight)   # cross-attention is ungated: close it at its projection
            nn.init.zeros_(blk.cross_attn.proj.bias)
        nn.init.normal_(self.final_layer.scale_shift_table, std=h ** -0.5)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text_BSD: torch.Tensor, text_mask_BS: torch.Tensor,
                cond_mask_BT: Optional[torch.Tensor] = None, fps_B: Optional[torch.Tensor] = None,
                force_drop_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity prediction.

        x_BCTHW: noisy latent; t_B: timestep in [0, 1000] (1000 = noise); text_BSD / text_mask_BS: text features and
        key padding mask (True = real token, >= 1 per sample); cond_mask_BT: True where latent frame t is a clean
        conditioning frame (I2V: frame 0), which takes the t=0 modulation; fps_B: default 24; force_drop_B: True
        replaces the caption by the null caption (CFG). Returns float32 [B, in_channels, T, H, W].

        The pieces (``condition``, ``embed``, ``run_blocks``, ``head``) are what a pipeline stage runs a part of
        (trainer/parallel/pipeline.py): every stage computes the conditioning, the first embeds, each runs its blocks,
        the last the head.
        """
        ctx = self.condition(x_BCTHW, t_B, text_BSD, text_mask_BS, cond_mask_BT, fps_B, force_drop_B)
        return self.head(self.run_blocks(self.embed(x_BCTHW, ctx), ctx), ctx)

    def condition(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text_BSD: torch.Tensor,
                  text_mask_BS: torch.Tensor, cond_mask_BT: Optional[torch.Tensor] = None,
                  fps_B: Optional[torch.Tensor] = None, force_drop_B: Optional[torch.Tensor] = None) -> dict:
        """Check the inputs and compute everything the blocks and the head read besides the residual stream x:
        text, per-token modulations, RoPE angles (already split by the CP/SP hooks), and the token geometry.
        Uses only the conditioning embedders (t, fps, t_block, caption), never x_embedder or the tokens."""
        cfg = self.cfg
        b, c, t, h, w = x_BCTHW.shape
        pt, ph, pw = cfg.patch_size
        if c != cfg.in_channels:
            raise ValueError(f"latent has {c} channels, dit.in_channels is {cfg.in_channels}")
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent (T, H, W) = {(t, h, w)} must be divisible by dit.patch_size {cfg.patch_size}")
        if text_BSD.shape[-1] != cfg.caption_channels or text_mask_BS.shape != text_BSD.shape[:2]:
            raise ValueError(f"text must be [B, S, {cfg.caption_channels}] with mask [B, S]; got "
                             f"{tuple(text_BSD.shape)} and {tuple(text_mask_BS.shape)}")
        if text_BSD.shape[1] > cfg.max_text_len:
            raise ValueError(f"text length {text_BSD.shape[1]} exceeds dit.max_text_len ({cfg.max_text_len})")
        if cond_mask_BT is not None and cond_mask_BT.shape != (b, t):
            raise ValueError(f"cond_mask must be [B, T] = {(b, t)}, got {tuple(cond_mask_BT.shape)}")
        T, H, W = t // pt, h // ph, w // pw
        dtype = self.t_block[1].weight.dtype
        n = T * H * W
        pad = -(n + 2) % self.token_multiple               # parallel splits: pad L = N + 2 to a multiple (__init__)

        # conditioning: rows [0, b) use t, rows [b, 2b) use t=0 (clean conditioning frames, start/end tokens)
        if fps_B is None:
            fps_B = torch.full((b,), DEFAULT_FPS, device=x_BCTHW.device)
        t_2B = torch.cat([t_B.to(dtype), torch.zeros_like(t_B, dtype=dtype)])   # timestep cast to the model dtype
        c_2BD = self.t_embedder(t_2B) + self.fps_embedder(fps_B).repeat(2, 1)    # (2B, h)
        tmod_2B6D = self.t_block(c_2BD).unflatten(1, (6, -1))                     # (2B, 6, h)
        cond_BT = torch.zeros(b, T, dtype=torch.bool, device=x_BCTHW.device) if cond_mask_BT is None \
            else cond_mask_BT.to(x_BCTHW.device, torch.bool).view(b, T, pt).all(-1)
        noisy_BN = (~cond_BT).repeat_interleave(H * W, dim=1)                     # (B, N) token-level
        edge_B1 = torch.zeros(b, 1, dtype=torch.bool, device=x_BCTHW.device)     # start/end take t=0, as the reference
        noisy_BL = torch.cat([edge_B1, noisy_BN, edge_B1.expand(b, 1 + pad)], dim=1)   # (B, L = N + 2 + pad)
        tmod_BL6D = torch.where(noisy_BL[:, :, None, None], tmod_2B6D[:b, None], tmod_2B6D[b:, None])
        y_BSD = self.y_embedder(text_BSD.to(dtype), force_drop_B)                # (B, S, h)
        keep_BS = text_mask_BS.to(x_BCTHW.device, torch.bool)

        angles_LK = rope_angles(rope_positions(T, H, W, device=x_BCTHW.device), cfg.head_dim)
        if pad:                                                                   # angle 0: cos 1, sin 0 (identity)
            angles_LK = torch.cat([angles_LK, angles_LK.new_zeros(pad, angles_LK.shape[1])])
        cos_LK, sin_LK = angles_LK.cos(), angles_LK.sin()
        c_BLD = torch.where(noisy_BL[:, :, None], c_2BD[:b, None], c_2BD[b:, None])   # final modulation from c
        tmod_BL6D, c_BLD = (self.token_split(v, 1) for v in (tmod_BL6D, c_BLD))
        cos_LK, sin_LK = self.token_split(cos_LK, 0), self.token_split(sin_LK, 0)
        tmod_BL6D, c_BLD = (self.seq_split(v, 1) for v in (tmod_BL6D, c_BLD))
        return dict(y_BSD=y_BSD, keep_BS=keep_BS, tmod_BL6D=tmod_BL6D, cos_LK=cos_LK, sin_LK=sin_LK, c_BLD=c_BLD,
                    pad=pad, n=n, THW=(T, H, W), channels=c, dtype=dtype)

    def embed(self, x_BCTHW: torch.Tensor, ctx: dict) -> torch.Tensor:
        """The residual stream entering block 0: [start, patch tokens, end, pad], split by the CP/SP hooks."""
        b = x_BCTHW.shape[0]
        x_BND = self.x_embedder(x_BCTHW.to(ctx["dtype"]))                        # (B, T*H*W, h)
        pad = ctx["pad"]
        x_BLD = torch.cat([self.start_token.expand(b, 1, -1), x_BND, self.end_token.expand(b, 1, -1)]
                          + ([x_BND.new_zeros(b, pad, x_BND.shape[2])] if pad else []), dim=1)
        return self.seq_split(self.token_split(x_BLD, 1), 1)

    def run_blocks(self, x_BLD: torch.Tensor, ctx: dict, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
        """Blocks [start, end) (default: all) on the residual stream."""
        for block in self.blocks[start:end]:
            x_BLD = block(x_BLD, ctx["y_BSD"], ctx["keep_BS"], ctx["tmod_BL6D"], ctx["cos_LK"], ctx["sin_LK"],
                          ctx["pad"])                                               # (B, L, h)
        return x_BLD

    def head(self, x_BLD: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Final layer per token (modulation from c, not t_block(c)), drop start, end and pad tokens, unpatchify,
        keep the velocity half: float32 [B, in_channels, T, H, W]."""
        pt, ph, pw = self.cfg.patch_size
        T, H, W = ctx["THW"]
        out_BLP = self.seq_gather(self.final_layer(x_BLD, ctx["c_BLD"]), 1)
        out_BNP = self.token_gather(out_BLP, 1)[:, 1:ctx["n"] + 1]               # (B, N, pt*ph*pw*2C)
        out_BCTHW = rearrange(out_BNP, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
                              t=T, h=H, w=W, pt=pt, ph=ph, pw=pw)
        return out_BCTHW[:, :ctx["channels"]].float()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(**kw) -> MUGDiT:
    return MUGDiT(dit_tiny(**kw))


def mugv_10b(**kw) -> MUGDiT:
    return MUGDiT(dit_mugv_10b(**kw))
