"""The benchmark harness (``bench``): its CPU smoke run, its data, its truth and its parts.

The GPU numbers themselves come from ``python -m bench`` on a GPU; here the same code runs
on the CPU at tiny sizes, and each piece is checked against an independent computation.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import cli, methods, problems, report
from bench.kernels import Refused, guarded
from bench.measure import measure
from bench.problems import IGNORE_INDEX, Shape, make_problem, parse_shape
from bench.records import SCHEMA, json_safe
from bench.time_breakdown import kernel_kind, time_breakdown
from bench.truth import float32_truth, relative_error
from problems import DEVICE
from reference.linear_cross_entropy import linear_cross_entropy

ROOT = Path(__file__).resolve().parent.parent
STATUSES = {"ok", "unavailable", "skipped", "refused", "oom", "error"}


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """One ``python -m bench --smoke`` run in a subprocess, as CI and users call it."""
    out = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_smoke_writes_one_finished_file_per_part(smoke_dir):
    files = sorted(smoke_dir.glob("*.json"))
    assert sorted(f.name.split("_")[0] for f in files) == sorted(cli.PARTS)
    for f in files:
        doc = json.loads(f.read_text())  # strict JSON: no NaN
        assert doc["schema"] == SCHEMA and doc["finished"] is True
        assert doc["machine"]["device"] == "cpu"
        assert doc["versions"]["torch"] == torch.__version__
        assert doc["provenance"].startswith("python -m bench --smoke")
        assert doc["records"], f.name
        assert {r["status"] for r in doc["records"]} <= STATUSES
        assert {r["part"] for r in doc["records"]} == {doc["part"]}


def test_smoke_kernel_records(smoke_dir):
    records = report.load_results(smoke_dir)
    kernel = [r for r in records if r["bench"] == "kernel" and r["part"] == "shapes"]
    for shape in ("48x32x80", "40x16x100"):
        for data in ("uniform", "peaked"):
            got = {r["method"]: r for r in kernel if r["shape"] == shape and r["data"] == data}
            assert got["cublas_3mm_bound"]["status"] == "ok" and got["cublas_3mm_bound"]["ms"] > 0
            for name in ("torch_eager", "reference_chunked"):
                r = got[name]
                assert r["status"] == "ok", r
                assert r["ms"] > 0 and r["vs_bound"] == pytest.approx(r["ms"] / got["cublas_3mm_bound"]["ms"], rel=1e-2)
                assert r["peak_mib"] is None  # no allocator statistics on the CPU
                # bf16 against the float32 truth: about 2**-8 relative, never worse than 3%.
                assert 0 < r["gh_rel"] < 0.03 and 0 < r["gw_rel"] < 0.03
                assert abs(r["loss"] - got["float32_truth"]["loss"]) < 0.05
            fused = {m: r for m, r in got.items() if m.startswith("fused@")}
            assert set(fused) == {"fused@2KiB", "fused@liger", "fused@8KiB", "fused@default"}
            # No peer runs in the smoke run, so the Liger-sized budget has nothing to copy.
            assert fused["fused@liger"]["status"] == "unavailable"
            assert {r["status"] for r in fused.values()} <= {"ok", "unavailable"}
    assert not any(r.get("method") in ("liger_flce", "cce", "torch_compile") for r in records)


def test_smoke_sweeps_reuse_measured_shapes(smoke_dir):
    records = report.load_results(smoke_dir)
    tokens = {(r["shape"], r["method"]): r for r in records if r["part"] == "tokens"}
    assert {s for s, _ in tokens} == {"16x32x80", "48x32x80", "96x32x80"}
    assert tokens[("48x32x80", "torch_eager")]["reused_from"] == "shapes"
    assert "reused_from" not in tokens[("16x32x80", "torch_eager")]
    vocabs = {r["shape"] for r in records if r["part"] == "vocabs"}
    assert vocabs == {"48x32x64", "48x32x80", "48x32x200"}
    assert {r["data"] for r in records if r["part"] in ("tokens", "vocabs")} == {"peaked"}


def test_smoke_e2e_records(smoke_dir):
    e2e = {r["variant"]: r for r in report.load_results(smoke_dir) if r["bench"] == "e2e"}
    assert set(e2e) == {"stock", "body_only", "fused"}
    stock = e2e["stock"]
    assert stock["status"] == "ok" and stock["ms"] > 0
    # A random model predicts nearly uniformly over its 160 tokens.
    assert abs(stock["loss"] - math.log(160)) < 0.5
    # The floor: the decoder alone, its loss a mean of the last hidden states (RMS-normed: small).
    body = e2e["body_only"]
    assert body["status"] == "ok" and body["ms"] > 0 and abs(body["loss"]) < 1
    fused = e2e["fused"]
    if fused["status"] == "ok":
        assert fused["loss"] == pytest.approx(stock["loss"], abs=2e-2)
        assert "patched" in fused["note"]
    else:
        assert fused["status"] == "unavailable"


def test_smoke_profile_records(smoke_dir):
    records = [r for r in report.load_results(smoke_dir) if r["part"] == "profile"]
    assert {r["bench"] for r in records} == {"profile"}
    assert {(r["shape"], r["data"]) for r in records} == {("48x32x80", "peaked"), ("40x16x100", "peaked")}
    assert not any("reused_from" in r for r in records)  # the shapes part's records lack the profile
    for shape in ("48x32x80", "40x16x100"):
        got = {r["method"]: r for r in records if r["shape"] == shape}
        for name in ("torch_eager", "reference_chunked", "fused@default"):
            r = got[name]
            assert r["status"] == "ok", r
            assert r["bound_ms"] == got["cublas_3mm_bound"]["ms"]
            # On the CPU fused runs the chunked reference: no row kernel; each path makes at
            # least the three products (the chunked ones one per chunk and product).
            assert r["gemm_kernels"] >= 3 and r["gemm_ms"] > 0
            assert r["row_kernels"] == 0 and r["row_kernel_ms"] == 0
            assert r["other_kernels"] > 0


@pytest.mark.parametrize(
    "name, kind",
    [
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__5x_cublas", "gemm"),
        ("cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", "gemm"),
        ("aten::addmm", "gemm"),
        ("aten::mm", "gemm"),
        ("logit_statistics_and_gradient_kernel", "row_kernel"),
        ("logit_statistics_kernel", "row_kernel"),
        ("logit_gradient_kernel", "row_kernel"),
        ("scale_unless_one_kernel", "other"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)", "other"),
        ("aten::mm_backward_helper", "other"),
        ("aten::add_", "other"),
        ("liger_cross_entropy_kernel", "other"),
    ],
)
def test_kernel_kind(name, kind):
    assert kernel_kind(name) == kind


def test_time_breakdown_counts_each_cpu_operator_once():
    a, b = torch.randn(64, 32), torch.randn(32, 16)

    def run():
        # matmul calls mm inside it, and addmm's bias add is part of addmm: one product each.
        c = torch.matmul(a, b)
        torch.addmm(c, a, b)
        c.add_(1).relu_()

    cleared = []
    out = time_breakdown(run, lambda: cleared.append(True), torch.device("cpu"))
    assert cleared == [True]
    assert (out["gemm_kernels"], out["row_kernels"], out["other_kernels"]) == (2, 0, 2)
    assert out["gemm_ms"] > 0 and out["other_ms"] > 0 and out["row_kernel_ms"] == 0


def test_time_budget_skips_the_rest(tmp_path):
    assert cli.main(["--smoke", "--out", str(tmp_path), "--parts", "shapes", "--time-budget-s", "1e-9"]) == 0
    (doc,) = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    records = doc["records"]
    assert records and {r["status"] for r in records} == {"skipped"}
    assert {r["method"] for r in records} == {"float32_truth", "cublas_3mm_bound", "torch_eager", "reference_chunked", "fused"}


@pytest.mark.parametrize(
    "argv",
    [["--methods", "torch_eager,nope"], ["--shapes", "8x8"], ["--budgets", "32MB"], ["--parts", "all"], ["--chunk-sizes", "0"],
     ["--chunk-sizes", "64x0"], ["--profile-data", "flat"]],
)
def test_bad_arguments_are_refused(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_gpu_defaults_and_cuda_check(tmp_path):
    args = cli.parse_args(["--out", str(tmp_path)])
    assert [str(s) for s in args.shapes] == ["8192x2048x128256", "8192x2304x256000", "16384x4096x151936", "4096x4096x32000"]
    assert [s.tokens for s in args.token_sweep] == [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    assert {(s.hidden, s.vocab) for s in args.token_sweep} == {(2048, 128256)}
    assert [s.vocab for s in args.vocab_sweep] == [32000, 49152, 128256, 151936, 262144]
    assert args.budgets == [30 << 20, "liger", 256 << 20, 512 << 20, 1 << 30, "default"]
    assert args.methods == list(methods.METHOD_NAMES) and args.models == ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"]
    if not torch.cuda.is_available():
        assert cli.main(["--out", str(tmp_path), "--parts", "shapes"]) == 2


def test_parse_shape_and_budget():
    assert parse_shape("8192x2048x128256") == Shape(8192, 2048, 128256)
    for bad in ("8192x2048", "8x-1x3", "0x2x3", "axbxc"):
        with pytest.raises(ValueError):
            parse_shape(bad)
    assert methods.parse_budget("32MiB") == 32 * 2**20
    assert methods.parse_budget("1gib") == 2**30 and methods.parse_budget("4096") == 4096
    assert methods.parse_budget("Liger") == "liger" and methods.parse_budget("default") == "default"
    for bad in ("32MB", "0MiB", "-1", "", "lots"):
        with pytest.raises(ValueError):
            methods.parse_budget(bad)


def test_parse_chunk_setting():
    assert methods.parse_chunk_setting("1024") == 1024
    assert methods.parse_chunk_setting("1024x16384") == (1024, 16384)
    for bad in ("0", "1024x", "x5", "1x2x3", "-4", "big"):
        with pytest.raises(ValueError):
            methods.parse_chunk_setting(bad)


def test_fused_settings_call_the_kernel_with_their_knobs(monkeypatch):
    calls = []

    def kernel(h, w, y, *, chunk_size=None, vocab_chunk_size=None, memory_budget=None):
        calls.append((chunk_size, vocab_chunk_size, memory_budget))

    monkeypatch.setitem(sys.modules, "fused", types.SimpleNamespace(linear_cross_entropy=kernel))
    entries = methods.fused_methods([4096, "liger", "default"], [7, (8, 16)], liger_extra_bytes=None)
    assert [m.name for m in entries] == ["fused@4KiB", "fused@liger", "fused@default", "fused@chunk=7", "fused@chunk=8x16"]
    assert entries[1].fn is None and "Liger" in entries[1].unavailable
    for m in (entries[0], *entries[2:]):
        m.fn(None, None, None)
    # A budget goes to the kernel's memory_budget; an explicit chunk size leaves the rest to the kernel.
    assert calls == [(None, None, 4096), (None, None, None), (7, None, None), (8, 16, None)]
    assert entries[0].params == {"memory_budget": 4096}
    (liger,) = methods.fused_methods(["liger"], [], liger_extra_bytes=1000)
    assert liger.params == {"memory_budget": 1000}


def test_fused_unavailable_when_the_module_lacks_the_kernel(monkeypatch):
    monkeypatch.setitem(sys.modules, "fused", types.SimpleNamespace())
    entries = methods.fused_methods([32 << 20], [5], liger_extra_bytes=None)
    assert [(m.name, m.fn) for m in entries] == [("fused@32MiB", None), ("fused@chunk=5", None)]
    assert all("linear_cross_entropy" in m.unavailable for m in entries)


def test_missing_peer_is_unavailable_not_an_exception(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    built = {m.name: m for m in methods.build_methods(["liger_flce", "cce", "cce_exact", "torch_eager"])}
    assert list(built) == ["torch_eager", "liger_flce", "cce", "cce_exact"]
    assert built["torch_eager"].fn is methods.eager_loss
    assert built["liger_flce"].fn is None and "liger_kernel" in built["liger_flce"].unavailable
    assert all(built[n].fn is None and "cut_cross_entropy" in built[n].unavailable for n in ("cce", "cce_exact"))
    with pytest.raises(ValueError, match="unknown methods"):
        methods.build_methods(["nope"])


def test_eager_loss_is_the_transformers_path():
    torch.manual_seed(0)
    h, w = torch.randn(6, 4, dtype=torch.bfloat16), torch.randn(9, 4, dtype=torch.bfloat16)
    y = torch.tensor([1, 2, IGNORE_INDEX, 8, 0, 3])
    expected = F.cross_entropy((h @ w.t()).float(), y, ignore_index=IGNORE_INDEX)
    assert torch.equal(methods.eager_loss(h, w, y), expected)


def test_problems_follow_the_shared_recipe():
    shape = Shape(512, 64, 1000)
    uniform = make_problem(shape, "uniform", device="cpu", dtype=torch.float32)
    # The recipe of ../shared/bench/README.md, drawn independently in the same order.
    torch.manual_seed(0)
    h = torch.randn(512, 64)
    w = torch.randn(1000, 64) * (0.5 * 64**-0.5)
    y = torch.randint(0, 1000, (512,))
    y[torch.rand(512) < 0.1] = IGNORE_INDEX
    assert torch.equal(uniform.hidden, h) and torch.equal(uniform.weight, w) and torch.equal(uniform.labels, y)
    assert uniform.hidden.requires_grad and uniform.weight.requires_grad

    peaked = make_problem(shape, "peaked", device="cpu", dtype=torch.float32)
    assert torch.equal(peaked.hidden, h)  # same hidden; weight 8x larger
    assert torch.allclose(peaked.weight, w * 8)
    valid = peaked.labels != IGNORE_INDEX
    assert 0.05 < 1 - valid.float().mean().item() < 0.15
    assert peaked.labels[valid].min() >= 0 and peaked.labels[valid].max() < 1000

    def loss(p):
        return F.cross_entropy(p.hidden @ p.weight.t(), p.labels, ignore_index=IGNORE_INDEX).item()

    # Uniform data sits at about log V; labels drawn from a peaked softmax cost far less.
    assert abs(loss(uniform) - math.log(1000)) < 0.3
    assert loss(peaked) < math.log(1000) - 2
    with pytest.raises(ValueError, match="data must be"):
        make_problem(shape, "normal", device="cpu", dtype=torch.float32)


def test_gradient_bytes_and_flops():
    shape = Shape(8192, 2048, 128256)
    assert shape.gradient_bytes(torch.bfloat16) / 2**20 == 533.0  # the README's 533 MiB
    assert shape.matmul_flops == 6 * 8192 * 2048 * 128256


def test_float32_truth_in_blocks_equals_the_reference_at_once():
    problem = make_problem(Shape(37, 8, 50), "peaked", device="cpu", dtype=torch.bfloat16)
    # 1000 bytes: 5 rows of 50 float32 logits per block, so 8 blocks, the last of 2 rows.
    truth = float32_truth(problem, block_logit_bytes=1000)
    h = problem.hidden.detach().float().requires_grad_()
    w = problem.weight.detach().float().requires_grad_()
    loss = linear_cross_entropy(h, w, problem.labels)
    loss.backward()
    torch.testing.assert_close(truth.loss, loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(truth.grad_hidden, h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(truth.grad_weight, w.grad, rtol=1e-5, atol=1e-7)
    assert relative_error(h.grad, truth.grad_hidden) < 1e-5
    assert relative_error(2 * truth.grad_hidden, truth.grad_hidden) == pytest.approx(1.0)


def test_measure_counts_runs_and_clears_before_each():
    log = []
    t = measure(lambda: log.append("run") or len(log), lambda: log.append("clear"), torch.device("cpu"), reps=3, warmup=2)
    assert log == ["clear", "run"] * 5
    assert t.last == 10 and t.peak_bytes is None and t.ms >= 0
    with pytest.raises(ValueError):
        measure(lambda: None, lambda: None, torch.device("cpu"), reps=0, warmup=1)


def test_guarded_turns_failures_into_statuses():
    cpu = torch.device("cpu")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB\nmore")

    def broken():
        raise RuntimeError("bad kernel")

    def refused():
        raise Refused("model: not patched (softcap)")

    assert guarded({"method": "a"}, lambda: {"ms": 1.0}, cpu) == {"method": "a", "status": "ok", "ms": 1.0}
    assert guarded({}, oom, cpu) == {"status": "oom", "reason": "CUDA out of memory. Tried to allocate 9 GiB"}
    assert guarded({}, broken, cpu) == {"status": "error", "reason": "RuntimeError: bad kernel"}
    assert guarded({}, refused, cpu) == {"status": "refused", "reason": "model: not patched (softcap)"}


def test_json_safe_writes_non_finite_numbers_as_strings():
    assert json_safe({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}}) == {
        "a": "nan", "b": ["inf", 1.5], "c": {"d": "-inf"}
    }


def test_pareto_front_and_curve():
    points = [(10, 3.0), (100, 1.5), (50, 2.0), (1000, 1.0), (60, 2.5), (10, 3.5)]
    assert report.pareto_front(points) == [0, 2, 1, 3]
    curve = [(32, 2.0), (512, 1.1)]
    assert report.beats_curve((100, 1.05), curve)  # lighter and faster than the 512 MiB point
    assert not report.beats_curve((2, 3.7), curve)  # lighter but slower
    assert not report.beats_curve((600, 1.0), curve)  # faster but heavier


def _kernel(shape, method, vs_bound, extra_mib, gh_rel, created="2026-12-01"):
    return {"bench": "kernel", "part": "shapes", "status": "ok", "shape": shape, "data": "peaked", "method": method,
            "vs_bound": vs_bound, "extra_mib": extra_mib, "gh_rel": gh_rel, "created": created}


def test_target_rows():
    s = "8x4x16"
    records = [
        _kernel(s, "torch_eager", 1.8, 5000, 0.0075),
        _kernel(s, "cce", 3.7, 2, 0.014),
        _kernel(s, "liger_flce", 1.9, 60, 0.0075),
        _kernel(s, "torch_compile", 1.05, 2000, 0.0075),
        _kernel(s, "fused@30MiB", 3.0, 31, 0.0070),
        _kernel(s, "fused@liger", 1.5, 70, 0.0070),  # more memory than Liger's 60 MiB
        _kernel(s, "fused@512MiB", 1.2, 500, 0.0070),  # slower than 1.15x
        _kernel(s, "fused@512MiB", 1.1, 500, 0.0080, created="2026-11-01"),  # older: ignored
    ]
    records.sort(key=lambda r: r["created"])
    rows = {r["setting"]: r for r in report.target_rows(records)}
    assert rows["fused@30MiB"]["holds"] is True and rows["fused@30MiB"]["max_x"] == 3.7
    assert rows["fused@30MiB"]["max_mib"] == 32.0
    assert rows["fused@liger"]["holds"] is False and rows["fused@liger"]["max_mib"] == 60
    assert rows["fused@512MiB"]["holds"] is False and rows["fused@512MiB"]["x"] == 1.2
    # torch.compile (1.05x, 2000 MiB) beats no kernel point: every one is lighter.
    assert rows["pareto: peers faster+lighter"] == {
        "shape": s, "setting": "pareto: peers faster+lighter", "x": "none", "holds": True
    }
    no_kernel = [r for r in records if not r["method"].startswith("fused")]
    assert all(r["holds"] is None for r in report.target_rows(no_kernel))


def test_committed_results_load_and_keep_the_anchor_figures():
    records = report.load_results()
    anchor = [r for r in records if r["source"] == "anchor_h100_2026-11-23.json"]
    best = report.newest_ok(anchor, part="shapes", data="peaked")
    liger = best[("16384x4096x151936", "peaked", "liger_flce")]
    assert (liger["vs_bound"], liger["peak_mib"], liger["gh_rel"]) == (1.2, 1464.0, 0.0074)
    assert liger["extra_mib"] == 1464.0 - 1315.0
    assert sum(m in report.PEERS for _, _, m in best) == 4 * 5  # four shapes, five peers
    e2e = report.newest_e2e(anchor)
    assert e2e[("llama-3.2-1b", "liger_flce")]["peak_mib"] == 28441
    assert len(e2e) == 6


def test_plots_draw_every_method_and_the_kernel_curve():
    from bench import plots

    records = []
    for n in (1024, 2048):
        for method, x, extra in (("torch_eager", 1.5, 900.0), ("cce", 3.7, 1.0), ("fused@32MiB", 2.0, 30.0), ("fused@512MiB", 1.1, 500.0)):
            for part in ("shapes", "tokens"):
                records.append({**_kernel(f"{n}x64x1000", method, x, extra, 0.007), "part": part, "tokens": n,
                                "peak_mib": extra + 10, "grad_mib": 10.0})
    records.append({"bench": "e2e", "status": "ok", "model": "m", "variant": "stock", "tokens": 16, "ms": 3.0, "peak_mib": 9.0})
    fig = plots.pareto(records)
    first = fig.axes[0]
    assert first.get_title() == "1024x64x1000"
    # The kernel's two settings joined into one curve, sorted by memory.
    (curve,) = first.get_lines()[:1]
    assert list(curve.get_xdata()) == [30.0, 500.0] and list(curve.get_ydata()) == [2.0, 1.1]
    (only,) = plots.pareto(records, shapes=["2048x64x1000"]).axes
    assert only.get_title() == "2048x64x1000"
    with pytest.raises(ValueError, match="4096x64x1000"):
        plots.pareto(records, shapes=["4096x64x1000"])
    assert len(plots.time_vs_bound(records, "peaked").axes[0].patches) == 4 * 2
    lines = plots.memory_vs_tokens(records).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["torch_eager", "cce", "fused@32MiB", "fused@512MiB", "gradient buffers"]
    assert len(plots.e2e(records).axes) == 2


def test_whole_vocabulary_traffic():
    from bench.traffic import H100_SXM, whole_vocabulary_traffic

    shape = problems.Shape(8192, 2304, 256000)
    t = whole_vocabulary_traffic(shape, rows=1024)
    assert t.chunks == 8 and t.flops == 6 * 8192 * 2304 * 256000
    assert t.weight_bytes == 4 * 7 * 256000 * 2304 * 2  # seven chunks re-read W twice and RMW grad_W
    assert t.tile_bytes == 3 * 8192 * 256000 * 2
    s = t.seconds()
    assert s["tile"] == pytest.approx(12.58e9 / H100_SXM["bytes_per_s"], rel=1e-3)
    # One chunk: no re-reads, only the tile pass.
    assert whole_vocabulary_traffic(shape, rows=8192).weight_bytes == 0
    with pytest.raises(ValueError, match="rows"):
        whole_vocabulary_traffic(shape, rows=0)


def test_exponential_counts():
    from bench.traffic import H100_SXM, prologue_exponentials, row_pass_exponentials

    shape = problems.Shape(8192, 2304, 256000)
    logits = 8192 * 256000
    assert row_pass_exponentials(shape) == 2 * logits
    # 2304 columns in programs of 256: nine programs load each gradient entry, in each product.
    assert prologue_exponentials(shape, 256) == logits * (1 + 2 * 9)
    assert prologue_exponentials(shape, 128) == logits * (1 + 2 * 18)
    assert prologue_exponentials(Shape(4, 300, 10), 256) == 40 * (1 + 2 * 2)  # a partial block counts
    # At the special-function units' peak, 10 ms of exponentials against the 5.2 ms row
    # kernel measured at this shape.
    assert prologue_exponentials(shape, 256) / H100_SXM["exp_per_s"] == pytest.approx(10.2e-3, rel=0.01)
    with pytest.raises(ValueError, match="block_d"):
        prologue_exponentials(shape, 0)


def test_trl_fused_head_is_measured_as_trl_calls_it():
    # TRL's own head (every TRL >= 1.15 trainer runs it) scores only the valid rows; its mean
    # negative log-probability is the loss. On CPU it runs its torch fallback.
    pytest.importorskip("trl", reason="TRL is in the lock (the dev extra); absent only outside make's .venv")
    (trl,) = methods.build_methods(["trl_fused_head"])
    assert trl.fn is not None, trl.unavailable
    problem = make_problem(Shape(37, 16, 100), "peaked", device="cpu", dtype=torch.float32)
    hidden, weight = (t.detach().requires_grad_() for t in (problem.hidden, problem.weight))
    loss = trl.fn(hidden, weight, problem.labels)
    expected = methods.eager_loss(problem.hidden, problem.weight, problem.labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None


def test_precision_variants_run_the_default_plan_with_their_option():
    assert methods.parse_budget("float32_logits") == "float32_logits"
    entries = methods.fused_methods(["float32_logits", "float32_weight_sum"], [], liger_extra_bytes=None)
    assert [e.name for e in entries] == ["fused@float32_logits", "fused@float32_weight_sum"]
    assert entries[0].params == {"logits_dtype": "float32"} and entries[1].params == {"accumulation_dtype": "float32"}
    json.dumps([e.params for e in entries])  # they go into result files
    problem = make_problem(Shape(37, 16, 100), "peaked", device="cpu", dtype=torch.float32)
    for entry in entries:
        torch.testing.assert_close(
            entry.fn(problem.hidden, problem.weight, problem.labels),
            methods.eager_loss(problem.hidden, problem.weight, problem.labels), rtol=1e-5, atol=1e-5,
        )


def test_autocast_runs_every_method_and_the_bound_under_autocast(tmp_path):
    # Mixed precision as Trainer's bf16=True runs it: float32 inputs, bfloat16 products. The
    # records say so, and the fused op's loss equals eager's under the same autocast.
    out = tmp_path / "results"
    subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--parts", "shapes", "--shapes", "40x16x100", "--data", "peaked",
         "--dtype", "float32", "--autocast", "bfloat16", "--methods", "torch_eager,fused", "--budgets", "default",
         "--out", str(out)],
        check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1],
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    (path,) = out.glob("shapes_*.json")
    doc = json.loads(path.read_text())
    assert "--autocast bfloat16" in doc["provenance"]
    records = {r["method"]: r for r in doc["records"]}
    eager, fused_default = records["torch_eager"], records["fused@default"]
    assert eager["status"] == fused_default["status"] == "ok", (eager, fused_default)
    assert fused_default["loss"] == pytest.approx(eager["loss"], rel=1e-5)


def test_epilogue_bench_records_both_kinds_of_plan(tmp_path, capsys):
    # bench.epilogue on the suite's device (the interpreter on CPU), float32: every piece and
    # plan timed, and the epilogue plan's gradients those of the row kernels' plan.
    from bench import epilogue

    epilogue.main(["--device", str(DEVICE), "--dtype", "float32", "--shapes", "64x16x300",
                   "--budget", "1", "--reps", "1", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("epilogue_*.json")
    doc = json.loads(path.read_text())
    assert doc["finished"] and doc["provenance"].startswith("python -m bench.epilogue")
    (entry,) = doc["records"]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["shape"] == entry["shape"] == "64x16x300"
    assert set(entry["pieces"]) == {"cublas_product_ms", "row_kernel_statistics_and_gradient_ms",
                                    "epilogue_statistics_ms", "epilogue_statistics_unstored_ms", "epilogue_gradient_ms"}
    assert all(ms > 0 for ms in entry["pieces"].values())
    assert set(entry["plans"]) == {"default", "1MiB"}
    for plan in entry["plans"].values():
        assert plan["row_kernels"]["ms"] > 0 and plan["epilogue"]["ms"] > 0
        assert max(plan["epilogue"]["grad_rel_diff"]) < 1e-5
