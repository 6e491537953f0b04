"""VideoVAE = the MUG-V video VAE (models/vae.py): tiny-preset behaviour, and key/shape/parameter-count identity of
the mugv() preset with the released reference.

tests/fixtures/mugv_vae_keys.json is the state dict (name -> shape) of the reference ``MUGVAE()``
(Shopee-MUG/MUG-V ``mug_v/encoder/vae/vae.py``, HEAD) as its own code builds it: in a scratch directory outside the repo
that code was run unmodified with the diffusers v0.29.0 source tree (the version pinned in MUG-V's
requirements.txt) on the import path, on the meta device, with only ``AutoencoderKL.from_pretrained`` replaced by
``AutoencoderKL(**SDXL-VAE config, use_quant_conv=False, use_post_quant_conv=False)`` (block_out_channels
128/256/512/512, layers_per_block 2, latent_channels 4, norm_num_groups 32) so nothing is downloaded; then
``{k: list(v.shape) for k, v in model.state_dict().items()}`` was dumped. The same scratch setup, at tiny widths and
at full MUG-V widths, checked that this module loads the reference's state dict strictly and reproduces its
encode/decode numerically (max abs diff ~1e-5, float32 noise); that check is not part of this suite (no diffusers
here).
"""
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.config import VAEConfig, vae_mugv, vae_tiny
from models.vae import (
    MUGV_LATENT_MEAN,
    MUGV_LATENT_STD,
    DiagonalGaussian,
    VideoVAE,
    load_mugv_vae,
    load_vae_state,
    mugv,
    tiny,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mugv_vae_keys.json"
MUGV_PARAMS = 411_752_900   # reference MUGAutoencoderPipeline: 2D 83,653,863 + temporal 328,099,036 + logvar 1
# never run (kept only so the released state dict loads strictly): truncated 2D encoder head, 2D decoder conv_in,
# and the reference's learned NLL variance
UNUSED = ("spatial_vae.module.encoder.conv_norm_out.", "spatial_vae.module.encoder.conv_out.",
          "spatial_vae.module.decoder.conv_in.", "logvar")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return tiny().eval()


def clip(t, hw=64, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, hw, hw, generator=g) * 2 - 1


@torch.no_grad()
def test_shapes_and_decode_lengths(vae):
    z17 = vae.encode(clip(17)).mode()
    z16 = vae.encode(clip(16)).mode()
    assert z17.shape == (1, 24, 3, 8, 8) and z16.shape == (1, 24, 2, 8, 8)
    assert vae.decode(z17, 17).shape == (1, 3, 17, 64, 64)
    assert vae.decode(z17, 24).shape == (1, 3, 24, 64, 64)
    assert vae.decode(z16, 16).shape == (1, 3, 16, 64, 64)
    assert VideoVAE.latent_frames(17) == 3 and VideoVAE.latent_frames(16) == 2 and VideoVAE.latent_frames(1) == 1
    recon, post = vae(clip(9, hw=32), sample=False)
    assert recon.shape == (1, 3, 9, 32, 32) and isinstance(post, DiagonalGaussian)
    # other lengths: zero feature frames padded at the front (reference temporal_vae.encode), dropped on decode
    z20 = vae.encode(clip(20, hw=16)).mode()
    assert z20.shape == (1, 24, 3, 2, 2) and vae.decode(z20, 20).shape == (1, 3, 20, 16, 16)


@torch.no_grad()
def test_first_frame_and_chunk_independence(vae):
    x = clip(17)
    y = x.clone()
    y[:, :, 9:] = clip(8, seed=1)
    zx, zy = vae.encode(x).mode(), vae.encode(y).mode()
    torch.testing.assert_close(zx[:, :, :2], zy[:, :, :2], rtol=0, atol=1e-5)   # frames 9..16 -> latent 2 only
    assert (zx[:, :, 2] - zy[:, :, 2]).abs().max() > 1e-4
    y[:, :, 1:9] = clip(8, seed=2)                                                # frames 1..8 -> latent 1 only
    zy = vae.encode(y).mode()
    torch.testing.assert_close(zx[:, :, 0], zy[:, :, 0], rtol=0, atol=1e-5)
    z_img = vae.encode(x[:, :, :1]).mode()                                        # latent 0 = image latent of frame 0
    assert z_img.shape == (1, 24, 1, 8, 8)
    torch.testing.assert_close(z_img[:, :, 0], zx[:, :, 0], rtol=0, atol=1e-5)
    z8 = vae.encode(x[:, :, :1].expand(-1, -1, 8, -1, -1)).mode()                 # = 8 copies (MUG-V I2V reference)
    torch.testing.assert_close(z8, z_img, rtol=0, atol=1e-5)


@torch.no_grad()
def test_decoder_context_is_the_window(vae):
    """MUG-V's temporal decoder pads time symmetrically (not front-causal): inside a decode window a latent frame
    changes the decoded frames of its neighbours on both sides; across windows nothing leaks."""
    zx = vae.encode(clip(17)).mode()
    zy = zx.clone()
    zy[:, :, 2] += 1.0
    dx, dy = vae.decode(zx, 17), vae.decode(zy, 17)            # one window (decode_window=6): latent 2 reaches back
    assert (dx[:, :, 1:9] - dy[:, :, 1:9]).abs().max() > 1e-3
    win2 = VideoVAE(vae_tiny(decode_window=2)).eval()
    win2.load_state_dict(vae.state_dict())
    dx, dy = win2.decode(zx, 17), win2.decode(zy, 17)          # windows {0, 1} {2}
    torch.testing.assert_close(dx[:, :, :9], dy[:, :, :9], rtol=0, atol=0)
    torch.testing.assert_close(vae.decode_tiled(zx, 17, tile_latent_frames=2), dx, rtol=0, atol=0)


def test_posterior_kl_sample_and_grad(vae):
    post = vae.encode(clip(8, hw=32))
    kl = post.kl()
    assert kl.shape == (1,) and torch.isfinite(kl).all() and (kl >= 0).all()
    s1 = post.sample(torch.Generator().manual_seed(3))
    s2 = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and not torch.equal(s1, post.mode())
    moments = torch.zeros(1, 48, 1, 2, 2)
    moments[:, 24:] = 100.0
    assert DiagonalGaussian(moments).logvar.max() == 20.0
    moments[:, 24:] = -100.0
    assert DiagonalGaussian(moments).logvar.min() == -30.0
    recon, post = vae(clip(8, hw=16))
    ((recon - clip(8, hw=16)).abs().mean() + 1e-6 * post.kl().mean()).backward()
    for name, p in vae.named_parameters():
        if name.startswith(UNUSED):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    vae.zero_grad(set_to_none=True)


@torch.no_grad()
def test_pixel_contract_and_bad_shapes(vae):
    with pytest.raises(ValueError, match="pixels in \\[-1, 1\\]"):
        vae.encode(clip(9, hw=16) * 127.5 + 127.5)             # uint8-range input
    x = vae.decode(vae.encode(clip(9, hw=16)).mode(), 9, clamp=True)
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 9, 60, 64))
    with pytest.raises(ValueError, match="\\[B, 3, T, H, W\\]"):
        vae.encode(torch.zeros(1, 1, 9, 16, 16))
    with pytest.raises(ValueError, match="num_frames"):
        vae.decode(torch.zeros(1, 24, 3, 2, 2), 25)
    with pytest.raises(ValueError, match="num_frames"):
        vae.decode(torch.zeros(1, 24, 3, 2, 2), 16)
    with pytest.raises(ValueError, match="decode expects"):
        vae.decode(torch.zeros(1, 4, 3, 2, 2), 17)
    with pytest.raises(ValueError, match="norm_groups"):
        VAEConfig(norm_groups=32)
    with pytest.raises(ValueError, match="latent_stats"):
        VAEConfig(latent_stats="other")


