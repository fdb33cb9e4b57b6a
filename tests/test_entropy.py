import math

import pytest
import torch

from ewq.plan.entropy import histogram_entropy, tensor_stats


def test_uniform_fills_every_bin():
    values = torch.rand(2_000_000, generator=torch.Generator().manual_seed(0))
    assert histogram_entropy(values, bins=256) == pytest.approx(8.0, abs=0.005)


def test_constant_tensor_has_zero_entropy():
    assert histogram_entropy(torch.full((1000,), 0.25), bins=256) == 0.0


def test_two_values_equally_often_is_one_bit():
    values = torch.tensor([-1.0, 1.0] * 5000)
    assert histogram_entropy(values, bins=64) == pytest.approx(1.0, abs=1e-9)


def test_gaussian_matches_differential_entropy_minus_log_bin_width():
    values = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bins = 256
    width = float(values.max() - values.min()) / bins
    expected = 0.5 * math.log2(2 * math.pi * math.e) - math.log2(width)
    assert histogram_entropy(values, bins=bins) == pytest.approx(expected, abs=0.01)


def test_an_outlier_lowers_entropy():
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(2))
    with_outlier = values.clone()
    with_outlier[0] = 100.0
    assert histogram_entropy(with_outlier) < histogram_entropy(values) - 2


def test_stats_of_known_distributions():
    gauss = tensor_stats(torch.randn(1_000_000, generator=torch.Generator().manual_seed(3)))
    assert gauss.std == pytest.approx(1.0, abs=0.01)
    assert gauss.excess_kurtosis == pytest.approx(0.0, abs=0.05)
    assert 4.0 < gauss.max_abs_over_std < 6.0
    uniform = tensor_stats(torch.rand(1_000_000, generator=torch.Generator().manual_seed(4)) * 2 - 1)
    assert uniform.excess_kurtosis == pytest.approx(-1.2, abs=0.02)
    assert uniform.max_abs_over_std == pytest.approx(math.sqrt(3), abs=0.01)
    assert uniform.numel == 1_000_000


def test_bf16_and_fp16_tensors_are_read():
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(5))
    for dtype in (torch.bfloat16, torch.float16):
        assert histogram_entropy(values.to(dtype)) == pytest.approx(histogram_entropy(values), abs=0.2)


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError):
        histogram_entropy(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_counting_sixteen_bit_values_gives_the_float_path_exactly(dtype):
    """The one-pass count over bit patterns (every bf16/fp16 checkpoint) against histc and float64
    moments on the same values: the same histogram, so the same entropy to the bit."""
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        scale = 10 ** float(torch.empty(1).uniform_(-3, 0, generator=generator))
        values = (scale * torch.randn(int(torch.randint(10, 300_000, (1,), generator=generator)), generator=generator)
                  + (seed % 4 == 0) * 3 * scale)
        values[0] = 40 * scale if seed % 3 == 0 else values[0]
        values = values.to(dtype).reshape(-1, 2) if values.numel() % 2 == 0 else values.to(dtype)
        counted, floating = tensor_stats(values, bins=97), tensor_stats(values.to(torch.float32), bins=97)
        assert counted.entropy_bits == floating.entropy_bits and counted.numel == floating.numel
        for field in ("std", "max_abs_over_std", "excess_kurtosis"):
            assert getattr(counted, field) == pytest.approx(getattr(floating, field), rel=1e-9, abs=1e-12)
    assert tensor_stats(torch.full((10,), 0.5, dtype=dtype)).entropy_bits == 0.0
    with pytest.raises(ValueError):
        tensor_stats(torch.tensor([1.0, float("inf")], dtype=dtype))
