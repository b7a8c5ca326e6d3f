"""`tuneserve`: datasets, jobs, adapters, generation and evaluation reports, over the API's HTTP interface."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from cli.admin import admin_app
from cli.client import DEFAULT_API_URL, Api, ApiError
from cli.plot import loss_curve, save_loss_plot
from core.statuses import TERMINAL_STATUSES

STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "queued": "blue",
    "paused": "magenta",
}
# A watch survives an API restart: it gives up only after this long without an answer.
WATCH_UNREACHABLE_SECONDS = 60.0

app = typer.Typer(
    name="tuneserve",
    no_args_is_help=True,
    add_completion=False,
    help="Fine-tune LoRA adapters and use them, through the tuneserve API.",
)
datasets_app = typer.Typer(no_args_is_help=True, help="Upload and list datasets.")
jobs_app = typer.Typer(no_args_is_help=True, help="Create, follow, cancel and plot fine-tuning jobs.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapters that jobs produced.")
eval_app = typer.Typer(no_args_is_help=True, help="Before/after evaluation of a job's adapter.")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(adapters_app, name="adapters")
app.add_typer(eval_app, name="eval")
app.add_typer(admin_app, name="admin")


@dataclass
class State:
    api: Api
    json: bool
    out: Console
    err: Console


F = TypeVar("F", bound=Callable[..., Any])


def api_errors(func: F) -> F:
    """Print an API error as `error: MESSAGE (param: PARAM)` on stderr and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ApiError as e:
            fail(e)

    return wrapper  # type: ignore[return-value]


def fail(e: ApiError) -> NoReturn:
    err = Console(stderr=True)
    where = f" (param: {e.param})" if e.param else ""
    status = f" [HTTP {e.status}{', ' + e.code if e.code else ''}]" if e.status else ""
    err.print(f"[red]error:[/red] {escape(e.message)}{escape(where)}{escape(status)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.callback()
def main_options(
    ctx: typer.Context,
    api: Annotated[
        str, typer.Option("--api", envvar="TUNESERVE_API_URL", help="Base URL of the tuneserve API")
    ] = DEFAULT_API_URL,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="TUNESERVE_API_KEY", help="Your API key (tuneserve admin create-key)"),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of tables")] = False,
) -> None:
    state = State(api=Api(api, api_key=api_key), json=json_output, out=Console(), err=Console(stderr=True))
    ctx.obj = state
    ctx.call_on_close(state.api.close)


def state_of(ctx: typer.Context) -> State:
    return ctx.obj  # type: ignore[no-any-return]


def print_json(_state: State, value: Any) -> None:
    """Plain JSON on stdout (no rich wrapping): for scripts and `jq`."""
    typer.echo(json.dumps(value, indent=2))


