"""The pending choices read from benchmark rows: each rule on rows made for it (faster, slower, mixed, missing)."""

import pytest

from benchmarks import choices, report


def row(op: str, impl: str, shape, ms: float) -> dict:
    return {"op": op, "impl": impl, "shape": shape, "dtype": "bf16", "ms": ms}


def linear_rows(w12: tuple[float, float], w3: tuple[float, float], tokens: int = 2048) -> list[dict]:
    """(unpadded, padded) ms of the Sphere-L MLP's two GEMMs at ``tokens``."""
    return [row("linear_L_w12", "torch", [tokens, 1024, 5460], w12[0]),
            row("linear_L_w12_pad64", "torch", [tokens, 1024, 5504], w12[1]),
            row("linear_L_w3", "torch", [tokens, 2730, 1024], w3[0]),
            row("linear_L_w3_pad64", "torch", [tokens, 2752, 1024], w3[1])]


@pytest.mark.parametrize("times, verdict", [
    (((1.0, 0.5), (1.0, 0.6)), "keep 64"),
    (((1.0, 1.5), (1.0, 1.1)), "set 1"),
    (((1.0, 0.5), (1.0, 1.1)), "mixed"),
    (((1.0, 1.0), (1.0, 1.0)), "set 1"),  # a tie is no win for the candidate
])
def test_mlp_align(times, verdict) -> None:
    choice = choices.mlp_align(linear_rows(*times) + [row("linear_L_qkv", "torch", [2048, 1024, 3072], 9.0)])
    assert choice.now == "64" and choice.suggests.startswith(verdict)
    (plain, padded), _ = times
    assert f"w12 M2048: {plain:.3f} -> {padded:.3f} ms padded" in choice.measured


def test_mlp_align_reports_the_setting_in_force(monkeypatch) -> None:
    from sphere_fast.nn import layers

    monkeypatch.setattr(layers, "MLP_ALIGN", 1)
    assert choices.mlp_align(linear_rows((1.0, 0.5), (1.0, 0.6))).now == "1"


def test_mlp_align_pairs_rows_by_token_count() -> None:
    rows = linear_rows((1.0, 0.9), (1.0, 0.9), tokens=2048) + linear_rows((5.0, 6.0), (5.0, 6.0), tokens=131072)
    choice = choices.mlp_align(rows)
    assert choice.suggests.startswith("mixed") and "w3 M131072: 5.000 -> 6.000 ms padded" in choice.measured


def mlp_up_rows(cublas: float, fused: float) -> list[dict]:
    return [row(f"mlp_up_{m}", impl, [131072, 1024, 2730], ms) for m in ("L", "XL")
            for impl, ms in (("cublas_swiglu", cublas), ("triton", fused), ("eager", 99.0))]


@pytest.mark.parametrize("kernel, sampler, verdict", [
    ((2.0, 1.5), (100.0, 90.0), "turn on"),
    ((2.0, 2.5), (100.0, 110.0), "keep off"),
    ((2.0, 1.5), (100.0, 110.0), "mixed"),
])
def test_fused_mlp(kernel, sampler, verdict) -> None:
    rows = mlp_up_rows(*kernel) + [
        row("sample sphere-l-imagenet", "graph", "b64 t4 cfg1.4 combo", sampler[0]),
        row("sample sphere-l-imagenet", "graph_fused_mlp", "b64 t4 cfg1.4 combo", sampler[1]),
        row("sample sphere-l-imagenet", "graph", "b8 t4 cfg1.4 combo", 1.0),  # not a headline case: left out
        row("sample sphere-l-imagenet", "graph_fused_mlp", "b8 t4 cfg1.4 combo", 0.5),
    ]
    choice = choices.fused_mlp(rows)
    assert choice.now == "off" and choice.suggests.startswith(verdict)
    assert f"sampler b64 t4 cfg1.4 combo: {sampler[0]:.3f} -> {sampler[1]:.3f} ms fused" in choice.measured
    assert choice.measured.count("mlp_up") == 2 and "b8" not in choice.measured


