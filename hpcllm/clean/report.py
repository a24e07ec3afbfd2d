"""clean_report.json / clean_report.md / length_histogram.png from the per-task part files."""
from __future__ import annotations

import json
import os

from datatrove.pipeline.base import PipelineStep

from hpcllm.clean.parts import read_parts
from hpcllm.clean.pipeline import RULES, Layout
from hpcllm.clean.records import LENGTH_EDGES


def _lengths(parts_folder: str, which: str) -> dict:
    parts = read_parts(parts_folder, f"lengths_{which}/*.json")
    bins = [sum(p["bins"][i] for p in parts) for i in range(len(LENGTH_EDGES))]
    return {"documents": sum(p["documents"] for p in parts), "characters": sum(p["characters"] for p in parts),
            "bins": bins}


def _rule(parts_folder: str, rule: str, examples: int) -> dict:
    reasons = {}
    for part in read_parts(parts_folder, f"excluded/{rule}/*.json"):
        for reason, entry in part["reasons"].items():
            r = reasons.setdefault(reason, {"documents": 0, "characters": 0, "examples": []})
            r["documents"] += entry["documents"]
            r["characters"] += entry["characters"]
            r["examples"] += entry["examples"][: max(examples - len(r["examples"]), 0)]
    return {"rule": rule, "documents": sum(r["documents"] for r in reasons.values()),
            "characters": sum(r["characters"] for r in reasons.values()), "reasons": reasons}


def build_report(output: str, config: dict, examples: int = 5) -> dict:
    """Merge the parts under OUTPUT/work/parts and write the three report files; returns the JSON."""
    layout = Layout(output)
    before, after = _lengths(layout.parts, "before"), _lengths(layout.parts, "after")
    rules = [r for r in (_rule(layout.parts, rule, examples) for rule in RULES) if r["documents"]]
    masked = {}
    for part in read_parts(layout.parts, "pii/*.json"):
        for kind, n in part["masked"].items():
            masked[kind] = masked.get(kind, 0) + n
    removed_docs = sum(r["documents"] for r in rules)
    report = {
        "input": {"documents": before["documents"], "characters": before["characters"]},
        "output": {"documents": after["documents"], "characters": after["characters"], "data": layout.data},
        "removed": {"documents": removed_docs, "characters": sum(r["characters"] for r in rules),
                    "fraction_documents": removed_docs / before["documents"] if before["documents"] else 0.0},
        "rules": rules,
        "pii_masked": masked,
        "length_histogram": {"edges": LENGTH_EDGES, "before": before["bins"], "after": after["bins"],
                             "png": os.path.join(layout.root, "length_histogram.png")},
        "config": config,
    }
    with open(os.path.join(layout.root, "clean_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    with open(os.path.join(layout.root, "clean_report.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(report))
    plot_histogram(report["length_histogram"], report["length_histogram"]["png"])
    return report


def render_markdown(report: dict) -> str:
    inp, out, rem = report["input"], report["output"], report["removed"]
    lines = [
        "# Cleaning report", "",
        f"Input: {inp['documents']:,} documents, {inp['characters']:,} characters. "
        f"Output: {out['documents']:,} documents, {out['characters']:,} characters in `{out['data']}`. "
        f"Removed: {rem['documents']:,} documents ({rem['fraction_documents']:.1%}), {rem['characters']:,} characters.",
        "", "| rule | documents | characters | reasons |", "|---|---:|---:|---|",
    ]
    for r in report["rules"]:
        reasons = ", ".join(f"{k} {v['documents']:,}" for k, v in r["reasons"].items())
        lines.append(f"| {r['rule']} | {r['documents']:,} | {r['characters']:,} | {reasons} |")
    if report["pii_masked"]:
        lines += ["", "PII masked: " + ", ".join(f"{k} {v:,}" for k, v in report["pii_masked"].items())]
    lines += ["", "Removed documents are in `excluded/<rule>/` (same record format plus a `clean` field with "
                  "the reason and source line); moving a rule's files into `data/` reverts it.", "",
              "![length histogram](length_histogram.png)", "", "## Examples of removed text", ""]
    for r in report["rules"]:
        for reason, entry in r["reasons"].items():
            lines.append(f"### {r['rule']} / {reason}")
            for ex in entry["examples"]:
                text = ex["text"].replace("\n", " ⏎ ").replace("|", "\\|")
                lines.append(f"- `{ex['source']}`: {text[:200]}")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot_histogram(hist: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = hist["edges"]
    labels = [f"{e:,}" for e in edges]
    used = [i for i, (b, a) in enumerate(zip(hist["before"], hist["after"])) if a or b] or [0]
    x = range(used[0], used[-1] + 1)  # the bins between the shortest and the longest document
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.2 for i in x], [hist["before"][i] for i in x], width=0.4, label="before")
    ax.bar([i + 0.2 for i in x], [hist["after"][i] for i in x], width=0.4, label="after")
    ax.set_xticks(list(x))
    ax.set_xticklabels([f">={labels[i]}" for i in x], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.set_title("Document lengths before and after cleaning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class WriteReport(PipelineStep):
    """The last stage (one task): the report, written once every other stage is complete."""

    name = "report"
    type = "📝 - REPORT"

    def __init__(self, output: str, config: dict, examples: int):
        super().__init__()
        self.output, self.config, self.examples = output, config, examples

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        build_report(self.output, self.config, self.examples)
        return iter(())
