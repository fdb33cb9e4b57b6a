"""llama.cpp's arithmetic in the kld score: the activation blocks its matmuls round their inputs to, bit for
bit as llama.cpp rounds them, their cost in the units of the weights' error, and a plan that predicts with it."""
import ctypes
import json

import numpy as np
import pytest
import torch

from conftest import assert_usage_error, run, tiny_llama
from ewq.llamacpp import activations
from ewq.quant_types import Arithmetic, LlamaType, activation_type, gguf_menu


def llama_cpp_round_trip(x: np.ndarray, activation: LlamaType) -> np.ndarray:
    """Rows of `x` through libggml-base's own quantize_row_*_ref, read back as the dot products see them."""
    from ewq.llamacpp.quantizers import _library

    lib = _library()
    x = np.ascontiguousarray(x, dtype=np.float32)
    name = activation.value.lower().replace("_k", "_K")
    block_bytes = {LlamaType.Q8_0: 34, LlamaType.Q8_1: 36, LlamaType.Q8_K: 292}[activation]
    block = activations.BLOCK[activation]
    out = np.empty_like(x)
    for row_index, row in enumerate(x):
        blocks = np.zeros(row.size // block * block_bytes, dtype=np.uint8)
        getattr(lib, f"quantize_row_{name}_ref")(row.ctypes.data_as(ctypes.c_void_p),
                                                  blocks.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(row.size))
        raw = blocks.reshape(-1, block_bytes)
        if activation is LlamaType.Q8_K:  # float d, int8 qs[256], int16 bsums[16]
            scale, levels = raw[:, :4].copy().view(np.float32), raw[:, 4:260].copy().view(np.int8)
        else:  # fp16 d (Q8_1: and fp16 s), int8 qs[32]
            start = 2 if activation is LlamaType.Q8_0 else 4
            scale, levels = raw[:, :2].copy().view(np.float16).astype(np.float32), raw[:, start:].copy().view(np.int8)
        out[row_index] = (levels.astype(np.float32) * scale).reshape(-1)
    return out


@pytest.mark.parametrize("activation", [LlamaType.Q8_0, LlamaType.Q8_1, LlamaType.Q8_K])
def test_activation_blocks_are_llama_cpps_own_bit_for_bit(activation):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 512, generator=generator)
    x[:, ::97] *= 40  # outlier channels, as a down_proj input has
    x[2, :256] = 0  # an empty block
    ours = activations.round_trip(x, activation)
    theirs = torch.from_numpy(llama_cpp_round_trip(x.numpy(), activation))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, x)
    with pytest.raises(ValueError, match="do not divide"):
        activations.round_trip(torch.randn(2, 96), activation) if activation is LlamaType.Q8_K else \
            activations.round_trip(torch.randn(2, 48), activation)


def test_each_weight_type_rounds_its_input_as_llama_cpps_kernels_do():
    assert activation_type(LlamaType.Q5_0, Arithmetic.CPU) is LlamaType.Q8_0
    assert activation_type(LlamaType.Q5_1, Arithmetic.CPU) is LlamaType.Q8_1
    assert activation_type(LlamaType.Q6_K, Arithmetic.CPU) is LlamaType.Q8_K
    assert activation_type(LlamaType.IQ4_XS, Arithmetic.CPU) is LlamaType.Q8_K
    assert activation_type(LlamaType.Q6_K, Arithmetic.CUDA) is LlamaType.Q8_1
    assert activation_type(LlamaType.F16, Arithmetic.CPU) is None  # as the F16 reference file's own inputs
    assert activation_type(LlamaType.Q4_K, Arithmetic.WEIGHTS) is None
    assert all(activation_type(t, Arithmetic.CPU) for t in gguf_menu(256) if t is not LlamaType.F16)


def entry_of(model, name):
    from ewq.plan import TensorEntry
    from ewq.weights import block_index

    param = model.get_parameter(name)
    return TensorEntry(hf_name=name, gguf_name=None, block=block_index(name), shape=list(param.shape), dtype="F32",
                       numel=param.numel(), entropy_bits=0.0, std=1.0, max_abs_over_std=1.0, excess_kurtosis=0.0)


