"""The GGUF half end to end: files built from source tools, plans proven, backends cross-checked."""
import math
import statistics
from pathlib import Path

import pytest
import torch

from conftest import ENV, ROOT, assert_usage_error, run
from ewq import plan as plan_mod
from ewq.backends import hf
from ewq.errors import UserError
from ewq.llamacpp import gguf_read
from ewq.llamacpp import tools as llama_tools
from ewq.metrics import perplexity, stats


def gguf_file(pipeline, variant):
    return Path(pipeline["files"][variant]["gguf"]["file"])


def test_ewq_gguf_types_equal_the_plan_tensor_by_tensor(pipeline):
    plan = plan_mod.load_plan(pipeline["plan"])
    result = pipeline["files"]["gguf-ewq"]
    assert result["plan_check"]["matches_plan"] and result["plan_hash"] == plan.plan_hash
    in_file = {t.name: t.type_name for t in gguf_read.read_tensors(gguf_file(pipeline, "gguf-ewq"))}
    planned = {t.gguf_name: t.llama_type for t in plan.tensors if t.gguf_name}
    assert planned == {name: in_file[name] for name in planned}
    assert {"Q4_0", "Q8_0", "F16"} <= set(in_file.values())


def test_a_file_that_does_not_follow_the_plan_is_named(pipeline):
    plan = plan_mod.load_plan(pipeline["plan"])
    with pytest.raises(UserError, match=r"does not follow plan .*blk\.\d+\.\w+\.weight: plan Q4_[0K], file Q8_0"):
        gguf_read.verify_plan(plan, gguf_file(pipeline, "gguf-q8_0"))


def test_gguf_results_record_size_types_and_llama_bench(pipeline):
    sizes = {}
    for variant in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-ewq"):
        result = pipeline["files"][variant]
        g = result["gguf"]
        assert g["file_bytes"] > g["weight_bytes"] > 0 and sum(g["type_histogram"].values()) == 272
        assert result["llama_bench"]["pp512"]["tokens_per_s"] > 0 and result["llama_bench"]["tg128"]["tokens_per_s"] > 0
        assert result["imatrix"] is (variant != "gguf-f16")
        sizes[variant] = g["bits_per_weight"]
    assert sizes["gguf-q4_k_m"] < sizes["gguf-ewq"] < sizes["gguf-f16"]
    assert sizes["gguf-q8_0"] < sizes["gguf-f16"]


def test_f16_gguf_through_llama_cpp_agrees_with_the_hf_original(pipeline):
    original, f16 = pipeline["files"]["original"], pipeline["files"]["gguf-f16"]
    assert original["settings"] == f16["settings"]
    ppl_hf = original["metrics"]["perplexity"]["ppl"]["value"]
    ppl_gguf = f16["metrics"]["perplexity"]["ppl"]["value"]
    assert abs(ppl_gguf / ppl_hf - 1) < 0.01
    assert f16["metrics"]["perplexity"]["kld"]["mean"] < 0.005
    assert f16["metrics"]["perplexity"]["same_top1"]["mean"] > 0.97


def test_quantized_ggufs_order_as_expected(pipeline):
    kld = {v: pipeline["files"][v]["metrics"]["perplexity"]["kld"]["mean"] for v in ("gguf-q8_0", "gguf-q4_k_m")}
    assert 0 < kld["gguf-q8_0"] < kld["gguf-q4_k_m"]


def test_llamacpp_logits_only_where_needed_equal_logits_for_every_position(pipeline):
    """The backend asks llama.cpp for the scored rows only (no logits_all, no score matrix copied);
    the rows equal those of a context that keeps logits for every position, as the bindings' eval does."""
    import llama_cpp
    import numpy as np

    from ewq.backends.llamacpp import LlamaCppBackend
    from ewq.results.record import WeightsReport

    path = gguf_file(pipeline, "gguf-q8_0")
    tokenizer = hf.load_tokenizer(ROOT / ".cache/models/SmolLM2-135M-Instruct")
    tokens = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12, add_special_tokens=False)[:96]
    prompts = [tokens[:n] for n in (7, 40, 96, 13)]
    every = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, flash_attn=True,
                            verbose=False, seed=0)

    def all_rows(sequence):
        every.reset()
        every.eval(sequence)
        return torch.log_softmax(torch.from_numpy(np.array(every.scores[: len(sequence)], dtype=np.float32)), -1)

    ours = LlamaCppBackend(path, "cpu", "q8", 128, WeightsReport(0, 0))
    rows = ours.window_logprobs([tokens, tokens[::-1]], slice(40, 95))
    expected = torch.stack([all_rows(tokens)[40:95], all_rows(tokens[::-1])[40:95]])
    torch.testing.assert_close(rows, expected, atol=1e-4, rtol=1e-4)
    letters = [330, 389, 340, 422]
    got = ours.next_token_logprobs(prompts, letters)
    torch.testing.assert_close(got, torch.stack([all_rows(p)[-1, letters] for p in prompts]), atol=1e-4, rtol=1e-4)
    generated = ours.generate_greedy(prompts[1], 8).tokens
    every.reset()
    every.eval(prompts[1])
    greedy = []
    for _ in range(8):
        greedy.append(int(np.argmax(every.scores[every.n_tokens - 1])))
        every.eval([greedy[-1]])
    assert generated == greedy


