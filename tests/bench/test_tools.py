"""The benchmark scripts' CPU paths: the throughput script's trace and its summary."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_script(name: str):
    """bench/<name>.py as a module; bench/ is on the path while it loads (scripts import their
    neighbours: blocks.py throughput.py, kernels.py graphs.py)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def span(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def test_trace_summary_ties_kernels_to_source_lines_and_autograd_nodes(tmp_path):
    events = [
        span("python_function", "src/braid/model/mlp.py(28): forward", 0, 100),
        span("cpu_op", "aten::to", 10, 20),
        span("cpu_op", "aten::copy_", 12, 10),
        span("cuda_runtime", "cudaLaunchKernel", 14, 2, correlation=5),
        span("cpu_op", "aten::mm", 40, 20),
        span("cuda_runtime", "cudaLaunchKernel", 45, 2, correlation=6),
        span("cpu_op", "autograd::engine::evaluate_function: ToCopyBackward0", 200, 50, tid=2),
        span("cpu_op", "aten::copy_", 210, 10, tid=2),
        span("cuda_runtime", "cudaLaunchKernel", 212, 2, tid=2, correlation=7),
        span("kernel", "void at::native::elementwise_kernel<direct_copy>", 50, 30, tid=9, correlation=5),
        span("kernel", "nvjet_sm90_tst_256x128", 90, 60, tid=9, correlation=6),
        span("kernel", "void at::native::unrolled_elementwise_kernel<direct_copy>", 260, 10, tid=9, correlation=7),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = load_script("trace_summary")
    text = "\n".join(summary.summarize(summary.load(str(path)), rows=10))
    assert "GPU kernel time 0.100 ms in 3 kernels" in text
    assert "0.060  60.00  matmul" in text and "0.040  40.00  copy/cast" in text
    assert "model/mlp.py(28): forward / aten::copy_" in text
    assert "model/mlp.py(28): forward / aten::mm" in text
    assert "ToCopyBackward0 / aten::copy_" in text


@pytest.mark.slow
def test_throughput_script_writes_a_trace_on_cpu(tmp_path):
    throughput = load_script("throughput")
    trace, rows = tmp_path / "step.json.gz", tmp_path / "rows.jsonl"
    throughput.main([
        "--device", "cpu", "--config", "tiny-hybrid", "--seq-len", "32", "--batch-size", "1", "--steps", "1",
        "--warmup", "1", "--compile", "none", "--no-peer", "--trace", str(trace), "--out", str(rows),
        "--baseline", "tiny-dense",
    ])
    events = load_script("trace_summary").load(str(trace))
    assert any(e.get("cat") == "python_function" and "braid/" in e["name"] for e in events)
    first, second = (json.loads(line) for line in rows.read_text().splitlines())
    assert first["config"] == "tiny-hybrid" and first["tokens_per_s"] > 0
    assert second["config"] == "tiny-dense" and second["compile"] == "none"


def test_ratios_use_the_fastest_baseline_and_peer_run():
    throughput = load_script("throughput")
    lines = throughput.ratio_lines({
        "braid": [("braid hybrid step-graph", 130.0), ("braid hybrid block-graph", 120.0)],
        "baseline": [("braid llama graph", 90.0), ("braid llama step-graph", 100.0)],
        "peer": [],
    })
    assert lines == [
        "ratio: braid hybrid step-graph / braid llama step-graph (fastest baseline of this run) = 1.300x",
        "ratio: braid hybrid block-graph / braid llama step-graph (fastest baseline of this run) = 1.200x",
    ]


def test_blocks_script_finds_one_sublayer_per_kind():
    blocks = load_script("blocks")
    from braid.configs.models import tiny_hybrid
    from braid.model import build_model

    model = build_model(tiny_hybrid(), device="cpu", seed=0)
    found = blocks.sublayers(model)
    counts = {kind: count for kind, (_, _, _, count) in found.items()}
    # tiny-hybrid: "M- S64E GF A- M- S32F"; each sliding window size is its own kind
    assert counts == {"mixer:mamba2": 2, "ffn:mlp": 3, "mixer:sliding64": 1, "ffn:moe": 1, "mixer:gla": 1,
                      "ffn:matformer": 2, "mixer:attention": 1, "mixer:sliding32": 1}
    spec, norm, module, _ = found["ffn:moe"]
    assert module is model.layers["1"].ffn and norm is model.layers["1"].ffn_norm and spec.index == 1


@pytest.mark.parametrize("name, kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64", "attention"),
    ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*)", "attention"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9x", "matmul"),
    ("triton_poi_fused__to_copy_mul_silu_silu_backward_2", "inductor"),
    ("triton_red_fused__log_softmax__to_copy_prepare_softmax_online_2", "inductor"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda>", "copy/cast"),
    ("_chunk_scan_chunk_state_bwd_dx_kernel", "triton"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
])
def test_trace_summary_kernel_kinds(name, kind):
    assert load_script("trace_summary").kind_of(name) == kind


def test_throughput_config_overrides_apply_to_the_model_config_and_reject_unknown_keys():
    throughput = load_script("throughput")
    cfg = throughput.resolve_config("hybrid-374m", 16384, ["mamba2.chunk_size=256", "gla.num_heads=4"])
    assert cfg.mamba2.chunk_size == 256 and cfg.gla.num_heads == 4 and cfg.max_seq_len == 16384
    assert throughput.resolve_config("hybrid-374m", 8192).mamba2.chunk_size == 128
    with pytest.raises(ValueError, match="unknown key 'chunk' in config.mamba2; valid keys: d_state"):
        throughput.resolve_config("hybrid-374m", 8192, ["mamba2.chunk=256"])
    args = throughput.parse_args(["--set", "mamba2.chunk_size=256", "--set", "moe.top_k=1"])
    assert args.set == ["mamba2.chunk_size=256", "moe.top_k=1"]


