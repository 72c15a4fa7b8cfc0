"""The quality study's markdown tables and plot (``scripts/eval_quality.py``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from quality_common import Budget


def _header(budgets: list[Budget]) -> str:
    cols = []
    for b in budgets:
        if b.full:
            cols.append(f"full (C={b.cache_size})")
        elif b.label.isdigit():
            cols.append(f"C={b.cache_size}")
        else:
            cols.append(f"C={b.cache_size} ({b.label})")
    return "| policy | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"


def _eviction_note(chunk: int) -> str:
    if chunk == 1:
        return "Every layer evicts down to C after every token."
    return (f"Every layer evicts down to C every {chunk} tokens (chunked prompt mode), so "
            f"it holds between C and C + {chunk - 1} tokens.")


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def markdown_tables(results: dict) -> str:
    parts = []
    ppl = results.get("perplexity")
    if ppl:
        length = results["settings"]["length"]
        budgets = [Budget(**b) for b in ppl["budgets"]]
        for backend, table in ppl["tables"].items():
            parts.append(f"### Perplexity ({backend}; {ppl['windows']} x {length} tokens, "
                         f"{ppl['scored_tokens']} scored)\n\nText: {ppl['text']['source']}. "
                         f"{_eviction_note(results['settings'].get('ppl_chunk', 1))}\n\n")
            parts.append(_header(budgets))
            for name, row in table.items():
                cells = [("n/a" if c["perplexity"] is None else f"{c['perplexity']:.4g}")
                         for c in row.values()]
                parts.append(f"| {name} | " + " | ".join(cells) + " |\n")
            parts.append(f"\nPer-window perplexity, min - max (std) over the "
                         f"{ppl['windows']} windows ({backend}):\n\n")
            parts.append(_header(budgets))
            for name, row in table.items():
                cells = [("n/a" if c["perplexity"] is None else
                          f"{c['window_ppl_min']:.4g} - {c['window_ppl_max']:.4g} "
                          f"({c['window_ppl_std']:.2g})") for c in row.values()]
                parts.append(f"| {name} | " + " | ".join(cells) + " |\n")
            parts.append(f"\nCost against the full cache: perplexity change, overall "
                         f"(min .. max over the windows, each against itself at full "
                         f"cache) ({backend}):\n\n")
            parts.append(_header(budgets))
            for name, row in table.items():
                cells = [("n/a" if c.get("ratio_to_full") is None else
                          f"{_pct(c['ratio_to_full'])} ({_pct(c['window_ratio_min'])} .. "
                          f"{_pct(c['window_ratio_max'])})") for c in row.values()]
                parts.append(f"| {name} | " + " | ".join(cells) + " |\n")
            if ppl["byte_level"]:
                parts.append(f"\nBits per byte ({backend}):\n\n")
                parts.append(_header(budgets))
                for name, row in table.items():
                    cells = [("n/a" if c["perplexity"] is None else f"{c['bits_per_byte']:.4f}")
                             for c in row.values()]
                    parts.append(f"| {name} | " + " | ".join(cells) + " |\n")
            parts.append("\n")
        if "engine_vs_reference" in ppl:
            diff = ppl["engine_vs_reference"]
            parts.append(f"vLLM vs reference: max |per-token NLL difference| = "
                         f"{diff['max_abs_token_nll_diff']:.3g}, max relative perplexity "
                         f"difference = {diff['max_rel_ppl_diff']:.3g}\n\n")
        s = ppl["sanity"]
        parts.append(f"Sanity: full budget vs plain Hugging Face forward on window 0: max "
                     f"|logprob difference| = {s['max_abs_diff']:.3g} (tolerance "
                     f"{s['tolerance']:.3g}).\n\n")
    probe = results.get("retrieval")
    if probe:
        budgets = [Budget(**b) for b in probe["budgets"]]
        what = (f"pass key after 0..{probe['items']} of {probe['items']} filler sentences"
                if probe["format"] == "passkey" else f"{probe['items']} key-value pairs")
        parts.append(f"### Retrieval accuracy ({probe['format']}: {probe['num_probes']} probes "
                     f"of ~{probe['mean_prompt_tokens']:.0f} tokens, {what}, prompt chunk "
                     f"{probe['chunk']}; full cache: {probe['full_accuracy']:.0%})\n\n")
        parts.append(_header(budgets))
        for name, row in probe["table"].items():
            cells = []
            for c in row.values():
                if c["accuracy"] is None:
                    cells.append("n/a")
                else:
                    cells.append(f"{c['accuracy']:.2f} ({sum(c['correct'])}/{len(c['correct'])})")
            parts.append(f"| {name} | " + " | ".join(cells) + " |\n")
        parts.append("\n")
        if probe["full_accuracy"] == 0:
            parts.append("**Warning: the model retrieves nothing even with a full cache; "
                         "the probe measures nothing for this model.**\n\n")
        elif probe["full_accuracy"] < 0.5:
            parts.append(f"**Warning: full-cache accuracy is only "
                         f"{probe['full_accuracy']:.2f}; the probe says little for this "
                         "model.**\n\n")
    return "".join(parts)


def _plot_policies(ax, table: dict, metric: str, xlabel: str, title: str,
                   ylabel: Optional[str] = None,
                   band: Optional[tuple[str, str]] = None) -> list[float]:
    """One line per policy of ``metric`` against the budget fraction (log2 x axis), with
    a shaded ``band`` (two cell keys: low, high) when given; returns the plotted values."""
    values = []
    for name, row in table.items():
        cells = [c for c in row.values() if c.get(metric) is not None]
        xs = [c["fraction"] for c in cells]
        ys = [c[metric] for c in cells]
        values += ys
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        if band is not None:
            low = [c[band[0]] for c in cells]
            high = [c[band[1]] for c in cells]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.12, linewidth=0)
            values += low + high
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return values


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("warning: matplotlib is not installed; no quality.png "
              "(pip install -e '.[eval]')", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.4))
    ppl = results.get("perplexity")
    if ppl:
        backend = "reference" if "reference" in ppl["tables"] else next(iter(ppl["tables"]))
        table = ppl["tables"][backend]
        n, length = ppl["windows"], results["settings"]["length"]
        values = _plot_policies(left, table, "perplexity", "cache budget C / N",
                                f"Perplexity ({backend}, {n} x {length} tokens;\n"
                                "band: per-window min..max)",
                                band=("window_ppl_min", "window_ppl_max"))
        if values and max(values) / min(values) > 20:
            left.set_yscale("log")
        ratios = _plot_policies(middle, table, "ratio_to_full", "cache budget C / N",
                                "Perplexity / full-cache perplexity, paired by window\n"
                                "(band: per-window min..max)",
                                ylabel="perplexity / full-cache perplexity",
                                band=("window_ratio_min", "window_ratio_max"))
        if ratios and max(ratios) > 3:  # a policy that breaks down would flatten the rest
            middle.set_yscale("log")
    else:
        left.set_axis_off()
        middle.set_axis_off()
    probe = results.get("retrieval")
    if probe:
        _plot_policies(right, probe["table"], "accuracy", "cache budget C / probe length",
                       f"Retrieval: {probe['format']} (~{probe['probe_length']} tokens)\n"
                       f"full cache: {probe['full_accuracy']:.0%}",
                       ylabel="exact-match accuracy")
        right.set_ylim(-0.05, 1.05)
    else:
        right.set_axis_off()
    fig.suptitle(Path(results["model"]).name or results["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