def test_fused_mlp_reads_both_sampler_headlines_and_the_switch(monkeypatch) -> None:
    rows = [row("sample sphere-l-imagenet", impl, case, ms) for case in choices.SAMPLER_CASES
            for impl, ms in (("graph", 10.0), ("graph_fused_mlp", 9.0))]
    monkeypatch.setenv("SPHERE_FAST_FUSED_MLP", "1")
    choice = choices.fused_mlp(rows)
    assert choice.now == "on" and choice.suggests.startswith("turn on")
    assert "sampler b1 t4 cfg1.4 combo: 10.000" in choice.measured
    assert "sampler b64 t4 cfg1.4 combo: 10.000" in choice.measured


def test_attention_impl_takes_the_fastest_usable_impl() -> None:
    d64, d72 = choices.ATTENTION_SHAPES
    rows = [row("attention_fwd", impl, d64, ms) for impl, ms in
            (("triton", 1.0), ("sdpa_flash", 1.3), ("eager", 0.1), ("compile", 0.2))]  # the references do not count
    rows += [row("attention_fwd", impl, d72, ms) for impl, ms in (("triton", 2.0), ("sdpa_cudnn", 1.0))]
    rows += [row("attention_fwd", "sdpa_flash", [1, 16, 1024, 64], 0.01)]  # another batch
    first, second = choices.attention_impl(rows)
    assert first.suggests == "keep triton: the fastest" and first.measured.startswith("triton 1.000 ms")
    assert (second.now, second.suggests) == ("sdpa", "keep sdpa: sdpa_cudnn is 2.00x faster than triton")
    flipped = [row("attention_fwd", impl, d64, ms) for impl, ms in (("triton", 1.0), ("sdpa_cudnn", 0.5))]
    flipped += [row("attention_fwd", impl, d72, ms) for impl, ms in (("triton", 0.5), ("sdpa_cudnn", 1.0))]
    first, second = choices.attention_impl(flipped)
    assert (first.now, first.suggests) == ("triton", "take sdpa_cudnn: 2.00x faster than triton")
    assert (second.now, second.suggests) == ("sdpa", "take triton: the fastest")
    close = [row("attention_fwd", "triton", d64, 1.06), row("attention_fwd", "sdpa_cudnn", d64, 1.0)]
    assert choices.attention_impl(close)[0].suggests == (
        "keep triton: sdpa_cudnn is only 1.06x faster than triton (under the 1.10x margin)")


def test_attention_impl_counts_flash_attn() -> None:
    """Rows listed fastest first, whatever their order in the file; at D = 72 (``sdpa`` today) a faster
    non-SDPA kernel is taken even within the margin, which only guards a switch away from triton."""
    d64, d72 = choices.ATTENTION_SHAPES
    rows = [row("attention_fwd", impl, shape, ms) for shape in (d64, d72)
            for impl, ms in (("sdpa_flash", 1.08), ("triton", 1.05), ("flash_attn", 1.0))]
    first, second = choices.attention_impl(rows)
    assert first.measured == "flash_attn 1.000 ms; triton 1.050 ms; sdpa_flash 1.080 ms"
    assert first.suggests == "keep triton: flash_attn is only 1.05x faster than triton (under the 1.10x margin)"
    assert (second.now, second.suggests) == ("sdpa", "take flash_attn: 1.05x faster than triton")


def test_attention_impl_switches_at_the_margin_itself() -> None:
    d64 = choices.ATTENTION_SHAPES[0]
    rows = [row("attention_fwd", "triton", d64, 1.1), row("attention_fwd", "sdpa_cudnn", d64, 1.0)]
    assert choices.attention_impl(rows)[0].suggests == "take sdpa_cudnn: 1.10x faster than triton"


def test_the_table_lists_setting_now_measured_suggests() -> None:
    lines = choices.table(linear_rows((1.0, 0.5), (1.0, 0.6))).splitlines()
    assert lines[0] == "| setting | now | measured | suggests |"
    assert lines[2].startswith("| nn.layers.MLP_ALIGN | 64 | w12 M2048: 1.000 -> 0.500 ms padded; ")
    assert lines[2].endswith(" | keep 64: padded is faster in every case |")


