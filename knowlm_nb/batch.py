"""Run the notebooks in order with papermill and collect their figures.

    python -m knowlm_nb.batch --profile tiny [--only 01 03] [-p NAME VALUE ...] [--check]

Every notebook gets its profile parameters (``env/profiles/<profile>.yaml``),
the shared ``workdir`` and the paths of the artifacts its upstream notebooks
in the same run write there. ``-p NAME VALUE`` overrides a parameter in every
selected notebook that declares it. Everything is checked before the first
notebook starts: an unknown parameter fails at once, naming it, and the
preflight (:mod:`knowlm_nb.preflight`) reports every missing model, tokenizer,
dataset, hostfile or DeepSpeed config and every CUDA-only setting this machine
cannot run, with the fix. ``--check`` prints the plan (notebooks, parameters,
artifacts, what the preflight found) and exits 0 (ready) or 2 without running
anything. Executed notebooks go to
``runs/<profile>/executed/``; the run ends with ``runs/<profile>/summary.md``
and ``summary.json`` (status, minutes and recorded figures per notebook).
A failing notebook stops the run; the message names the notebook and the cell.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import ROOT, config, preflight, report

NOTEBOOKS_DIR = ROOT / "notebooks"
_NAME = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.ipynb$")


class BatchError(RuntimeError):
    """A problem found before or while running the notebooks."""


@dataclass
class Job:
    path: Path
    notebook: str                 # "00", "01", ...
    parameters: dict = field(default_factory=dict)
    status: str = "pending"       # pending | ok | failed | not run
    minutes: float = 0.0
    error: str = ""
    metrics: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)   # preflight.Finding, from plan()


def discover(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order."""
    if not notebooks_dir.is_dir():
        raise BatchError(f"no notebooks folder at {notebooks_dir}")
    return sorted(p for p in notebooks_dir.iterdir() if _NAME.match(p.name))


def declared_parameters(path: Path) -> list[str]:
    """Names declared in a notebook's ``parameters`` cell (read, not executed)."""
    import nbformat
    import papermill

    nb = nbformat.read(path, as_version=4)
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        raise BatchError(f"{path.name} has no cell tagged 'parameters'")
    return list(papermill.inspect_notebook(str(path)))


def _convert(name: str, raw: str, notebook: str):
    """A ``-p`` value as the type the schema wants (YAML for non-strings)."""
    expected = config.COMMON.get(name) or config.SCHEMA.get(notebook, {}).get(name)
    if expected is str:
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise BatchError(f"-p {name} {raw!r}: not a valid value") from None
    if expected is not None:
        try:
            value = config.check_type(name, value, expected, f"-p {name}")
        except config.ConfigError as exc:
            raise BatchError(str(exc)) from None
    return value


def plan(profile: str, only: list[str] | None = None, overrides: list[tuple[str, str]] = (),
         notebooks_dir: Path = NOTEBOOKS_DIR, strict: bool = True,
         machine: preflight.Machine | None = None) -> tuple[list[Job], Path]:
    """Build the jobs and check every parameter and path; raise before anything runs.

    An empty path parameter becomes the upstream artifact's path when the
    upstream notebook is in this run; otherwise it stays "" and the notebook
    resolves it itself (on ``tiny`` it builds what is missing). With
    ``strict=False`` the preflight's errors stay in ``job.findings`` instead of
    raising :class:`~knowlm_nb.preflight.PreflightError` (``--check``).
    """
    try:
        base = config.load_profile(profile)
    except config.ConfigError as exc:
        raise BatchError(str(exc)) from None
    paths = discover(notebooks_dir)
    if only:
        bad = [o for o in only if not re.fullmatch(r"\d\d", o)]
        if bad:
            raise BatchError(f"--only takes two-digit notebook numbers, got {bad}")
        missing = sorted(set(only) - {p.name[:2] for p in paths})
        if missing:
            raise BatchError(f"--only names notebooks that do not exist: {missing}; "
                             f"present: {[p.name[:2] for p in paths]}")
        paths = [p for p in paths if p.name[:2] in only]
    if not paths:
        raise BatchError(f"no notebooks to run in {notebooks_dir}")

    overrides = list(overrides)
    if any(name == "profile" for name, _ in overrides):
        raise BatchError("choose the profile with --profile NAME, not -p profile")
    workdir_raw = next((v for k, v in reversed(overrides) if k == "workdir"), base.get("workdir", ""))
    workdir = config.workdir_for(base["profile"], workdir_raw)

    jobs, used = [], set()
    selected = {p.name[:2] for p in paths}
    for path in paths:
        nb = path.name[:2]
        if nb not in config.SCHEMA:
            raise BatchError(f"{path.name}: no parameter schema for notebook {nb} in knowlm_nb.config")
        declared = declared_parameters(path)
        params = config.notebook_params(base["profile"], nb)
        params["workdir"] = str(workdir)
        for name, upstream in config.upstream_paths(nb, workdir).items():
            if not params.get(name) and config.UPSTREAM[nb][name][0] in selected:
                params[name] = upstream
        not_declared = sorted(set(params) - set(declared))
        if not_declared:
            raise BatchError(f"{path.name}: its parameters cell lacks {not_declared}, "
                             f"which profile {base['profile']!r} sets")
        for name, raw in overrides:
            if name in declared and name != "workdir":
                params[name] = _convert(name, raw, nb)
                used.add(name)
            elif name == "workdir":
                used.add(name)
        jobs.append(Job(path=path, notebook=nb, parameters=params))

    unknown = [name for name, _ in overrides if name not in used]
    if unknown:
        names = ", ".join(dict.fromkeys(unknown))
        raise BatchError(f"unknown parameter {names}: not in the parameters cell of "
                         f"{', '.join(j.path.name for j in jobs)}")
    cfgs = [config.Config(notebook=j.notebook, params=j.parameters, workdir=workdir) for j in jobs]
    found = preflight.check_run(cfgs, machine)
    for job in jobs:
        job.findings = found[job.notebook]
    if strict:
        preflight.raise_errors([f for j in jobs for f in j.findings], header=(
            f"profile {base['profile']!r}: the preflight found problems before the first "
            "notebook (nothing was run or written; --check prints the whole plan):"))
    return jobs, workdir