def test_tiny_speed(vae):
    """Budget: tiny encode + decode of a 17x64x64 clip < 0.5 s. Timed on ONE thread (the 2-core CI box is shared;
    OpenMP threads spin badly when another process holds a core)."""
    x, threads = clip(17), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            vae.decode(vae.encode(x).mode(), 17)                # warm-up
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                vae.decode(vae.encode(x).mode(), 17)
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    print(f"tiny VAE encode+decode 17x64x64: {best * 1e3:.0f} ms, {sum(p.numel() for p in vae.parameters()):,} params")
    assert best < 0.5


def test_latent_normalisation_constants():
    assert len(MUGV_LATENT_MEAN) == len(MUGV_LATENT_STD) == 24
    assert vae_mugv().latent_stats == "mugv" and vae_tiny().latent_stats == "dataset"
    v = tiny(latent_stats="mugv")                               # buffers hold the published constants
    torch.testing.assert_close(v.shift.flatten(), torch.tensor(MUGV_LATENT_MEAN), rtol=0, atol=0)
    torch.testing.assert_close(v.scale.flatten(), torch.tensor(MUGV_LATENT_STD), rtol=0, atol=0)
    z = torch.randn(2, 24, 3, 4, 4)
    torch.testing.assert_close(v.denormalize(v.normalize(z)), z)
    torch.testing.assert_close(v.normalize(z)[:, 4], (z[:, 4] - MUGV_LATENT_MEAN[4]) / MUGV_LATENT_STD[4])
    t = tiny()                                                  # dataset stats are applied by the compress stage
    assert torch.equal(t.normalize(z), z)


def test_mugv_matches_reference_keys_shapes_and_param_count():
    fixture = json.loads(FIXTURE.read_text())
    cfg = vae_mugv()
    assert cfg.feature_channels == 512 and cfg.norm_groups == 32
    with torch.device("meta"):
        m = mugv()
    n = sum(p.numel() for p in m.parameters())
    parts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in
             [("2D encoder", m.spatial_vae.module.encoder), ("2D decoder", m.spatial_vae.module.decoder),
              ("temporal encoder", m.temporal_vae.encoder), ("temporal decoder", m.temporal_vae.decoder)]}
    print(f"MUG-V VAE parameters: {n:,} ({', '.join(f'{k} {v:,}' for k, v in parts.items())})")
    assert n == MUGV_PARAMS == fixture["num_parameters"]
    ours = {k: list(v.shape) for k, v in m.state_dict().items()}
    ref = fixture["keys"]
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    assert len(ours) == fixture["num_state_tensors"] == 522
    # strict load of a reference-shaped state dict (meta tensors; load_mugv_vae assigns them)
    ref_sd = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    loaded = load_mugv_vae(ref_sd, dtype=None)
    assert sum(p.numel() for p in loaded.parameters()) == MUGV_PARAMS