def test_an_input_rounding_costs_the_relative_output_error_it_is_given():
    """r_t(a), from per-column sums, is the relative squared error of the matmul's output when only its
    input is rounded: ‖W·(x̂ − x)‖² / ‖W·x‖² over the windows' tokens, as computed directly."""
    from ewq.sensitivity.service import SensitivityService

    model = tiny_llama(num_layers=2, hidden=256, intermediate=512, vocab=512)
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    names = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
             "model.embed_tokens.weight"]
    entries = [entry_of(model, name) for name in names]
    service = SensitivityService(model, tokens, None)
    errors = service.activation_errors(entries, Arithmetic.CPU)
    assert "model.embed_tokens.weight" not in errors  # a lookup, no matmul
    for name in names[:3]:
        module = model.get_submodule(name.removesuffix(".weight"))
        inputs = []
        handle = module.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.inference_mode():
            for window in tokens:
                model(input_ids=window[None], use_cache=False)
        handle.remove()
        x, weight = torch.cat(inputs).double(), module.weight.detach().double()
        assert set(errors[name]) == {"Q8_0", "Q8_1", "Q8_K"}
        for activation in (LlamaType.Q8_0, LlamaType.Q8_K):
            rounded = activations.round_trip(x.float(), activation).double()
            direct = float(((rounded - x) @ weight.T).pow(2).sum() / (x @ weight.T).pow(2).sum())
            assert errors[name][activation.value] == pytest.approx(direct, rel=0.1)
        assert errors[name]["Q8_K"] > errors[name]["Q8_0"]  # 256 values share a scale, 32 do in Q8_0
        assert not module._forward_pre_hooks


def test_a_measurement_in_llama_cpps_arithmetic_rounds_only_the_swapped_inputs():
    from ewq.sensitivity.service import SensitivityService

    model = tiny_llama(num_layers=2, hidden=256, intermediate=512, vocab=512)
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(2))
    service = SensitivityService(model, tokens, None)
    down = entry_of(model, "model.layers.0.mlp.down_proj.weight")
    weights_alone = service.measure([(down, LlamaType.Q4_K)]).mean_kld
    in_cpu_arithmetic = service.measure([(down, LlamaType.Q4_K)], arithmetic=Arithmetic.CPU).mean_kld
    assert in_cpu_arithmetic != weights_alone and in_cpu_arithmetic > 0
    assert service.measure([(down, LlamaType.F16)], arithmetic=Arithmetic.CPU).mean_kld == \
        service.measure([(down, LlamaType.F16)]).mean_kld
    assert service.measure([(down, LlamaType.Q4_K)]).mean_kld == weights_alone  # hooks gone
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_kld_plan_in_llama_cpps_arithmetic_adds_the_rounded_inputs_to_its_predictions(tmp_path):
    """The same measured sensitivities, two arithmetics: each prediction at the reference type grows by
    α_t · r_t (rank_cpu / rank_weights = 1 + r_t / e_t there); the weights-only plan keeps the hash of
    kld plans made before the choice existed; the activation errors are cached beside the sensitivities."""
    from test_kld_plan import with_tokenizer
    from ewq.plan import PlanParams, Score
    from ewq.plan.create import create_plan
    from ewq.quant_types import reference_type

    model_dir = with_tokenizer(tiny_llama(num_layers=2, hidden=256, intermediate=512, vocab=49152), tmp_path / "m")
    plans = tmp_path / "plans"
    common = dict(target_bytes=20_000_000, score=Score.KLD, keep_embeddings=False, keep_lm_head=False,
                  calibration_windows=1, calibration_context=32)
    weights_only = create_plan(str(model_dir), PlanParams(**common), cache_dir=plans)
    cpu = create_plan(str(model_dir), PlanParams(**common, kld_arithmetic="cpu"), cache_dir=plans)
    assert "kld_arithmetic" not in weights_only.params.to_json() and cpu.params.to_json()["kld_arithmetic"] == "cpu"
    assert weights_only.plan_hash != cpu.plan_hash
    [cache] = plans.glob("kld_sensitivity_*.json")
    added = json.loads(cache.read_text())["activations"]["cpu"]
    [table] = plans.glob("distortion_*.json")
    errors = json.loads(table.read_text())["gguf"]
    before = {t.hf_name: t for t in weights_only.tensors}
    checked = 0
    for t in cpu.tensors:
        if t.rank_score is None:
            continue
        reference = reference_type(t.ncols)
        r = added[t.hf_name].get(activation_type(reference, Arithmetic.CPU).value, 0.0)
        expected = before[t.hf_name].rank_score * (1 + r / errors[t.hf_name][reference.value])
        assert t.rank_score == pytest.approx(expected, rel=1e-9)
        checked += r > 0
    assert checked == 15  # every matrix a Linear multiplies: 2 layers x 7 and the head (the embedding is looked up)
    assert cpu.budget.gguf.measured_kld_calibration > 0 and cpu.budget.gguf.bytes <= common["target_bytes"]


def test_kld_arithmetic_goes_with_the_kld_score(tmp_path):
    tiny_llama(num_layers=2).save_pretrained(tmp_path / "m", safe_serialization=True)
    result = run("create_quantization_plan.py", "--model", tmp_path / "m", "--target-bpw", "8", "--kld-arithmetic",
                 "cuda", "--out-dir", tmp_path / "p", check=False)
    assert_usage_error(result, "go with --score kld")
    assert not (tmp_path / "p").exists()
