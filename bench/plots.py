"""The figures of notebook 08, drawn from records (``bench.report.load_results``).

Each function takes the flat list of records, picks the newest successful measurement of
each entry, and returns a matplotlib ``Figure`` (not registered with pyplot: it shows where
it is displayed, once). Methods keep one colour in every figure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from matplotlib.figure import Figure

from bench.report import FUSED_PREFIX, PEERS, Record, newest_e2e, newest_ok, pareto_front

_PEER_COLOURS = dict(zip(PEERS, ("#7f7f7f", "#17becf", "#bcbd22", "#8c564b", "#1f77b4", "#ff7f0e", "#e377c2")))
_FUSED_COLOUR = "#d62728"
_VARIANT_COLOURS = {"stock": "#7f7f7f", "body_only": "#c7c7c7", "liger_flce": "#1f77b4", "fused": _FUSED_COLOUR}


def _colour(method: str) -> str:
    return _FUSED_COLOUR if method.startswith(FUSED_PREFIX) else _PEER_COLOURS.get(method, "#000000")


def _shape_key(shape: str) -> list[int]:
    return [int(x) for x in shape.split("x")]


def _methods(keys: Iterable[tuple[str, str, str]]) -> list[str]:
    """Methods present, peers in their fixed order, then the kernel's settings by name."""
    present = {m for _, _, m in keys}
    return [m for m in PEERS if m in present] + sorted(m for m in present if m.startswith(FUSED_PREFIX))