def _perturbed_tiny_state():
    torch.manual_seed(1)
    v = tiny()
    with torch.no_grad():
        for p in v.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return v, {k: t.clone() for k, t in v.state_dict().items()}


@torch.no_grad()
def test_load_mugv_vae_round_trip(tmp_path):
    v, sd = _perturbed_tiny_state()
    v.eval()
    x = clip(9, hw=16)
    want = v.decode(v.encode(x).mode(), 9)
    torch.save({"state_dict": sd, "step": 7}, tmp_path / "nested.pt")
    torch.save({f"module.{k}": t for k, t in sd.items()}, tmp_path / "ddp.pt")
    save_file(sd, str(tmp_path / "vae.safetensors"))
    for src in (sd, {"model": sd}, tmp_path / "nested.pt", str(tmp_path / "ddp.pt"), tmp_path / "vae.safetensors"):
        got = load_mugv_vae(src, cfg=vae_tiny())
        assert not got.training and all(p.device.type == "cpu" for p in got.parameters())
        torch.testing.assert_close(got.decode(got.encode(x).mode(), 9), want, rtol=0, atol=0)
    bf16 = load_mugv_vae({k: t.bfloat16() for k, t in sd.items()}, cfg=vae_tiny())
    assert bf16.temporal_vae.quant_conv.conv.weight.dtype == torch.float32


def test_load_mugv_vae_errors(tmp_path):
    _, sd = _perturbed_tiny_state()
    bad = dict(sd)
    bad.pop("temporal_vae.quant_conv.conv.weight")
    bad["spatial_vae.module.quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    bad["temporal_vae.decoder.conv1.conv.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        load_mugv_vae(bad, cfg=vae_tiny())
    msg = str(e.value)
    assert "missing keys (1)" in msg and "temporal_vae.quant_conv.conv.weight" in msg
    assert "unexpected keys (1)" in msg and "spatial_vae.module.quant_conv.weight" in msg
    assert "shape mismatches (1)" in msg and "temporal_vae.decoder.conv1.conv.bias: checkpoint [3]" in msg
    with pytest.raises(ValueError, match="missing keys"):
        load_mugv_vae(sd)                                       # tiny weights into the mugv() config
    with pytest.raises(ValueError, match="missing keys"):
        load_vae_state(tiny(), {k: t for k, t in sd.items() if k != "logvar"})
    with pytest.raises(ValueError, match="cannot find a state dict"):
        load_mugv_vae({"epoch": 3, "optimizer": {"lr": 1.0}}, cfg=vae_tiny())
    with pytest.raises(FileNotFoundError):
        load_mugv_vae(tmp_path / "nope.pt")


@torch.no_grad()
def test_decode_tiled(vae):
    z = vae.encode(clip(9, hw=48)).mode()                       # latent plane 6x6
    full = vae.decode(z, 9)
    # tiles covering the plane (and the default 6-latent window) are exactly decode()
    torch.testing.assert_close(vae.decode_tiled(z, 9), full, rtol=0, atol=0)
    torch.testing.assert_close(vae.decode_tiled(z, 9, tile_hw=(6, 16), overlap=2), full, rtol=0, atol=0)
    # real tiling: shape, finite; the tile geometry and blend weights are checked exactly below with a local decoder
    tiled = vae.decode_tiled(z, 9, tile_hw=4, overlap=2, clamp=True)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all() and tiled.abs().max() <= 1


@torch.no_grad()
def test_decode_tiled_blending_is_a_partition_of_unity():
    """With a spatially local stand-in for the decoders, overlapped + linearly blended tiles reproduce the untiled
    output to float precision for any tile size / overlap, including planes that tiles do not divide evenly. (The
    real decoders' GroupNorm statistics, mid-block attention and wide receptive field span the whole tile, so real
    tiling is only approximately equal - for a random-init tiny VAE the difference is not small.)"""
    v = tiny().eval()
    w = torch.randn(3, 24)
    v.spatial_vae.decode = lambda f: torch.einsum("oc,bcthw->bothw", w, f[:, :24]).repeat_interleave(
        8, -1).repeat_interleave(8, -2).tanh()
    v._temporal_decode = lambda z, nf, win: z.repeat_interleave(8, 2)[:, :, 8 * z.shape[2] - nf:]
    z = torch.randn(2, 24, 2, 10, 13)
    full = v.decode(z, 9)
    for tile, ov in [(4, 1), (4, 2), (5, 0), (6, 3), ((3, 7), 2)]:
        torch.testing.assert_close(v.decode_tiled(z, 9, tile_hw=tile, overlap=ov), full, rtol=0, atol=1e-6)