def test_kernels_summary_states_the_window_ratio_on_graph_and_eager_time():
    kernels = load_script("kernels")
    bench = kernels.Bench.__new__(kernels.Bench)  # no GPU here: the results are given
    bench.results = [
        kernels.Result("attention", "full: sdpa (cuDNN)", "s", ms=2.4, eager_ms=2.4),
        kernels.Result("attention", "full: flex", "s", ms=3.6, eager_ms=3.6),
        kernels.Result("attention", "window 1024: cudnn", "s", ms=0.75, eager_ms=1.2),
        kernels.Result("attention", "window 1024: flex", "s", ms=1.0, eager_ms=1.0),
    ]
    bench.graph = True
    lines = [line for line in kernels.summary(bench) if line.startswith("sliding window")]
    assert lines == [
        "sliding window 1024 (cudnn) vs full causal at T=8192: 3.20x vs SDPA (cuDNN), 4.80x vs flex full; "
        "meets the 3x target (graph replay; eager 2.00x)",
        "sliding window 1024 (flex) vs full causal at T=8192: 2.40x vs SDPA (cuDNN), 3.60x vs flex full; "
        "misses the 3x target (graph replay; eager 2.40x)",
    ]
    bench.graph = False  # eager times only: no second ratio
    assert not any("graph replay" in line for line in kernels.summary(bench))


def test_autotune_sweep_widens_with_the_librarys_block_values_and_finds_wrapped_autotuners():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")
    sweep = load_script("autotune_sweep")

    def hook(nargs):
        pass

    library = [
        triton.Config({"BM": 64, "BN": 32}, num_warps=4, num_stages=3, pre_hook=hook),
        triton.Config({"BM": 32, "BN": 64}, num_warps=4, num_stages=4, pre_hook=hook),
        triton.Config({"BM": 128, "BN": 64}, num_warps=8, num_stages=3, pre_hook=hook),
    ]
    timings = {library[0]: 0.3, library[1]: 0.1, library[2]: 0.2}
    wide = sweep.widened_configs(library, timings, warps=(2, 4), stages=(1, 2))
    shapes = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in wide}
    assert len(shapes) == len(wide)  # no repeats
    assert wide[:3] == library  # the library's own first
    assert all(c.pre_hook is hook for c in wide)
    # the two fastest shapes (32x64, 128x64) under each warps x stages; not the slowest one
    for bm, bn in ((32, 64), (128, 64)):
        assert all(((("BM", bm), ("BN", bn)), w, s) in shapes for w in (2, 4) for s in (1, 2))
    assert ((("BM", 64), ("BN", 32)), 2, 1) not in shapes
    # every combination of listed block values, at the fastest config's 4 warps and 4 stages
    assert {(c.kwargs["BM"], c.kwargs["BN"]) for c in wide if (c.num_warps, c.num_stages) == (4, 4)} == {
        (bm, bn) for bm in (32, 64, 128) for bn in (32, 64)
    }
    assert all(c.kwargs["BM"] in (32, 64, 128) and c.kwargs["BN"] in (32, 64) for c in wide)
    # --add-values: an added value joins the combinations of its key; a key the kernel lacks is ignored
    extra = sweep.widened_configs(library, timings, warps=(2, 4), stages=(1, 2),
                                  extra_values=sweep.parse_values(["BN=16", "BX=8"]))
    assert {(c.kwargs["BM"], c.kwargs["BN"]) for c in extra if (c.num_warps, c.num_stages) == (4, 4)} == {
        (bm, bn) for bm in (32, 64, 128) for bn in (16, 32, 64)
    }
    assert all(set(c.kwargs) == {"BM", "BN"} for c in extra)
    with pytest.raises(SystemExit, match="KEY=V"):
        sweep.parse_values(["BN"])

    @triton.heuristics({"EVEN": lambda args: args["n"] % 2 == 0})
    @triton.autotune(configs=library[:2], key=["n"])
    @triton.jit
    def wrapped(x_ptr, n, BM: tl.constexpr, BN: tl.constexpr, EVEN: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BM), tl.zeros([BM], dtype=tl.float32))

    module = type(sys)("kernels")
    module.wrapped, module.other = wrapped, 3
    found = sweep.autotuners([module])
    assert list(found) == ["wrapped"] and found["wrapped"].configs == library[:2]


def test_blocks_ab_times_the_two_graphs_in_alternation_and_summarises_rounds():
    blocks = load_script("blocks")
    calls = []
    fake_ms = iter([1.0, 1.10, 1.02, 1.05, 0.98, 1.00])

    def time_one(fn):
        calls.append(fn)
        return next(fake_ms)

    times = blocks.interleaved(["A", "B"], rounds=3, time_one=time_one)
    assert calls == ["A", "B", "A", "B", "A", "B"]
    a, b, ratio, low, high = blocks.ab_summary(times)
    assert (a, b) == (1.0, 1.05) and abs(ratio - 1.05) < 1e-12
    assert abs(low - 1.0 / 0.98) < 1e-12 and abs(high - 1.10) < 1e-12


def test_conv_sweep_reads_the_configs_conv_shape():
    conv_sweep = load_script("conv_sweep")
    assert conv_sweep.conv_shape("hybrid-374m", 8192, 2) == (2, 8192, 2304, 4)  # x, B and C through one conv
    assert all(len(config) == 4 for config in conv_sweep.FIRST_PASS)
