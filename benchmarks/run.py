"""Runs every figure on one embedded stack and writes results/latest.json, a markdown table and a plot."""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import figures
from benchmarks.stack import Stack
from service.core.lifecycle import STOP_SIGNALS

RESULTS = Path(__file__).resolve().parent / "results"


def run(profile: figures.Profile) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def measure(names: tuple[str, ...], produce: Any) -> None:
        begun = time.perf_counter()
        produced = produce()
        for name, value in zip(names, produced if len(names) > 1 else [produced], strict=True):
            results[name] = value
        timings["+".join(names)] = round(time.perf_counter() - begun, 1)

    with Stack() as stack:
        measure(("ingest",), lambda: figures.ingest(stack, profile))
        measure(("drain", "drain_variants"), lambda: figures.drain(stack, profile))
        measure(("machinery",), lambda: figures.machinery(stack, profile))
        measure(
            ("reads_profile", "reads_image", "reads_image_uncached", "reads_image_redirect", "reads_variant"),
            lambda: figures.reads(stack, profile),
        )
        measure(("end_to_end",), lambda: figures.end_to_end(stack, profile, results["drain"]["ours"]["median"]))
        measure(("naive_latency", "naive_outage"), lambda: figures.naive(stack, profile))
        measure(
            (
                "growth_claim_finished",
                "growth_drain_finished",
                "growth_claim_backlog",
                "growth_drain_backlog",
                "machinery_at_scale",
            ),
            lambda: figures.growth(stack, profile),
        )
        measure(("memory",), lambda: figures.memory(stack, profile))
    return {
        "profile": profile.name,
        "repetitions": profile.reps,
        "machine": figures.machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_by_figure": timings,
        "figures": results,
    }


def _fmt(value: float) -> str:
    return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"


def _cell(summary: dict[str, Any]) -> str:
    if "median" not in summary:  # percentiles
        return ", ".join(f"{name} {_fmt(s['median'])}" for name, s in summary.items())
    return f"{_fmt(summary['median'])} [{_fmt(summary['min'])}-{_fmt(summary['max'])}]"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Profile `{report['profile']}`, median of {report['repetitions']} repetitions [min-max], "
        f"{report['machine']['cpus']} CPUs, {report['seconds']} s in all.",
        "",
        "| figure | unit | ours | reference | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in report["figures"].values():
        references = result.get("references", {})
        reference = "; ".join(f"{name}: {_cell(value)}" for name, value in references.items())
        ratio = f"{result['ratio']:.2f}" if "ratio" in result else ""
        ours = _cell(result["ours"])
        if "cpu_busy_percent" in result:
            ours += f" (both cores {result['cpu_busy_percent']['median']:.0f} % busy)"
        if "stages" in result:
            ours += "; of which " + ", ".join(
                f"{stage} p50 {_fmt(q['p50'])} / p99 {_fmt(q['p99'])}" for stage, q in result["stages"].items()
            )
        lines.append(
            f"| {result['title']} | {result['unit']} | {ours} | {reference} | {ratio} "
            f"| {result['goal']} | {'yes' if result['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = {name: r for name, r in report["figures"].items() if "ratio" in r and "bound" in r}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1]})
    names = list(ratios)
    values = [ratios[n]["ratio"] for n in names]
    colors = ["tab:green" if ratios[n]["met"] else "tab:red" for n in names]
    left.barh(names, values, color=colors)
    for i, name in enumerate(names):
        goal = float(ratios[name]["goal"].split()[1])
        left.plot([goal, goal], [i - 0.4, i + 0.4], color="black")
    left.set_xlabel("ours / reference (black: goal)")
    left.invert_yaxis()
    e2e = report["figures"]["end_to_end"]["ours"]
    right.bar(
        list(e2e),
        [e2e[p]["median"] for p in e2e],
        yerr=[[e2e[p]["median"] - e2e[p]["min"] for p in e2e], [e2e[p]["max"] - e2e[p]["median"] for p in e2e]],
    )
    right.set_ylabel("ms, 202 to live")
    right.axhline(15, color="grey", linestyle=":")
    right.axhline(100, color="grey", linestyle="--")
    fig.suptitle(f"profiles benchmark ({report['profile']}, {report['machine']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2))
    (out / "latest.md").write_text(markdown(report))
    plot(report, out / "latest.png")


def _unwind_on_stop_signals() -> None:
    """A stop signal unwinds the run as Ctrl-C does, so the engines and processes it started stop
    with it (the default handler would leave them running)."""

    def unwind(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in STOP_SIGNALS:
        if sig != signal.SIGINT:
            signal.signal(sig, unwind)


def main() -> None:
    _unwind_on_stop_signals()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--profile", choices=list(figures.PROFILES), default="full")
    parser.add_argument("--quick", action="store_const", const="quick", dest="profile")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(figures.PROFILES[args.profile])
    write(report, args.out)
    print(markdown(report))


if __name__ == "__main__":
    main()
