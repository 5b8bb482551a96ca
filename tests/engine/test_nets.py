"""Model builders, MONAI noise process wiring, few-step sampler, dynamic thresholding."""
from __future__ import annotations

import pytest
import torch

from engine.nets import (
    build_scheduler,
    build_unet,
    count_parameters,
    dynamic_threshold,
    in_out_channels,
    regression_predict,
    rflow_sample,
    training_prediction,
)

TINY = {
    "architecture": {"channels": [8, 8], "num_res_blocks": 1, "attention_levels": [False, False],
                     "norm_num_groups": 4},
    "io": {"target_channels": 1, "cond_channels": 1, "context_slices": 1},
}


def test_channels_from_io() -> None:
    assert in_out_channels({"target_channels": 1, "cond_channels": 1, "context_slices": 1}) == (16, 4)
    assert in_out_channels({"target_channels": 2, "cond_channels": 1, "context_slices": 2}) == (28, 8)
    assert in_out_channels({"target_channels": 1, "cond_channels": 1}) == (8, 4)


def test_build_unet_seeded_and_shapes() -> None:
    torch.manual_seed(0)
    a = build_unet(TINY)
    torch.manual_seed(0)
    b = build_unet(TINY)
    assert count_parameters(a) == count_parameters(b) > 0
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    y = a(x=torch.randn(2, 16, 8, 8), timesteps=torch.tensor([10, 900]))
    assert y.shape == (2, 4, 8, 8)


def test_training_prediction_goes_through_concat() -> None:
    torch.manual_seed(0)
    net = build_unet(TINY).eval()
    sch = build_scheduler({})
    x0, cond, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 12, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    got = training_prediction(net, sch, x0, cond, noise, t)
    tau = (t.float() / 1000).view(-1, 1, 1, 1)
    xt = (1 - tau) * x0 + tau * noise  # MONAI rectified-flow forward process
    want = net(x=torch.cat([xt, cond], 1), timesteps=t)
    assert torch.allclose(got, want, atol=1e-6)
    r = regression_predict(net, cond, 4, 1000)
    assert r.shape == (2, 4, 8, 8)


class _Oracle(torch.nn.Module):
    """Velocity of the straight path to a known clean sample (read from the condition)."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        xt, target = x[:, :4], x[:, 4:8]
        tau = (timesteps.float() / 1000).view(-1, 1, 1, 1)
        eps = (xt - (1 - tau) * target) / tau
        return target - eps


@pytest.mark.parametrize("steps,start", [(1, 1.0), (2, 0.3), (6, 1.0), (4, 0.5)])
def test_sampler_reaches_the_clean_sample_with_an_oracle(steps: int, start: float) -> None:
    sch = build_scheduler({})
    target = torch.randn(3, 4, 8, 8)
    noise = torch.randn(3, 4, 8, 8)
    if start < 1:
        x = sch.add_noise(target * 0.9, noise, torch.full((3,), round(start * 1000)))
    else:
        x = noise
    out = rflow_sample(_Oracle(), sch, target, x, start, steps)
    assert torch.allclose(out, target, atol=1e-4)


class _X0Oracle(torch.nn.Module):
    """An x0-predicting network that knows the clean sample (read from the condition)."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return x[:, 4:8]


class _X0FromVelocity(torch.nn.Module):
    """Wraps a velocity network as an x0 network: x0 = x_t + tau v (the sampler's own identity)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        tau = (timesteps.float() / 1000).view(-1, 1, 1, 1)
        return x[:, :4] + tau * self.net(x=x, timesteps=timesteps)


@pytest.mark.parametrize("steps,start", [(1, 1.0), (3, 1.0), (2, 0.4)])
def test_x0_prediction_sampler(steps: int, start: float) -> None:
    sch = build_scheduler({})
    target = torch.randn(2, 4, 8, 8)
    x = torch.randn(2, 4, 8, 8) * start
    # an x0 oracle lands on the clean sample from any start, in any number of steps
    assert torch.allclose(rflow_sample(_X0Oracle(), sch, target, x, start, steps, prediction="x0"), target, atol=1e-5)
    # an x0 network and the velocity network it is derived from take the same path
    torch.manual_seed(0)
    net = build_unet(TINY).eval()
    cond = torch.randn(2, 12, 8, 8)
    with torch.no_grad():
        a = rflow_sample(net, sch, cond, x, start, steps)
        b = rflow_sample(_X0FromVelocity(net), sch, cond, x, start, steps, prediction="x0")
    assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="prediction"):
        rflow_sample(net, sch, cond, x, start, steps, prediction="eps")


def test_sampler_with_identity_threshold_is_unchanged() -> None:
    sch = build_scheduler({})
    torch.manual_seed(0)
    net = build_unet(TINY).eval()
    cond = torch.randn(2, 12, 8, 8)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = rflow_sample(net, sch, cond, x, 1.0, 3)
        b = rflow_sample(net, sch, cond, x, 1.0, 3, x0_transform=lambda v: v)
    assert torch.allclose(a, b, atol=1e-5)


def test_dynamic_threshold() -> None:
    x = torch.zeros(2, 1, 10, 10)
    x[0, 0, 0, 0] = 5.0  # an outlier in sample 0
    x[1] = torch.linspace(-3, 3, 100).view(1, 10, 10)
    y = dynamic_threshold(x, 0.9, 1.0)
    assert y[0].max() == 1.0  # 90th percentile of |x| is 0 -> floor 1
    s1 = torch.quantile(x[1].abs().flatten(), 0.9)
    assert torch.isclose(y[1].max(), s1) and torch.isclose(y[1].min(), -s1)
    assert torch.equal(dynamic_threshold(x, 1.0, 10.0), x)  # nothing above the floor
    with pytest.raises(ValueError):
        dynamic_threshold(x, 0.0, 1.0)


def test_sampler_rejects_bad_arguments() -> None:
    sch = build_scheduler({})
    with pytest.raises(ValueError):
        rflow_sample(_Oracle(), sch, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), 1.0, 0)
    with pytest.raises(ValueError):
        rflow_sample(_Oracle(), sch, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), 1.5, 2)
    with pytest.raises(ValueError):
        build_scheduler({"scheduler": {"kind": "DDPMScheduler"}})
