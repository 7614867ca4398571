"""report.md, report.json and the PNG plots of dist/<recipe>/, from what the folder holds: the build's own
checks (sizes, fidelity, vela) always, eval, bench, debug and prediction results when they were measured.
Rows follow the recipe's order."""

from __future__ import annotations

import json
from pathlib import Path

from ..fsio import write_bytes_atomic, write_json_atomic
from ..manifest import load_manifest
from ..recipe.schema import DEFAULT_FLOORS, INTEGER_MODES
from ..stages.debug import debug_table
from ..stages.dist import write_md5sums
from ..stages.verify import below_floors, matched_parts_text, matched_share_text
from .tables import accuracy_key, bench_table, eval_table, in_order, load_evals, size_mb


def _optional_json(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


class _Plots:
    """PNG plots written into the dist folder, with no version or date in them: reproducible bytes."""

    def __init__(self, folder: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.folder, self.written = plt, folder, []

    def plot(self, filename: str, rows: int, draw) -> None:
        fig, ax = self.plt.subplots(figsize=(8, 1.6 + 0.42 * rows), dpi=100)  # room for every row's label
        draw(ax)
        fig.tight_layout()
        fig.savefig(self.folder / filename, metadata={"Software": None})
        self.plt.close(fig)
        self.written.append(self.folder / filename)

    def bars(self, filename: str, names: list[str], values: list[float], label: str, title: str, color: str,
             fmt: str) -> None:
        def draw(ax):
            ax.barh(names, values, color=color)
            ax.invert_yaxis()  # first row on top, as in the tables
            ax.set_xlim(0, max(values) * 1.18 if max(values) > 0 else 1)
            for y, v in enumerate(values):
                ax.text(v, y, " " + format(v, fmt), va="center", fontsize=8)
            ax.set_xlabel(label)
            ax.set_title(title, fontsize=10)
        self.plot(filename, len(names), draw)


def _warnings(manifest: dict, variants: dict, bench: dict | None) -> list[str]:
    """What a reader must not miss: a variant the build refused, fidelity below a default floor (allowed by
    the recipe's own), an integer variant slower than float32 on this CPU, operators the NPU leaves to the CPU."""
    lines = [f"- **{name}**: not shipped: {'; '.join(reason.splitlines())}"
             for name, reason in manifest.get("refused", {}).items()]
    timed = (bench or {}).get("results", {})
    float_ms = timed.get("float32", {}).get("median_ms")
    for name, v in variants.items():
        for field, what, shown in below_floors(v.get("verify") or {}, DEFAULT_FLOORS, v["mode"]):
            lines.append(f"- **{name}**: {what} {shown}, below the default floor {DEFAULT_FLOORS[field]} "
                         f"(the recipe lowered {field})")
        ms = timed.get(name, {}).get("median_ms")
        if v["mode"] in INTEGER_MODES and float_ms and ms and ms > float_ms:
            lines.append(f"- **{name}**: {ms:.2f} ms on this CPU, slower than float32 ({float_ms:.2f} ms, "
                         f"{float_ms / ms:.2f}x): its integer kernels do not pay here")
        integer, convs = timed.get(name, {}).get("integer_convs") or (0, 0)
        if v["mode"] in INTEGER_MODES and integer < convs:
            lines.append(f"- **{name}**: ONNX Runtime runs {convs - integer} of its {convs} convolutions in float "
                         "on this CPU (between a Dequantize and a Quantize), not as integer kernels")
        for target, npu in v.get("vela", {}).items():
            if npu["cpu_op_count"]:
                lines.append(f"- **{name}** on {target}: {npu['cpu_op_count']} operator(s) run on the CPU, not the NPU")
    return ["## Warnings", "", *lines, ""] if lines else []


def _accuracy(folder: Path, manifest: dict, variants: dict, evaluations: list[dict], plots: _Plots,
              recipe_argument: str) -> list[str]:
    md = ["## Accuracy", ""]
    if not evaluations:
        return md + [f"No evaluation yet: `mzconvert eval {recipe_argument} --dataset DIR` adds it.", ""]
    evaluation = max(evaluations, key=lambda e: e["images"])  # the plots show the largest
    for e in evaluations:
        md += ["```", eval_table(e, manifest), "```", ""]
    key = accuracy_key(evaluation["results"])
    names = list(in_order(evaluation))
    shown = [f"{n} (reference kernels)" if evaluation["results"][n].get("kernels") == "reference" else n
             for n in names]  # the other family's rows say theirs in their names
    plots.bars("accuracy.png", shown, [evaluation["results"][n][key] for n in names], key,
               f"{folder.name}: {key} on {evaluation['images']} images of {evaluation['dataset']['name']}",
               "#4477aa", ".4f")
    sized = [n for n in names if n in variants]

    def scatter(ax):
        markers = "osD^v<>Pp*hX"
        for i, n in enumerate(sized):
            size = manifest["artifacts"][variants[n]["file"]]["size"] / 1e6
            ax.scatter(size, evaluation["results"][n][key], marker=markers[i % len(markers)], s=60, label=n)
        ax.legend(fontsize=8, loc="best")  # a legend, not labels on points: they overlap
        ax.set_xlabel("artifact size, MB")
        ax.set_ylabel(key)
        ax.set_title(f"{folder.name}: accuracy vs size", fontsize=10)

    plots.plot("accuracy_vs_size.png", max(len(sized), 6), scatter)
    return md + [f"The plots show the eval on {evaluation['dataset']['name']} ({evaluation['images']} images).", "",
                 "![accuracy](accuracy.png)", "", "![accuracy vs size](accuracy_vs_size.png)", ""]


def _fidelity(manifest: dict, variants: dict) -> list[str]:
    md = ["## Artifacts and fidelity against the float source model", "",
          "| variant | mode | I/O | size MB | output | cosine | SQNR dB | top-1 agreement |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in variants.items():
        for output, m in (v.get("verify") or {"-": {}}).items():
            if isinstance(m, dict):
                agreement = f"{m['top1_agreement']:.1%}" if "top1_agreement" in m else "-"
                md.append(f"| {name} | {v['mode']} | {v['io_dtype']} | {size_mb(manifest, name)} | {output} | "
                          f"{m.get('cosine', float('nan')):.5f} | {m.get('sqnr_db', float('nan')):.1f} | {agreement} |")
    matched = {n: v["verify"] for n, v in variants.items() if "matched_detections" in (v.get("verify") or {})}
    if matched:
        md += ["", "Detections (score >= 0.3) matching the float model's (same label, IoU >= 0.9): "
               + ", ".join(f"{n} {matched_share_text(m)}" + matched_parts_text(m, " ({})")
                           for n, m in matched.items()) + "."]
    if fidelity := manifest.get("source_pipeline_fidelity"):
        md += ["", f"Our declared preprocessing + float model + decode against the source end to end on "
                   f"{fidelity['images']} images: {fidelity['matched_share']:.1%} {fidelity['what']}."]
    return md + [""]


def _latency(folder: Path, bench: dict | None, plots: _Plots) -> list[str]:
    if bench is None:
        return []
    latency = list(in_order(bench))
    plots.bars("latency.png", latency, [bench["results"][n]["median_ms"] for n in latency], "median latency, ms (CPU)",
               f"{folder.name}: CPU latency, {bench['threads']} thread(s)", "#cc6677", ".2f")
    return ["## CPU latency", "", "```", bench_table(bench), "```", "", "![latency](latency.png)", ""]


def _npu(vela: dict) -> list[str]:
    if not vela:
        return []
    md = ["## Ethos-U (vela estimates)", "",
          "| variant | target | accelerator | inference ms | NPU ops | CPU ops | SRAM KiB | flash KiB | DRAM KiB |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, targets in vela.items():
        for target, v in targets.items():
            flash = v.get("on_chip_flash_used_kib", 0) + v.get("off_chip_flash_used_kib", 0)
            md.append(f"| {name} | {target} | {v['accelerator']} | {v.get('inference_time_ms')} | {v['npu_ops']} "
                      f"| {v['cpu_op_count']} | {v.get('sram_used_kib')} | {flash:g} | {v.get('dram_used_kib')} |")
    return md + [""]


def _debug_and_pictures(folder: Path) -> list[str]:
    md = []
    for path in sorted((folder / "debug").glob("*.json")):
        md += [f"## Per-layer quantization error: {path.stem}", "", "```", debug_table(json.loads(path.read_text())),
               "```", "", f"![{path.stem}](debug/{path.stem}.png)", ""]
    predictions = sorted((folder / "predictions").glob("*.png"))
    if predictions:
        md += ["## What int8 changes, on a sample image", ""]
        md += [f"![{p.stem}](predictions/{p.name})" for p in predictions] + [""]
    return md


def write_report(folder: Path, recipe_argument: str) -> list[Path]:
    """report.md/json and plots of dist/<recipe>/ (`folder`). `recipe_argument`: how the suggested commands
    name the recipe (see recipe.command_argument)."""
    manifest = load_manifest(folder.parent, folder.name)
    evaluations = load_evals(folder)
    bench = _optional_json(folder, "bench.json")
    variants = in_order(manifest, "variants", "variant_order")
    vela = {n: v["vela"] for n, v in variants.items() if "vela" in v}
    plots = _Plots(folder)
    md = [f"# {folder.name}", ""] + _warnings(manifest, variants, bench)
    md += _accuracy(folder, manifest, variants, evaluations, plots, recipe_argument)
    md += _fidelity(manifest, variants) + _latency(folder, bench, plots) + _npu(vela) + _debug_and_pictures(folder)
    report = {"recipe": folder.name, "recipe_sha256": manifest["recipe_sha256"], "eval": evaluations, "bench": bench,
              "artifacts": {f: a["sha256"] for f, a in manifest["artifacts"].items()},
              "verify": {n: v.get("verify") for n, v in variants.items()}, "vela": vela,
              "source_pipeline_fidelity": manifest.get("source_pipeline_fidelity")}
    write_json_atomic(folder / "report.json", report)
    write_bytes_atomic(folder / "report.md", "\n".join(md).encode())
    write_md5sums(folder)
    return plots.written + [folder / "report.json", folder / "report.md"]