def when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def fmt_number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def key_values(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    return table


def parse_assignment(text: str) -> tuple[str, Any]:
    """`key=value`; the value is JSON when it parses (3e-3, 8, true, ["q_proj"]), else the plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise typer.BadParameter(f"expected key=value, got {text!r}", param_hint="--set")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


# ---- datasets ------------------------------------------------------------------------------------


@datasets_app.command("upload")
@api_errors
def datasets_upload(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, readable=True, help="JSONL: chat, prompt/completion or instruction rows"
        ),
    ],
    test_file: Annotated[
        Path | None, typer.Option("--test-file", exists=True, dir_okay=False, help="The test split, same format")
    ] = None,
    test_fraction: Annotated[
        float | None, typer.Option("--test-fraction", help="Hold out this share of FILE as the test split")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the --test-fraction split")] = None,
) -> None:
    """Upload a dataset; the API validates every line and splits train/test."""
    state = state_of(ctx)
    if test_file is not None and test_fraction is not None:
        raise typer.BadParameter("give either --test-file or --test-fraction, not both", param_hint="--test-fraction")
    if seed is not None and test_fraction is None:
        raise typer.BadParameter("--seed only applies to --test-fraction", param_hint="--seed")
    data = {k: str(v) for k, v in (("test_fraction", test_fraction), ("seed", seed)) if v is not None}
    with file.open("rb") as f:
        files: dict[str, Any] = {"file": (file.name, f.read())}
    if test_file is not None:
        files["test_file"] = (test_file.name, test_file.read_bytes())
    dataset = state.api.post("/datasets", files=files, data=data)
    if state.json:
        return print_json(state, dataset)
    splits = dataset["splits"]
    state.out.print(
        f"dataset [bold]{dataset['id']}[/bold] ({dataset['format']}): "
        f"{splits['train']} train / {splits['test']} test rows ({dataset['split_source']})"
    )


@datasets_app.command("list")
@api_errors
def datasets_list(
    ctx: typer.Context, limit: Annotated[int, typer.Option(help="At most this many, newest first")] = 20
) -> None:
    """List datasets, newest first."""
    state = state_of(ctx)
    page = state.api.get("/datasets", limit=limit)
    if state.json:
        return print_json(state, page)
    table = Table("id", "file", "format", "train", "test", "created")
    for d in page["data"]:
        table.add_row(
            d["id"],
            d["filename"],
            d["format"],
            str(d["splits"]["train"]),
            str(d["splits"]["test"]),
            when(d["created_at"]),
        )
    state.out.print(table)


# ---- jobs ----------------------------------------------------------------------------------------


@jobs_app.command("create")
@api_errors
def jobs_create(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset id")],
    suffix: Annotated[str | None, typer.Option(help="Part of the adapter's name")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", help="Default: the deployment's base model")] = None,
    method: Annotated[str, typer.Option(help="Fine-tuning method")] = "lora",
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="A hyperparameter, key=value (repeatable); evaluation.KEY=value sets the "
            "before/after evaluation, e.g. evaluation.max_examples=50",
        ),
    ] = None,
    no_eval: Annotated[
        bool, typer.Option("--no-eval", help="Skip the before/after evaluation on the test split")
    ] = False,
) -> None:
    """Submit a fine-tuning job (queued until a worker takes it)."""
    state = state_of(ctx)
    hyperparameters: dict[str, Any] = {}
    evaluation: dict[str, Any] = {}
    for item in settings or []:
        key, value = parse_assignment(item)
        if key.startswith("evaluation."):
            evaluation[key.removeprefix("evaluation.")] = value
        else:
            hyperparameters[key] = value
    if no_eval:
        evaluation["enabled"] = False
    body: dict[str, Any] = {"dataset_id": dataset, "method": method, "hyperparameters": hyperparameters}
    for key, value in (("suffix", suffix), ("base_model", base_model), ("evaluation", evaluation or None)):
        if value is not None:
            body[key] = value
    job = state.api.post("/jobs", json=body)
    if state.json:
        return print_json(state, job)
    state.out.print(
        f"job [bold]{job['id']}[/bold] {styled(job['status'])}; follow it with: tuneserve jobs watch {job['id']}"
    )


@jobs_app.command("list")
@api_errors
def jobs_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only jobs in this status")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first")] = 20,
) -> None:
    """List jobs, newest first."""
    state = state_of(ctx)
    page = state.api.get("/jobs", limit=limit, status=status)
    if state.json:
        return print_json(state, page)
    table = Table("id", "status", "progress", "loss", "adapter", "created")
    for j in page["data"]:
        p = j["progress"]
        table.add_row(
            j["id"],
            styled(j["status"]),
            f"{p['step']}/{p['total_steps'] or '?'}",
            fmt_number(j["last_loss"]),
            j["fine_tuned_model"] or "-",
            when(j["created_at"]),
        )
    state.out.print(table)


@jobs_app.command("show")
@api_errors
def jobs_show(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """A job's status, progress, hyperparameters, result and error."""
    state = state_of(ctx)
    job = state.api.get(f"/jobs/{job_id}")
    if state.json:
        return print_json(state, job)
    p = job["progress"]
    progress = f"{p['step']}/{p['total_steps'] or '?'}" + (f" ({p['percent']}%)" if p["percent"] is not None else "")
    rows: list[tuple[str, Any]] = [
        (
            "status",
            styled(job["status"])
            + (" (cancel requested)" if job["cancel_requested"] and job["status"] not in TERMINAL_STATUSES else ""),
        ),
        ("dataset", job["dataset_id"]),
        ("base model", job["base_model"]),
        ("method", job["method"]),
        ("progress", progress),
        ("eta", fmt_seconds(p["eta_seconds"])),
        ("last loss", fmt_number(job["last_loss"])),
        ("trained tokens", job["trained_tokens"]),
        ("adapter", job["fine_tuned_model"]),
        ("attempts", job["attempts"]),
        ("created", when(job["created_at"])),
        ("started", when(job["started_at"])),
        ("finished", when(job["finished_at"])),
        ("hyperparameters", json.dumps(job["hyperparameters"], sort_keys=True)),
    ]
    if job.get("error"):
        e = job["error"]
        rows.append(
            ("error", escape(f"{e['code']}: {e['message']}" + (f" (param: {e['param']})" if e.get("param") else "")))
        )
    evaluation = job.get("evaluation")
    if evaluation:
        rows.append(("evaluation", evaluation["status"]))
        for name, delta in sorted(evaluation.get("delta", {}).items()):
            rows.append(
                (
                    f"  {name}",
                    f"{fmt_number(evaluation['base'].get(name))} -> "
                    f"{fmt_number(evaluation['adapter'].get(name))} ({delta:+.4g})",
                )
            )
    state.out.print(key_values(f"job {job['id']}", rows))


@jobs_app.command("watch")
@api_errors
def jobs_watch(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id")],
    interval: Annotated[float, typer.Option(help="Seconds between polls")] = 1.0,
) -> None:
    """Follow a job live until it ends; exit code 0 if it succeeded, 1 otherwise."""
    state = state_of(ctx)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("eta {task.fields[eta]}"),
    )
    unreachable_since: float | None = None
    with Progress(*columns, console=state.err, transient=False) as progress:
        task = progress.add_task(job_id, total=None, status="...", loss="-", eta="-")
        while True:
            try:
                job = state.api.get(f"/jobs/{job_id}")
                unreachable_since = None
            except ApiError as e:
                if e.status is not None:  # the API answered: the job is gone or the id is wrong
                    raise
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > WATCH_UNREACHABLE_SECONDS:
                    raise
                time.sleep(interval)
                continue
            p = job["progress"]
            progress.update(
                task,
                total=p["total_steps"],
                completed=p["step"],
                status=styled(job["status"]),
                loss=fmt_number(job["last_loss"]),
                eta=fmt_seconds(p["eta_seconds"]),
            )
            if job["status"] in TERMINAL_STATUSES:
                break
            time.sleep(interval)
    if state.json:
        print_json(state, job)
    elif job["status"] == "succeeded":
        state.out.print(
            f"job {job['id']} [green]succeeded[/green]: adapter [bold]{job['fine_tuned_model']}[/bold] "
            f"(final loss {fmt_number(job['last_loss'])})"
        )
    else:
        error = job.get("error") or {}
        reason = escape(f": {error.get('code')}: {error.get('message')}") if error else ""
        state.out.print(f"job {job['id']} {styled(job['status'])}{reason}")
    raise typer.Exit(0 if job["status"] == "succeeded" else 1)