def test_our_kld_and_ppl_agree_with_llama_perplexity(pipeline, tmp_path):
    """Same text, same context. llama-perplexity scores the second half of non-overlapping
    512-token chunks, which are our even windows (context = 2 * stride), puts a BOS first in each
    chunk, tokenizes the text itself, and takes the F16 GGUF, not the HF model, as its KLD base."""
    tokenizer = hf.load_tokenizer(ROOT / ".cache/models/SmolLM2-135M-Instruct")
    settings = pipeline["files"]["original"]["settings"]
    assert settings["context"] == 2 * settings["stride"]
    from ewq.bench.inputs import load_eval_text

    tokens = tokenizer.encode(load_eval_text(settings["eval_text"]), add_special_tokens=False)
    spec = perplexity.WindowSpec(settings["context"], settings["stride"], settings["ppl_windows"], settings["kld_windows"])
    chunks = (len(perplexity.window_starts(len(tokens), spec)) + 1) // 2
    text = tmp_path / "eval.txt"
    text.write_text(tokenizer.decode(tokens[: (chunks + 1) * spec.context]))
    threads = torch.get_num_threads()
    base = tmp_path / "base.kld"

    def even_windows(values):
        return stats.mean_se(values[0::2])

    for variant in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        ours = pipeline["files"][variant]["metrics"]["perplexity"]
        theirs = llama_tools.llama_perplexity(gguf_file(pipeline, variant), text, spec.context, chunks, threads,
                                             base, write_base=variant == "gguf-f16")
        our_ppl = math.exp(even_windows(ours["per_window_nll"]).mean)
        assert abs(theirs["ppl"]["mean"] / our_ppl - 1) < 0.03, (variant, theirs["ppl"], our_ppl)
        if variant == "gguf-f16":
            continue
        # the chunk table llama-perplexity prints as it goes: every chunk, averaging to its final mean
        across = stats.mean_se(theirs["kld_per_chunk"])
        assert across.n == chunks, (variant, theirs["kld_per_chunk"])
        assert abs(across.mean - theirs["kld"]["mean"]) < 1e-5 * chunks, (variant, theirs["kld"], across)
        our_kld = even_windows(ours["per_window_kld"])
        tolerance = 3 * (theirs["kld"]["se"] + our_kld.se) + 0.15 * our_kld.mean
        assert abs(theirs["kld"]["mean"] - our_kld.mean) < tolerance, (variant, theirs["kld"], our_kld)


def test_gguf_bad_inputs(pipeline, tmp_path):
    results = pipeline["results"]
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    assert_usage_error(run("benchmark_gguf_q4.py", "--quick", "--gguf", not_gguf, "--out-dir", results, check=False),
                       "not a GGUF file")
    missing_tools = {**ENV, "EWQ_LLAMA_CPP_BIN": str(tmp_path / "nothing")}
    assert_usage_error(run("benchmark_gguf_q8.py", "--quick", "--gguf-dir", tmp_path, "--no-imatrix",
                           "--out-dir", results, check=False, env=missing_tools), "not found")
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before


def test_llama_perplexity_figures_of_a_quant_table_are_parsed():
    """The lines llama-perplexity --kl-divergence prints (tools/perplexity/perplexity.cpp), as parsed."""
    printed = """
Mean PPL(Q)                   :  31.570000 ±   1.210000
Mean PPL(base)                :  30.610000 ±   1.180000
Mean ln(PPL(Q)/PPL(base))     :   0.030877 ±   0.004321
Mean PPL(Q)/PPL(base)         :   1.031359 ±   0.004457
Mean    KLD:   0.041600 ±   0.000700
Maximum KLD:   2.345678
99.9%   KLD:   1.234567
99.0%   KLD:   0.456789
95.0%   KLD:   0.150000
RMS Δp    :  5.123 ± 0.210 %
Same top p: 86.080 ± 0.441 %
"""
    parsed = llama_tools.parse_perplexity(printed)
    assert parsed["kld"] == {"mean": 0.0416, "se": 0.0007} and parsed["ppl"] == {"mean": 31.57, "se": 1.21}
    assert parsed["kld_p99"] == {"mean": 0.456789, "se": None} and parsed["kld_max"]["mean"] == 2.345678
    assert parsed["ppl_ratio"] == {"mean": 1.031359, "se": 0.004457}
    assert parsed["rms_dp_pct"] == {"mean": 5.123, "se": 0.21} and parsed["same_top1_pct"]["mean"] == 86.08
    assert llama_tools.parse_perplexity("Final estimate: PPL = 24.0 +/- 0.9") == {"ppl": {"mean": 24.0, "se": 0.9}}


