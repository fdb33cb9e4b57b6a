"""ewq/twin.py: a stand-in that favours no type computes what its source computes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from benchmarks.off_grid import grid_step
from ewq.twin import random_rotation, rotate, twin_of, write_twin


def on_q4_1_grid(model):
    """The model with every matrix replaced by its Q4_1 round trip, as the default model's are."""
    from ewq.llamacpp.quantizers import round_trip
    from ewq.quant_types import LlamaType

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.from_numpy(round_trip(param.float().numpy(), LlamaType.Q4_1)))
    return model


def tiny_qwen2():
    """Qwen2: biases on q/k/v, an untied head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.double()


@pytest.mark.parametrize("make, source_on_grid", [(lambda: on_q4_1_grid(tiny_llama(num_layers=3, tie=True)), True),
                                                  (tiny_qwen2, False)], ids=["llama-tied-on-grid", "qwen2-biases-untied"])
def test_the_twin_computes_the_same_function_off_every_grid(tmp_path, make, source_on_grid):
    from ewq.metrics.kld import token_kld

    source = tmp_path / "source"
    make().save_pretrained(source, safe_serialization=True)
    twin = write_twin(source, tmp_path / "twin", seed=3, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    before, after = logits(source, ids), logits(twin, ids)
    assert torch.allclose(before, after, atol=2e-4, rtol=1e-4)
    kld = token_kld(before.reshape(-1, 128).float(), after.reshape(-1, 128).float())
    assert float(kld.max()) < 1e-6
    config = json.loads((twin / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    from safetensors.torch import load_file

    source_tensors, twin_tensors = load_file(source / "model.safetensors"), load_file(twin / "model.safetensors")
    assert "lm_head.weight" in twin_tensors
    assert all(torch.equal(t, torch.ones_like(t)) for name, t in twin_tensors.items() if name.endswith("norm.weight"))
    moved = [name for name, t in twin_tensors.items() if t.dim() == 2]
    assert len(moved) == 3 * 7 + 2
    for name in moved:  # a dense mix of the source's values: no grid of 32-blocks left
        with pytest.raises(ValueError, match="neither"):
            grid_step(twin_tensors[name])
    if source_on_grid:  # the llama source lies on Q4_1's grid, as the default model does
        assert all(grid_step(t)[0] == "Q4_1" for t in source_tensors.values() if t.dim() == 2)


def test_the_rotation_is_orthogonal_and_seeded():
    q = random_rotation(16, seed=5)
    assert torch.allclose(q @ q.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_rotation(16, seed=5)) and not torch.equal(q, random_rotation(16, seed=6))


def test_a_layout_the_twin_does_not_know_is_refused():
    tensors = {name: p.detach() for name, p in tiny_llama(num_layers=1).named_parameters()}
    q = random_rotation(64, seed=0)
    rotate(dict(tensors), q)  # known: fine
    with pytest.raises(ValueError, match="bias on the residual stream"):
        rotate({**tensors, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, q)
    with pytest.raises(ValueError, match="does not know how to rotate"):
        rotate({**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(4, 64)}, q)
    assert np.isfinite(q.numpy()).all()


def test_the_twin_records_its_source_and_the_report_names_it(tmp_path, monkeypatch):
    from ewq import assets
    from ewq.report.page import baseline_caveat

    source = tmp_path / "source"
    tiny_llama(num_layers=1, tie=True).save_pretrained(source, safe_serialization=True)
    twin = write_twin(source, tmp_path / "twin", seed=4, dtype=torch.bfloat16)
    assert twin_of(twin) == {"source": str(source), "seed": 4, "dtype": "bfloat16"} and twin_of(source) is None
    monkeypatch.setattr(assets, "DEFAULT_MODEL_DIR", source)
    assert "the rotated twin of the offline default model (seed 4, bfloat16)" in baseline_caveat(str(twin))
    assert "dequantized from a Q4_1 GGUF" in baseline_caveat(str(source))
    assert baseline_caveat(str(tmp_path)).startswith(f"Figures for {tmp_path} only")
    # the marker is written last: weights without it are a write cut short, written again
    (twin / "twin.json").unlink()
    (twin / "model.safetensors").write_bytes(b"cut short")
    write_twin(source, twin, seed=4, dtype=torch.bfloat16)
    assert twin_of(twin)["seed"] == 4 and (twin / "model.safetensors").stat().st_size > 1000


def test_the_noise_stand_in_of_the_second_architecture_is_refused_in_one_line(capsys):
    """Its GGUF was Q4_K_M: the noise, sized by Q4_1's and Q8_0's grids, has no step to take there."""
    from benchmarks import off_grid

    with pytest.raises(SystemExit) as stop:
        off_grid.main(["--source", "qwen", "--stand-in", "noise"])
    assert stop.value.code == 2 and "twin stand-in only" in capsys.readouterr().err


def test_off_grid_refuses_a_single_chunk_in_one_line(capsys, tmp_path):
    """Every SE it prints is across chunks: one chunk has none, so it stops before any model is written."""
    from benchmarks import off_grid

    for option in ("--chunks", "--prediction-chunks"):
        with pytest.raises(SystemExit) as stop:
            off_grid.main([option, "1", "--out-dir", str(tmp_path / "never-written")])
        assert stop.value.code == 2 and "2 chunks at least" in capsys.readouterr().err
    assert not (tmp_path / "never-written").exists()


def test_an_unknown_off_grid_variant_is_refused_in_one_line_naming_it(capsys):
    """--variants takes labels of off_grid.VARIANTS; a bad one stops before any model is written."""
    from benchmarks import off_grid

    assert off_grid.variant_list("kld, error") == ["kld", "error"]
    with pytest.raises(SystemExit) as stop:
        off_grid.main(["--variants", "kld,klld", "--out-dir", "/nonexistent/never-written"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "klld: not among kld, kld weights" in err and "Traceback" not in err


def test_an_unknown_off_grid_preset_is_refused_in_one_line_naming_it(capsys):
    """--presets takes llama.cpp's five mixes; a bad one stops before any model is written."""
    from benchmarks import off_grid

    assert off_grid.preset_list("Q3_K_M,Q6_K") == ["Q3_K_M", "Q6_K"]
    with pytest.raises(SystemExit) as stop:
        off_grid.main(["--presets", "Q4_K_M,Q4_K_L", "--out-dir", "/nonexistent/never-written"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Q4_K_L: not among Q3_K_M, Q4_K_S" in err and "Traceback" not in err