def time_vs_bound(records: Sequence[Record], data: str) -> Figure:
    """Bars: each method's forward+backward time as a multiple of the three-matmul bound,
    per default shape, on ``data``."""
    best = newest_ok(records, part="shapes", data=data)
    best = {k: r for k, r in best.items() if r.get("vs_bound") is not None}
    shapes = sorted({s for s, _, _ in best}, key=_shape_key)
    methods = _methods(best)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        xs = [i + j * width for i, s in enumerate(shapes) if (s, data, method) in best]
        ys = [best[(s, data, method)]["vs_bound"] for s in shapes if (s, data, method) in best]
        bars = ax.bar(xs, ys, width, label=method, color=_colour(method), alpha=1.0 if method in PEERS else 0.6)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
    ax.set_ylabel("time / three-matmul bound")
    ax.set_title(f"forward+backward, {data} data (1 = the cuBLAS bound)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def memory_vs_tokens(records: Sequence[Record], data: str = "peaked") -> Figure:
    """Peak memory (gradients included) against the token count, one line per method, from
    the token sweep; without a sweep, the default shapes (whose D and V differ) stand in, as
    unjoined points."""
    best = newest_ok(records, part="tokens", data=data)
    title, style = "token sweep", "-"
    if not best:
        best = newest_ok(records, part="shapes", data=data)
        title, style = "no token sweep yet: the default shapes, whose D and V differ", "none"
    best = {k: r for k, r in best.items() if r.get("peak_mib") is not None}
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for method in _methods(best):
        points = sorted((r["tokens"], r["peak_mib"]) for (_, _, m), r in best.items() if m == method)
        ax.plot(*zip(*points), marker="o", ls=style, label=method, color=_colour(method), alpha=1.0 if method in PEERS else 0.6)
    grads = sorted({(r["tokens"], r["grad_mib"]) for r in best.values()})
    if grads:
        ax.plot(*zip(*grads), marker="x", ls="--" if style == "-" else "none", color="black", label="gradient buffers")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("peak MiB above the inputs")
    ax.set_title(f"memory against tokens, {data} data\n({title})", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def pareto(records: Sequence[Record], data: str = "peaked", shapes: Sequence[str] | None = None) -> Figure:
    """Per default shape (``shapes``: those only, in that order): time (multiple of the
    bound) against extra memory above the gradient buffers, every method one point, the
    kernel's settings joined into its curve, the Pareto front circled."""
    best = newest_ok(records, part="shapes", data=data)
    best = {k: r for k, r in best.items() if r.get("vs_bound") is not None and r.get("extra_mib") is not None}
    present = sorted({s for s, _, _ in best}, key=_shape_key)
    if shapes is None:
        shapes = present
    elif missing := [s for s in shapes if s not in present]:
        raise ValueError(f"no {data} records of shapes {missing}; measured: {present}")
    cols = 2 if len(shapes) > 1 else 1
    rows = max(1, -(-len(shapes) // cols))
    fig = Figure(figsize=(11, 4 * rows) if cols == 2 else (7.5, 5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        _pareto_panel(ax, [(m, r) for (s, _, m), r in sorted(best.items()) if s == shape])
        ax.set_title(shape, fontsize=9)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    # One legend for every panel: a method keeps its colour throughout.
    labelled = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    fig.legend(labelled.values(), labelled.keys(), loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle(f"time against memory, {data} data: circled = Pareto front")
    return fig


def _pareto_panel(ax, entries: Sequence[tuple[str, Record]]) -> None:
    """One shape's methods as points (time / bound against extra MiB), the kernel's settings
    as one curve, each point named by its setting, the Pareto front circled."""
    # Extra memory can be ~0 (or a little below, from allocator rounding): 1 MiB floor for the log axis.
    points = [(max(r["extra_mib"], 1.0), r["vs_bound"]) for _, r in entries]
    peers = sorted(((m, p) for (m, _), p in zip(entries, points) if not m.startswith(FUSED_PREFIX)),
                   key=lambda mp: PEERS.index(mp[0]) if mp[0] in PEERS else len(PEERS))
    for method, point in peers:
        ax.scatter(*point, color=_colour(method), zorder=3, label=method)
    curve = sorted((p, m) for (m, _), p in zip(entries, points) if m.startswith(FUSED_PREFIX))
    if curve:
        ax.plot(*zip(*(p for p, _ in curve)), "o-", color=_FUSED_COLOUR, lw=1.5, zorder=3,
                label="fused, one point per memory_budget")
        # Settings that give the same plan (within 1% in memory and 2% in time) share one
        # label; labels alternate above and below the curve so that neighbours stay apart.
        groups: list[tuple[tuple[float, float], list[str]]] = []
        for (x, y), method in curve:
            if groups and abs(x / groups[-1][0][0] - 1) < 0.01 and abs(y / groups[-1][0][1] - 1) < 0.02:
                groups[-1][1].append(method.removeprefix(FUSED_PREFIX))
            else:
                groups.append(((x, y), [method.removeprefix(FUSED_PREFIX)]))
        for i, (point, names) in enumerate(groups):
            ax.annotate(", ".join(names), point, fontsize=7, ha="center",
                        xytext=(0, 7 if i % 2 == 0 else -13), textcoords="offset points")
    front = [points[i] for i in pareto_front(points)]
    ax.scatter(*zip(*front), s=160, facecolors="none", edgecolors="black", lw=0.8, zorder=2)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("extra MiB above the gradients (log)")
    ax.set_ylabel("time / bound (1 = three matmuls)")


def e2e(records: Sequence[Record]) -> Figure:
    """Bars: training-step time and peak memory per model, per variant."""
    best = newest_e2e(records)
    models = list(dict.fromkeys(m for m, _ in best))
    variants = [v for v in _VARIANT_COLOURS if any(v == w for _, w in best)]
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2)
    width = 0.8 / max(1, len(variants))
    for j, variant in enumerate(variants):
        xs = [i + j * width for i, m in enumerate(models) if (m, variant) in best]
        rs = [best[(m, variant)] for m in models if (m, variant) in best]
        for ax, field in ((ax_t, "ms"), (ax_m, "peak_mib")):
            bars = ax.bar(xs, [r[field] for r in rs], width, label=variant, color=_VARIANT_COLOURS[variant])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
    for ax, label in ((ax_t, "step time, ms"), (ax_m, "peak MiB above the weights")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    tokens = sorted({r["tokens"] for r in best.values()})
    fig.suptitle(f"one training step (forward+backward), {', '.join(map(str, tokens))} tokens")
    return fig
