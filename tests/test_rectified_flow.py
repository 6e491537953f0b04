"""Rectified flow (docs/mugv.md §4): timestep sampling and shift, interpolation, masked loss, Euler CFG sampler."""
import math

import pytest
import torch

from models.rectified_flow import (
    euler_sample,
    flow_loss,
    interpolate,
    sample_t,
    shift_t,
    training_step_inputs,
    velocity_target,
)


def test_sample_t_range_and_median():
    t = sample_t(20000, torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.min() > 0 and t.max() < 1000
    assert abs(t.median().item() - 500) < 15
    t_loc = sample_t(20000, torch.Generator().manual_seed(0), loc=1.0)
    assert abs(t_loc.median().item() - 1000 / (1 + math.exp(-1))) < 15
    assert torch.equal(sample_t(5, torch.Generator().manual_seed(3)), sample_t(5, torch.Generator().manual_seed(3)))


def test_shift_t_hand_values():
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    torch.testing.assert_close(shift_t(t, 512, 512, 1), t)                 # s = 1: identity
    s = math.sqrt(1280 * 720 / 512 ** 2) * math.sqrt(14)                    # 720p, 14 latent frames
    assert abs(s - 7.0156) < 1e-3
    assert shift_t(500.0, 720, 1280, 14) == pytest.approx(1000 * s * 0.5 / (1 + (s - 1) * 0.5))
    assert shift_t(500.0, 720, 1280, 14) == pytest.approx(1000 * s / (1 + s))   # median -> s/(1+s) = 0.875
    assert shift_t(1000.0, 720, 1280, 14) == pytest.approx(1000) and shift_t(0.0, 720, 1280, 14) == 0


def test_interpolate_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 2, 2, 3, 4, 4, generator=g)
    torch.testing.assert_close(interpolate(x0, noise, torch.tensor([0.0, 0.0])), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.tensor([1000.0, 1000.0])), noise)
    torch.testing.assert_close(interpolate(x0, noise, torch.tensor([500.0, 500.0])), (x0 + noise) / 2)
    torch.testing.assert_close(velocity_target(x0, noise), x0 - noise)
    t, dt = torch.tensor([300.0, 700.0]), 100.0                           # moving down in t follows v
    step = interpolate(x0, noise, t - dt) - interpolate(x0, noise, t)
    torch.testing.assert_close(step, velocity_target(x0, noise) * dt / 1000)


def test_flow_loss_masked_frames_by_hand():
    target = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(2, 1, 3, 1, 1).expand(2, 1, 3, 2, 2)
    x0, noise, v = target.clone(), torch.zeros_like(target), torch.zeros_like(target)
    torch.testing.assert_close(flow_loss(v, x0, noise), torch.tensor([14 / 3, 77 / 3]))
    keep = torch.tensor([[False, True, True], [True, False, False]])
    torch.testing.assert_close(flow_loss(v, x0, noise, keep), torch.tensor([(4 + 9) / 2, 16.0]))
    v_bad = v.clone()
    v_bad[0, :, 0] = 100.0                                                  # a masked frame's error is ignored
    v_bad[1, :, 2] = -100.0
    torch.testing.assert_close(flow_loss(v_bad, x0, noise, keep), torch.tensor([6.5, 16.0]))
    assert flow_loss(v, x0, noise, torch.zeros(2, 3, dtype=torch.bool)).tolist() == [0.0, 0.0]


def _texts(b=2, s=4, d=8, s_null=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, s, d, generator=g), torch.ones(b, s, dtype=torch.bool),
            torch.randn(1, s_null, d, generator=g), torch.ones(1, s_null, dtype=torch.bool))


def test_euler_recovers_x0_with_oracle_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 2, 2, 3, 4, 4, dtype=torch.float64, generator=g)
    text, mask, null, null_mask = _texts()

    def oracle(z, t, text_2b, mask_2b):                                    # exact v for a point-mass data set
        assert z.shape[0] == text_2b.shape[0] == mask_2b.shape[0] == 4
        return (torch.cat([x0, x0]) - z) / (t / 1000).view(-1, 1, 1, 1, 1)

    for steps in (1, 4, 25):
        out = euler_sample(oracle, noise, text, mask, null, null_mask, steps=steps, cfg_scale=4.0,
                           height_px=720, width_px=1280)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_euler_i2v_reimposes_condition_frame():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 2, 2, 3, 4, 4, generator=g)
    text, mask, null, null_mask = _texts()
    seen = []

    def oracle(z, t, text_2b, mask_2b, cond_mask_BT):
        seen.append(cond_mask_BT)
        torch.testing.assert_close(z[:, :, 0], torch.cat([x0, x0])[:, :, 0])
        return (torch.cat([x0, x0]) - z) / (t / 1000).view(-1, 1, 1, 1, 1)

    out = euler_sample(oracle, noise, text, mask, null, null_mask, steps=3, cfg_scale=2.0, height_px=64,
                       width_px=64, cond_latent=x0[:, :, :1])
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert len(seen) == 3 and seen[0].tolist() == [[True, False, False]] * 4


def test_cfg_scale_one_equals_cond_only():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 2, 3, 4, 4, generator=g)
    text, mask, null, null_mask = _texts()

    def model(z, t, txt, m):
        return -0.3 * z + (txt * m[..., None]).mean((1, 2)).view(-1, 1, 1, 1, 1) * (t / 1000).view(-1, 1, 1, 1, 1)

    kw = dict(steps=5, height_px=256, width_px=256)
    out = euler_sample(model, noise, text, mask, null, null_mask, cfg_scale=1.0, **kw)
    other_null = euler_sample(model, noise, text, mask, null * 7, null_mask, cfg_scale=1.0, **kw)
    cond_only = euler_sample(model, noise, text, mask, text, mask, cfg_scale=4.0, **kw)
    torch.testing.assert_close(out, other_null)
    torch.testing.assert_close(out, cond_only)
    assert not torch.allclose(out, euler_sample(model, noise, text, mask, null, null_mask, cfg_scale=4.0, **kw))


def test_training_step_inputs_keeps_condition_frames_clean():
    x0 = torch.randn(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([[True, False, False], [False, False, False]])
    x_t, t, noise = training_step_inputs(x0, torch.Generator().manual_seed(1), 0.0, 1.0, True, cond_mask=cond)
    assert x_t.shape == noise.shape == x0.shape and t.shape == (2,) and ((t > 0) & (t < 1000)).all()
    torch.testing.assert_close(x_t[0, :, 0], x0[0, :, 0])
    torch.testing.assert_close(x_t[:, :, 1:], interpolate(x0, noise, t)[:, :, 1:])
    _, t_plain, _ = training_step_inputs(x0, torch.Generator().manual_seed(1), 0.0, 1.0, False)
    torch.testing.assert_close(t, shift_t(t_plain, 64, 64, 3))            # 64 px, 3 frames: s = 0.22 < 1
    assert (t < t_plain).all()