def describe_plan(jobs: list[Job], workdir: Path, profile: str) -> str:
    """The plan as text: notebooks, resolved parameters, artifacts, preflight findings."""
    errors = [f for j in jobs for f in j.findings if f.level == "error"]
    lines = [f"plan: profile {profile!r}, workdir {workdir}, {len(jobs)} notebook(s)", ""]
    for job in jobs:
        cfg = config.Config(notebook=job.notebook, params=job.parameters, workdir=workdir)
        lines.append(job.path.name)
        shown = [f"{k}={v!r}" for k, v in job.parameters.items() if k not in ("profile", "workdir")]
        lines += textwrap.wrap("  ".join(shown), 100, initial_indent="  parameters: ",
                               subsequent_indent=" " * 14, break_on_hyphens=False)
        for name, out in cfg.outputs().items():
            lines.append(f"  writes    : {name} -> {out}")
        for f in job.findings:
            lines.append(f"  {f.level.upper():<5}     {f.message}")
        lines.append("")
    if errors:
        lines.append(f"preflight: {len(errors)} problem(s); nothing was run. Fix them "
                     "(the messages say how), then run again.")
    else:
        lines.append("preflight: OK, ready to run (nothing was run).")
    return "\n".join(lines)


def _failing_cell(exc) -> str:
    """Which cell failed and why, from papermill's PapermillExecutionError."""
    idx = getattr(exc, "cell_index", None)
    count = getattr(exc, "exec_count", None)
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    where = "a cell" if idx is None else f"cell {idx} of the executed copy"
    details = []
    if count is not None:
        details.append(f"In [{count}]")
    first = next((ln for ln in (getattr(exc, "source", "") or "").splitlines() if ln.strip()), "")
    if first:
        details.append(f"starting {first.strip()[:80]!r}")
    if details:
        where += f" ({', '.join(details)})"
    return f"{where}: {ename}: {evalue}"


def run(jobs: list[Job], workdir: Path, profile: str, progress: bool = True) -> list[Job]:
    """Execute ``jobs`` in order; stop at the first failure. Writes the summary."""
    import papermill
    from tqdm.auto import tqdm

    out_dir = workdir / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(jobs, desc=f"notebooks ({profile})", unit="nb", disable=not progress)
    failed = False
    for job in bar:
        if failed:
            job.status = "not run"
            continue
        bar.set_postfix_str(job.path.name)
        report.metrics_path(workdir, job.notebook).unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(job.path), str(out_dir / job.path.name), parameters=job.parameters,
                kernel_name="python3", cwd=str(job.path.parent), progress_bar=False,
                log_output=False)
            job.status = "ok"
        except Exception as exc:  # papermill raises PapermillExecutionError
            job.status, job.error, failed = "failed", _failing_cell(exc), True
        job.minutes = (time.perf_counter() - start) / 60
        job.metrics = report.load_metrics(workdir, job.notebook)
    write_summary(jobs, workdir, profile)
    return jobs


def write_summary(jobs: list[Job], workdir: Path, profile: str) -> Path:
    rows = [{"notebook": j.path.name, "status": j.status, "minutes": round(j.minutes, 2),
             "error": j.error, "metrics": j.metrics} for j in jobs]
    (workdir / "summary.json").write_text(
        json.dumps({"profile": profile, "notebooks": rows}, indent=2, ensure_ascii=False),
        encoding="utf-8")
    lines = [f"# Batch run: profile `{profile}`", "",
             report.markdown_table(rows, ["notebook", "status", "minutes", "error"]), "",
             "## Recorded figures", ""]
    figures = [{"notebook": r["notebook"], "figure": k, "value": v}
               for r in rows for k, v in sorted(r["metrics"].items())]
    lines.append(report.markdown_table(figures) if figures else "(none recorded)")
    path = workdir / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.batch", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny", help="env/profiles/NAME.yaml (default tiny)")
    ap.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks, e.g. 00 03")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                    metavar=("NAME", "VALUE"), help="override a parameter")
    ap.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help="print the plan and the preflight's findings, run nothing; exit 0 or 2")
    args = ap.parse_args(argv)
    try:
        jobs, workdir = plan(args.profile, args.only, [tuple(p) for p in args.parameter],
                             args.notebooks_dir, strict=not args.check)
    except (BatchError, config.ConfigError, preflight.PreflightError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(describe_plan(jobs, workdir, jobs[0].parameters["profile"]))
        return 2 if any(f.level == "error" for j in jobs for f in j.findings) else 0
    jobs = run(jobs, workdir, args.profile, progress=not args.no_progress)
    summary = (workdir / "summary.md").read_text(encoding="utf-8")
    print(summary)
    for job in jobs:
        if job.status == "failed":
            print(f"error: {job.path.name} failed at {job.error}\n"
                  f"       executed copy: {workdir / 'executed' / job.path.name}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
