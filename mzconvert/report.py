"""Tables for the terminal and report.md/report.json/PNG plots in dist/<recipe>/."""

from __future__ import annotations

import json
from pathlib import Path

from .debug import debug_table
from .dist import write_md5sums
from .errors import MzError
from .fsio import write_bytes_atomic, write_json_atomic

def read_json(folder: Path, name: str, hint: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise MzError(f"{path}: missing; {hint}")
    return json.loads(path.read_text())


def load_manifest(dist: Path, recipe_name: str) -> dict:
    return read_json(dist / recipe_name, "manifest.json", f"build it first: mzconvert build {recipe_name}")


def accuracy_key(results: dict) -> str:
    return "AP" if "AP" in next(iter(results.values())) else "top1"


def dataset_line(evaluation: dict) -> str:
    """What the numbers were measured on, from the eval itself: never fixed text."""
    d = evaluation["dataset"]
    return (f"{evaluation['recipe']} on {evaluation['images']} images of {d['name']} ({d['path']}), "
            f"{evaluation['scope']}; labels from {evaluation['labels']}. Ratios are to {evaluation['baseline']}, "
            f"with paired bootstrap 95 % intervals over the images: on a few hundred images they span a few percent.")


def in_order(measured: dict, key: str = "results", order: str = "models") -> dict:
    """`measured[key]` in the order the writer listed (JSON files are written with sorted keys)."""
    return {name: measured[key][name] for name in measured.get(order, measured[key])}


def eval_table(evaluation: dict, manifest: dict) -> str:
    results = in_order(evaluation)
    key = accuracy_key(results)
    baseline = results.get(evaluation["baseline"], {}).get(key)
    columns = ("AP", "AP50", "AP75") if key == "AP" else ("top1", "top5", "top1_agreement")
    width = max(len(name) for name in [*results, "model"])
    lines = [dataset_line(evaluation),
             f"{'model':{width}} {'size MB':>8} " + " ".join(f"{c[:7]:>7}" for c in columns)
             + f" {'vs ' + evaluation['baseline']:>12} {'95 % interval':>16}"]
    for name, r in results.items():
        size = _size_mb(manifest, name)
        ratio = f"{r[key] / baseline:12.1%}" if baseline else f"{'-':>12}"
        low, high = r.get("ratio_interval", [float("nan")] * 2)
        interval = f"{low:7.1%} - {high:6.1%}" if low == low else f"{'-':>16}"
        lines.append(f"{name:{width}} {size:>8} " + " ".join(f"{r[c]:7.4f}" for c in columns) + f" {ratio} {interval:>16}")
    if fidelity := evaluation.get("pipeline_fidelity"):
        lines.append(f"pipeline fidelity: source-graph (our preprocessing + decode) - source-pipeline (the source "
                     f"end to end): AP {fidelity['ap_difference']:+.4f}; {fidelity['matched_share']:.1%} of "
                     f"{fidelity['detections_compared']} detections matched ({fidelity['match']})"
                     + (f"; worst image {fidelity['worst_image']} {fidelity['worst_image_share']:.0%}"
                        if fidelity["worst_image"] else ""))
    return "\n".join(lines)


def load_evals(folder: Path) -> list[dict]:
    """Every eval of dist/<recipe>/, one per dataset it was run on."""
    return [json.loads(p.read_text()) for p in sorted((folder / "eval").glob("*.json"))]


def _size_mb(manifest: dict, name: str) -> str:
    variant = manifest["variants"].get(name)
    if variant is None:
        return "-"
    return f"{manifest['artifacts'][variant['file']]['size'] / 1e6:.2f}"


def bench_table(bench: dict) -> str:
    rows = in_order(bench)
    base = rows.get("float32", {}).get("median_ms")
    lines = [f"{bench['recipe']}: CPU latency, {bench['threads']} thread(s), {bench['runs']} runs after warm-up",
             f"{'model':28} {'median ms':>10} {'p90 ms':>8} {'peak RSS MB':>12} {'speed-up vs float32':>20}"]
    for name, r in rows.items():
        speedup = f"{base / r['median_ms']:19.2f}x" if base else f"{'-':>20}"
        lines.append(f"{name:28} {r['median_ms']:10.2f} {r['p90_ms']:8.2f} {r['peak_rss_mb']:12.0f} {speedup}")
    return "\n".join(lines)


def _optional_json(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(folder: Path, recipe_argument: str) -> list[Path]:
    """report.md/json and plots from what dist/<recipe>/ holds: the build's own checks (sizes, fidelity,
    vela) always, eval and bench results when they were measured. Rows follow the recipe's order.
    `recipe_argument`: how the suggested commands name the recipe (see recipe.command_argument)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = load_manifest(folder.parent, folder.name)
    evaluations = load_evals(folder)
    bench = _optional_json(folder, "bench.json")
    variants = in_order(manifest, "variants", "variant_order")
    written = []

    def plot(filename: str, rows: int, draw) -> None:
        fig, ax = plt.subplots(figsize=(8, 1.6 + 0.42 * rows), dpi=100)  # room for every row's label
        draw(ax)
        fig.tight_layout()
        fig.savefig(folder / filename, metadata={"Software": None})  # no version/date: reproducible bytes
        plt.close(fig)
        written.append(folder / filename)

    def bars(ax, names: list[str], values: list[float], label: str, title: str, color: str, fmt: str) -> None:
        ax.barh(names, values, color=color)
        ax.invert_yaxis()  # first row on top, as in the tables
        ax.set_xlim(0, max(values) * 1.18 if max(values) > 0 else 1)
        for y, v in enumerate(values):
            ax.text(v, y, " " + format(v, fmt), va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.set_title(title, fontsize=10)

    md = [f"# {folder.name}", ""]
    evaluation = max(evaluations, key=lambda e: e["images"]) if evaluations else None  # the plots show the largest
    md += ["## Accuracy", ""]
    if evaluation is None:
        md += [f"No evaluation yet: `mzconvert eval {recipe_argument} --dataset DIR` adds it.", ""]
    else:
        for e in evaluations:
            md += ["```", eval_table(e, manifest), "```", ""]
        key = accuracy_key(evaluation["results"])
        names = list(in_order(evaluation))
        plot("accuracy.png", len(names), lambda ax: bars(
            ax, names, [evaluation["results"][n][key] for n in names], key,
            f"{folder.name}: {key} on {evaluation['images']} images of {evaluation['dataset']['name']}",
            "#4477aa", ".4f"))
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

        plot("accuracy_vs_size.png", max(len(sized), 6), scatter)
        md += [f"The plots show the eval on {evaluation['dataset']['name']} ({evaluation['images']} images).", "",
               "![accuracy](accuracy.png)", "", "![accuracy vs size](accuracy_vs_size.png)", ""]
    md += ["## Artifacts and fidelity against the float source model", "",
           "| variant | mode | I/O | size MB | output | cosine | SQNR dB | top-1 agreement |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in variants.items():
        for output, m in (v.get("verify") or {"-": {}}).items():
            if isinstance(m, dict):
                agreement = f"{m['top1_agreement']:.1%}" if "top1_agreement" in m else "-"
                md.append(f"| {name} | {v['mode']} | {v['io_dtype']} | {_size_mb(manifest, name)} | {output} | "
                          f"{m.get('cosine', float('nan')):.5f} | {m.get('sqnr_db', float('nan')):.1f} | {agreement} |")
    matched = {n: v["verify"]["matched_detections"] for n, v in variants.items()
               if "matched_detections" in (v.get("verify") or {})}
    if matched:
        md += ["", "Detections (score >= 0.3) matching the float model's (same label, IoU >= 0.9): "
               + ", ".join(f"{n} {share:.1%}" for n, share in matched.items()) + "."]
    if fidelity := manifest.get("source_pipeline_fidelity"):
        md += ["", f"Our declared preprocessing + float model + decode against the source end to end on "
                   f"{fidelity['images']} images: {fidelity['matched_share']:.1%} {fidelity['what']}."]
    md += [""]
    if bench is not None:
        latency = list(in_order(bench))
        plot("latency.png", len(latency), lambda ax: bars(
            ax, latency, [bench["results"][n]["median_ms"] for n in latency], "median latency, ms (CPU)",
            f"{folder.name}: CPU latency, {bench['threads']} thread(s)", "#cc6677", ".2f"))
        md += ["## CPU latency", "", "```", bench_table(bench), "```", "", "![latency](latency.png)", ""]
    vela = {n: v["vela"] for n, v in variants.items() if "vela" in v}
    if vela:
        md += ["## Ethos-U (vela estimates)", "",
               "| variant | target | accelerator | inference ms | NPU ops | CPU ops | SRAM KiB | flash KiB | DRAM KiB |",
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, targets in vela.items():
            for target, v in targets.items():
                flash = v.get("on_chip_flash_used_kib", 0) + v.get("off_chip_flash_used_kib", 0)
                md.append(f"| {name} | {target} | {v['accelerator']} | {v.get('inference_time_ms')} | {v['npu_ops']} "
                          f"| {v['cpu_op_count']} | {v.get('sram_used_kib')} | {flash:g} | {v.get('dram_used_kib')} |")
        md += [""]
    for path in sorted((folder / "debug").glob("*.json")):
        md += [f"## Per-layer quantization error: {path.stem}", "", "```", debug_table(json.loads(path.read_text())),
               "```", "", f"![{path.stem}](debug/{path.stem}.png)", ""]
    predictions = sorted((folder / "predictions").glob("*.png"))
    if predictions:
        md += ["## What int8 changes, on a sample image", ""]
        md += [f"![{p.stem}](predictions/{p.name})" for p in predictions] + [""]
    report = {"recipe": folder.name, "recipe_sha256": manifest["recipe_sha256"], "eval": evaluations, "bench": bench,
              "artifacts": {f: a["sha256"] for f, a in manifest["artifacts"].items()},
              "verify": {n: v.get("verify") for n, v in variants.items()}, "vela": vela,
              "source_pipeline_fidelity": manifest.get("source_pipeline_fidelity")}
    write_json_atomic(folder / "report.json", report)
    write_bytes_atomic(folder / "report.md", "\n".join(md).encode())
    written += [folder / "report.json", folder / "report.md"]
    write_md5sums(folder)
    return written