def test_each_chunks_kld_is_recovered_from_llama_perplexitys_running_means():
    """llama-perplexity prints, after each chunk, the running means over the chunks so far; chunk k's own KLD is
    k·m_k − (k−1)·m_(k−1), and the SE across chunks is the sample SD of those over √n."""
    own = [0.04000, 0.06000, 0.05000, 0.09000]
    rows = []
    for k in range(1, len(own) + 1):
        running = sum(own[:k]) / k
        rows.append(f"{k:4d}    {20 + k:9.4f} ± {1.5:9.4f}    {0.01:10.5f} ± {0.002:10.5f}    {running:10.5f} ± "
                    f"{0.003:10.5f}    {5.1:6.3f} ± {0.2:6.3f} %   {86.0:6.3f} ± {0.5:6.3f} %")
    printed = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS"
               "            Same top p\n" + "\n".join(rows) + "\n\nMean    KLD:   0.060000 ±   0.000700\n")
    assert llama_tools.chunk_klds(printed) == pytest.approx(own, abs=1e-4)
    across = stats.mean_se(llama_tools.parse_perplexity(printed)["kld_per_chunk"])
    assert across.n == 4 and across.mean == pytest.approx(0.06, abs=1e-5)
    assert across.se == pytest.approx(statistics.stdev(own) / 2, abs=1e-4)
    with pytest.raises(ValueError, match="not chunks 1..2"):
        llama_tools.chunk_klds("\n".join(rows[1:3]))


def test_the_bindings_load_the_very_library_the_tools_were_built_with():
    """One build (ewq/llamacpp/toolchain.py): the llama_cpp package's libllama is the cmake build's, the one
    llama-perplexity and llama-quantize link to, not a second compilation."""
    import llama_cpp.llama_cpp as bindings

    from ewq.commands.setup import site_packages
    from ewq.llamacpp import toolchain

    assert toolchain.bindings_installed(site_packages())
    loaded = Path(bindings._lib._name).resolve()
    assert loaded == (toolchain.BUILD_DIR / "bin" / "libllama.so").resolve()
    maps = Path("/proc/self/maps").read_text()
    assert str(loaded) in maps  # the loader mapped that file, not another libllama on its path


def test_the_cpu_build_holds_no_amx_kernels():
    """-march=native compiles ggml's AMX kernels where the CPU lists AMX; a VM that lists it without enabling
    the tile state kills llama-perplexity with SIGILL at the first quantized matmul (toolchain.NO_AMX_FLAGS).
    The built CPU library must not contain them (on an AMX host this failed before the flags)."""
    from ewq.llamacpp import toolchain

    if not toolchain.X86:
        pytest.skip("AMX is an x86 extension")
    library = (toolchain.BUILD_DIR / "bin" / "libggml-cpu.so").read_bytes()
    assert b"tinygemm_kernel_amx" not in library and b"ggml_backend_amx_buffer_type" not in library


def test_the_source_package_is_unpacked_whole_and_readable(tmp_path, monkeypatch):
    """toolchain.unpack_source: the sdist's vendored llama.cpp (without its models/) and its llama_cpp package,
    each moved into place whole, with the umask's mode (not mkdtemp's 0700)."""
    import io
    import os
    import tarfile

    from ewq.llamacpp import toolchain

    root = "llama_cpp_python-0.3.36"
    members = {f"{root}/vendor/llama.cpp/CMakeLists.txt": b"project(llama)",
               f"{root}/vendor/llama.cpp/models/ggml-vocab.gguf": b"large",
               f"{root}/llama_cpp/__init__.py": b"", f"{root}/setup.py": b""}

    def fake_download(spec, directory, source=False):
        assert source and spec == toolchain.SDIST_SPEC
        path = Path(directory) / f"{root}.tar.gz"
        with tarfile.open(path, "w:gz") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return path

    monkeypatch.setattr(toolchain, "pip_download", fake_download)
    source, python = tmp_path / "llama.cpp" / "src", tmp_path / "llama.cpp" / "python"
    mask = os.umask(0o022)
    try:
        assert toolchain.unpack_source(source, python) == source
    finally:
        os.umask(mask)
    assert sorted(p.name for p in source.iterdir()) == ["CMakeLists.txt"]  # models/ left out
    assert (python / "llama_cpp" / "__init__.py").is_file()
    assert source.stat().st_mode & 0o777 == python.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in source.parent.iterdir()) == ["python", "src"]  # no staging left