@jobs_app.command("cancel")
@api_errors
def jobs_cancel(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """Ask a job to stop (a running one stops at its next step)."""
    state = state_of(ctx)
    job = state.api.post(f"/jobs/{job_id}/cancel")
    if state.json:
        return print_json(state, job)
    state.out.print(
        f"job {job['id']}: {styled(job['status'])}" + (" (cancel requested)" if job["cancel_requested"] else "")
    )


@jobs_app.command("pause")
@api_errors
def jobs_pause(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """Pause a job at a checkpoint, freeing its worker (a running one pauses at its next step)."""
    state = state_of(ctx)
    job = state.api.post(f"/jobs/{job_id}/pause")
    if state.json:
        return print_json(state, job)
    state.out.print(
        f"job {job['id']}: {styled(job['status'])}" + (" (pause requested)" if job["pause_requested"] else "")
    )


@jobs_app.command("resume")
@api_errors
def jobs_resume(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """Resume a paused job from its last checkpoint."""
    state = state_of(ctx)
    job = state.api.post(f"/jobs/{job_id}/resume")
    if state.json:
        return print_json(state, job)
    state.out.print(f"job {job['id']}: {styled(job['status'])}")


def optional_report(state: State, job_id: str) -> dict[str, Any] | None:
    """The job's before/after report, or None when this API or this job has none."""
    try:
        return state.api.get(f"/jobs/{job_id}/report")  # type: ignore[no-any-return]
    except ApiError as e:
        if e.status in (404, 409):
            return None
        raise


@jobs_app.command("plot")
@api_errors
def jobs_plot(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image file (.png, .svg, .pdf)")] = Path("loss.png"),
) -> None:
    """Plot the training loss over steps (and the test loss before/after, if the job was evaluated)."""
    state = state_of(ctx)
    job = state.api.get(f"/jobs/{job_id}")
    events = list(state.api.pages(f"/jobs/{job_id}/events", limit=1000))
    curve = loss_curve(job, events, optional_report(state, job_id))
    if not curve.train:
        fail(ApiError(f"job {job_id} has no loss events yet (status {job['status']})"))
    save_loss_plot(curve, output)
    extra = (
        f"; test loss {fmt_number(curve.test_base)} -> {fmt_number(curve.test_adapter)}"
        if curve.test_adapter is not None
        else ""
    )
    state.out.print(f"wrote {output} ({len(curve.train)} training points{extra})")


# ---- adapters ------------------------------------------------------------------------------------


@adapters_app.command("list")
@api_errors
def adapters_list(
    ctx: typer.Context, limit: Annotated[int, typer.Option(help="At most this many, newest first")] = 20
) -> None:
    """List adapters, newest first."""
    state = state_of(ctx)
    page = state.api.get("/adapters", limit=limit)
    if state.json:
        return print_json(state, page)
    table = Table("name", "job", "method", "rank", "alpha", "status", "servable", "created")
    for a in page["data"]:
        table.add_row(
            a["name"],
            a["job_id"] or "-",
            a["method"],
            str(a["rank"]),
            fmt_number(a["alpha"]),
            a["status"],
            "yes" if a["servable"] else f"no: {a['servable_reason']}",
            when(a["created_at"]),
        )
    state.out.print(table)


@adapters_app.command("show")
@api_errors
def adapters_show(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Adapter name")]) -> None:
    """An adapter's configuration and its files with their sha256."""
    state = state_of(ctx)
    a = state.api.get(f"/adapters/{name}")
    if state.json:
        return print_json(state, a)
    state.out.print(
        key_values(
            f"adapter {a['name']}",
            [
                ("job", a["job_id"]),
                ("base model", a["base_model"]),
                ("method", a["method"]),
                ("rank", a["rank"]),
                ("alpha", a["alpha"]),
                ("target modules", ", ".join(a["target_modules"])),
                ("status", a["status"]),
                ("servable", "yes" if a["servable"] else f"no: {a['servable_reason']}"),
                ("size", f"{a['size_bytes']} bytes"),
                ("parent", a.get("parent")),
                ("scale", a.get("scale")),
                ("created", when(a["created_at"])),
            ],
        )
    )
    files = Table("file", "sha256")
    for file_name, digest in sorted(a["files"].items()):
        files.add_row(file_name, digest)
    state.out.print(files)


# ---- generation and evaluation -------------------------------------------------------------------


@app.command("generate")
@api_errors
def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt")],
    adapter: Annotated[str | None, typer.Option(help="Adapter name; none: the base model")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="At most this many new tokens")] = None,
    temperature: Annotated[float | None, typer.Option(help="0: greedy")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message (chat template)")] = False,
) -> None:
    """Generate with the base model, or with an adapter on it."""
    state = state_of(ctx)
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    for key, value in (("max_tokens", max_tokens), ("temperature", temperature)):
        if value is not None:
            body[key] = value
    try:
        result = state.api.post("/generate", params={"adapter": adapter} if adapter else None, json=body)
    except ApiError as e:
        if e.status == 503:
            later = f"; retry in {e.retry_after} s" if e.retry_after else ""
            fail(ApiError(f"serving is not available: {e.message}{later}", status=503, code=e.code, param=e.param))
        raise
    if state.json:
        return print_json(state, result)
    state.out.print(result["text"], highlight=False, markup=False)
    usage = result.get("usage") or {}
    state.err.print(
        f"[dim]{result['model']}{' + ' + result['adapter'] if result.get('adapter') else ''}: "
        f"{usage.get('completion_tokens', '?')} tokens, finish {result.get('finish_reason')}[/dim]"
    )


@eval_app.command("report")
@api_errors
def eval_report(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """The job's base model vs adapter on the test split, metric by metric."""
    state = state_of(ctx)
    try:
        report = state.api.get(f"/jobs/{job_id}/report")
    except ApiError as e:
        if e.status == 404 and e.param is None and e.message == "Not Found":  # the route, not the job, is missing
            fail(ApiError("this API has no evaluation reports (GET /jobs/{id}/report is not there)", status=404))
        raise
    if state.json:
        return print_json(state, report)
    summary = report["evaluation"]
    state.out.print(
        f"job {report['job_id']} ({styled(report['job_status'])}), adapter {report['adapter'] or '-'}: "
        f"evaluation {styled(summary['status'])} on the {report['split']} split "
        f"({report['n_examples'] if report['n_examples'] is not None else '?'} examples)"
    )
    if not report["metrics"]:
        state.out.print(
            "no metrics yet"
            if summary["status"] in ("pending", "queued", "running")
            else "no metrics (the evaluation was disabled, failed, or the dataset has no test split)"
        )
        return
    title = f"adapter scale {report['adapter_scale']}" if report["adapter_scale"] not in (None, 1.0) else None
    table = Table("metric", "base", "adapter", "delta", "", title=title)
    for m in report["metrics"]:
        mark = {True: "[green]better[/]", False: "[red]worse[/]", None: ""}[m["improved"]]
        delta = "-" if m["delta"] is None else f"{m['delta']:+.4g}"
        table.add_row(
            m["name"] + (" (lower is better)" if m["lower_is_better"] else ""),
            fmt_number(m["base"]),
            fmt_number(m["adapter"]),
            delta,
            mark,
        )
    state.out.print(table)
    if len(report["scale_sweep"]) > 1:
        names = sorted({k for r in report["scale_sweep"] for k in r["metrics"]})
        sweep = Table("scale", *names, title="adapter scale sweep")
        for r in report["scale_sweep"]:
            sweep.add_row(str(r["scale"]), *(fmt_number(r["metrics"].get(n)) for n in names))
        state.out.print(sweep)
    if report["examples"]:
        examples = Table("prompt", "reference", "base", "adapter", title="examples")
        for ex in report["examples"]:
            examples.add_row(ex["prompt"][-80:], ex["reference"], ex["base"], ex["adapter"])
        state.out.print(examples)


def main() -> None:
    """The `tuneserve` console script."""
    app()