def test_nothing_measured_and_the_report_section() -> None:
    assert all(c.measured == c.suggests == "not measured" for c in choices.choices([]))
    assert [c.setting.split(" (")[0] for c in choices.choices([])] == [
        "nn.layers.MLP_ALIGN", "SPHERE_FAST_FUSED_MLP", "attention auto impl, D = 64", "attention auto impl, D = 72"]
    no_triton = [row("attention_fwd", "sdpa_cudnn", choices.ATTENTION_SHAPES[0], 1.0)]  # nothing to compare with
    assert choices.attention_impl(no_triton)[0].suggests == "not measured"
    data = {"benchmarks": [{"extra_info": r} for r in linear_rows((1.0, 0.5), (1.0, 0.6))]}
    rendered = report.render(data)
    assert "### Pending choices" in rendered and "| nn.layers.MLP_ALIGN | 64 |" in rendered
    assert rendered.index("### Goals") < rendered.index("### Pending choices") < rendered.index("### All cases")


def test_a_setting_left_unmeasured_takes_the_newest_earlier_reading() -> None:
    """As the goals: a setting the newest rows do not measure shows the newest earlier lease's numbers and advice,
    labelled; one they measure keeps theirs."""
    newest = linear_rows((1.0, 0.5), (1.0, 0.6))
    older = [*linear_rows((1.0, 2.0), (1.0, 2.0)), row("attention_fwd", "triton", choices.ATTENTION_SHAPES[0], 1.0),
             row("attention_fwd", "sdpa_cudnn", choices.ATTENTION_SHAPES[0], 0.5)]
    judged = {c.setting: c for c in choices.with_earlier(newest, [("on 2026-11-29 at 70525a2", older)])}
    assert judged["nn.layers.MLP_ALIGN"].suggests.startswith("keep 64")  # the newest rows', not the earlier "set 1"
    d64 = judged["attention auto impl, D = 64"]
    assert d64.measured == "sdpa_cudnn 0.500 ms; triton 1.000 ms (on 2026-11-29 at 70525a2)"
    assert d64.suggests.startswith("take sdpa_cudnn")
    assert judged["attention auto impl, D = 72"].measured == "not measured"
    assert choices.with_earlier(newest, []) == choices.choices(newest)


def with_quartiles(rows: list[dict], spread: float) -> list[dict]:
    """``rows`` with quartiles ``spread`` either side of each median, as harness.record keeps them."""
    return [{**r, "ms_q1": r["ms"] - spread, "ms_q3": r["ms"] + spread, "n_samples": 20} for r in rows]


def test_a_pair_within_noise_decides_nothing() -> None:
    """A candidate wins or loses a pair only where the two rows' quartile ranges do not overlap: overlapping pairs
    are named, left out of the count, and where every pair overlaps today's setting stays."""
    # w12: padded 0.5 ms against 1.0 (clear); w3: padded 1.02 against 1.0, both ±0.05 (overlapping)
    choice = choices.mlp_align(with_quartiles(linear_rows((1.0, 0.5), (1.0, 1.02)), 0.05))
    assert choice.suggests == "keep 64: padded is faster in every case; 1 of 2 pairs within noise, not counted"
    assert "w12 M2048: 1.000 -> 0.500 ms padded; w3 M2048: 1.000 -> 1.020 ms padded (within noise)" == choice.measured
    tied = choices.mlp_align(with_quartiles(linear_rows((1.0, 0.98), (1.0, 1.02)), 0.05))
    assert tied.suggests == "keep 64: every pair within noise"
    kernel = mlp_up_rows(2.0, 1.9)  # fused 5% faster by the medians, within ±0.1 ms
    assert choices.fused_mlp(with_quartiles(kernel, 0.1)).suggests == "keep off: every pair within noise"
    assert choices.fused_mlp(with_quartiles(kernel, 0.01)).suggests.startswith("turn on")


def test_a_row_without_quartiles_is_paired_by_its_range_against_the_others() -> None:
    """One row with quartiles, its pair without (an older file merged in): the median stands for the other's range."""
    plain, padded = linear_rows((1.0, 0.97), (1.0, 0.97))[:2]
    assert choices._within_noise(plain, with_quartiles([padded], 0.05)[0])
    assert not choices._within_noise(plain, with_quartiles([padded], 0.01)[0])
    assert not choices._within_noise(plain, padded)  # no quartiles on either: the medians decide, as before
    rows = linear_rows((1.0, 0.97), (1.0, 0.97))
    mixed = [r if r["op"].endswith("_pad64") else with_quartiles([r], 0.05)[0] for r in rows]
    assert choices.mlp_align(mixed).suggests == "keep 64: every pair within noise"
