"""VideoVAE: shapes, 8k+1 first-frame handling, chunk independence, posterior, bad-shape errors."""
import pytest
import torch

from models.config import vae_mugv
from models.vae import DiagonalGaussian, VideoVAE, tiny


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return tiny().eval()


def clip(t, hw=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, hw, hw, generator=g) * 2 - 1


@torch.no_grad()
def test_shapes_and_decode_lengths(vae):
    z17 = vae.encode(clip(17)).mode()
    z16 = vae.encode(clip(16)).mode()
    assert z17.shape == (1, 24, 3, 8, 8) and z16.shape == (1, 24, 2, 8, 8)
    assert vae.decode(z17, 17).shape == (1, 3, 17, 64, 64)
    assert vae.decode(z17, 24).shape == (1, 3, 24, 64, 64)
    assert vae.decode(z16, 16).shape == (1, 3, 16, 64, 64)
    assert VideoVAE.latent_frames(17) == 3 and VideoVAE.latent_frames(16) == 2
    recon, post = vae(clip(9, hw=32), sample=False)
    assert recon.shape == (1, 3, 9, 32, 32) and isinstance(post, DiagonalGaussian)


@torch.no_grad()
def test_first_frame_and_chunk_independence(vae):
    x = clip(17)
    y = x.clone()
    y[:, :, 9:] = clip(8, seed=1)
    zx, zy = vae.encode(x).mode(), vae.encode(y).mode()
    torch.testing.assert_close(zx[:, :, :2], zy[:, :, :2], rtol=0, atol=1e-5)
    assert (zx[:, :, 2] - zy[:, :, 2]).abs().max() > 1e-4
    z_img = vae.encode(x[:, :, :1]).mode()
    assert z_img.shape == (1, 24, 1, 8, 8)
    torch.testing.assert_close(z_img[:, :, 0], zx[:, :, 0], rtol=0, atol=1e-5)
    dx = vae.decode(zx, 17)
    dy = vae.decode(torch.cat([zx[:, :, :2], zy[:, :, 2:]], dim=2), 17)
    torch.testing.assert_close(dx[:, :, :9], dy[:, :, :9], rtol=0, atol=1e-5)


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
    recon, post = vae(clip(8, hw=16))
    ((recon - clip(8, hw=16)).abs().mean() + 1e-6 * post.kl().mean()).backward()
    grads = [p.grad for p in vae.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    vae.zero_grad(set_to_none=True)


@torch.no_grad()
def test_bad_shapes(vae):
    with pytest.raises(ValueError, match="8k or 8k\\+1"):
        vae.encode(clip(10, hw=16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 9, 60, 64))
    with pytest.raises(ValueError, match="\\[B, 3, T, H, W\\]"):
        vae.encode(torch.zeros(1, 1, 9, 16, 16))
    with pytest.raises(ValueError, match="num_frames"):
        vae.decode(torch.zeros(1, 24, 3, 2, 2), 20)
    with pytest.raises(ValueError, match="decode expects"):
        vae.decode(torch.zeros(1, 4, 3, 2, 2), 17)


def test_mugv_factory_builds():
    cfg = vae_mugv()
    assert cfg.feature_channels == 512 and cfg.spatial_channels[-1] == 512
    with torch.device("meta"):
        m = VideoVAE(cfg)
    assert sum(p.numel() for p in m.parameters()) > 10 * sum(p.numel() for p in tiny().parameters())
