"""Thin click layer: parse, call :mod:`rotator.service`, render with rich or as ``--json``.

Heavy modules (SQLAlchemy, the engine, provider SDKs) are imported inside the commands so that
``rotator --help`` stays fast. Exit codes: 0 success, 1 a rotation failed, 2 bad usage or
configuration.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from rotator import __version__

if TYPE_CHECKING:
    from rotator.config import Policies

EXIT_FAILED = 1
EXIT_USAGE = 2
_FAST_EXIT = False
"""Set by one-shot commands (status, plan, history, check, rotate-now, audit) whose resources
are all closed when they return: they may skip the interpreter's teardown."""

CONFIG_HELP = "Policy file (default ./rotation-policies.toml, or $ROTATOR_CONFIG)."


def _config_or_global(ctx: click.Context, _param: click.Parameter, value: str | None
                      ) -> str | None:
    """``-c`` after the subcommand, else the one given before it (``rotator -c F check``)."""
    return value if value is not None else ctx.find_root().params.get("config_path")


def _verbose(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        from rotator.log import setup_logging

        setup_logging(logging.DEBUG)


verbose_option = click.option("-v", "--verbose", is_flag=True, expose_value=False,
                              callback=_verbose, help="Log debug details to stderr.")


def config_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-c/--config`` and ``-v/--verbose``, accepted after the subcommand as before it."""
    fn = click.option("-c", "--config", "config_path", metavar="PATH", default=None,
                      callback=_config_or_global, help=CONFIG_HELP)(fn)
    return verbose_option(fn)


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Machine-readable output (documented, stable).")


def filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``[NAME]... [--agent A] [--provider P]``: only those credentials (default: all)."""
    fn = click.option("--provider", help="Only the credentials of this provider.")(fn)
    fn = click.option("--agent", help="Only the credentials this agent consumes.")(fn)
    return click.argument("names", nargs=-1)(fn)


def _select(policies: Policies, names: tuple[str, ...], agent: str | None,
            provider: str | None, **kw: Any) -> set[str]:
    """The names of the credentials the filters pick; a typo exits 2 saying what was meant."""
    from rotator.selection import SelectionError, select_credentials

    try:
        return {c.name for c in select_credentials(policies, names, agent, provider, **kw)}
    except SelectionError as exc:
        _fail(str(exc))


def _print_table(table: Any) -> None:
    """A table at its full width, like kubectl: ids and names are what an operator copies into
    the next command, so none is ever cut; a narrow terminal wraps the lines instead."""
    console = _console()
    needed = _console(width=100_000).measure(table).maximum  # measured unbounded
    if needed > console.width:
        console = _console(width=needed)
    console.print(table)


PLAIN_TABLE_ROWS = 300
"""Above this many rows, ``status`` and ``plan`` print a plain fixed-width table: rich
measures and draws every cell twice (10,000 rows took 10-25 s), for borders nobody reads at
that length."""

Cell = str | tuple[str, str]
"""A table cell: its text, or its text and the rich markup to show it with."""


def _print_rows(title: str, columns: tuple[str, ...], rows: list[list[Cell]]) -> None:
    """A table through rich, or plain above ``PLAIN_TABLE_ROWS`` rows (the same columns and
    text, left-aligned, two spaces apart, without styles)."""
    if len(rows) <= PLAIN_TABLE_ROWS:
        from rich.table import Table

        table = Table(title=title)
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*(_esc(cell) if isinstance(cell, str) else cell[1]
                            for cell in row))
        _print_table(table)
        return
    texts = [list(columns), *([c if isinstance(c, str) else c[0] for c in row]
                              for row in rows)]
    widths = [max(map(len, column)) for column in zip(*texts, strict=True)]
    last = len(widths) - 1
    lines = [title, "  ".join(c.ljust(w) if i < last else c
                              for i, (c, w) in enumerate(zip(columns, widths, strict=True))),
             "  ".join("-" * w for w in widths)]
    for cells in texts[1:]:
        lines.append("  ".join(c.ljust(w) if i < last else c
                               for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _console(stderr: bool = False, width: int | None = None) -> Any:
    from rich.console import Console

    class _QuietOnClosedPipe(Console):
        def on_broken_pipe(self) -> None:  # rich's own exits 1: "a rotation failed" here
            self.quiet = True
            sys.exit(_closed_pipe())

    stream = sys.stderr if stderr else sys.stdout
    # A pipe or a log file gets the whole table rather than 80 columns of ellipses.
    if width is None and not stream.isatty():
        width = 250
    return _QuietOnClosedPipe(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"rotator: {message}", err=True)
    sys.exit(code)


def _load(config_path: str | None) -> Policies:
    """Load and validate the policy file, or print every problem and exit 2."""
    from rotator.config import load_policies, resolve_config_path
    from rotator.errors import ConfigError

    try:
        policies = load_policies(resolve_config_path(config_path))
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        click.echo(f"rotator: {len(exc.problems)} problem(s); nothing was changed", err=True)
        sys.exit(EXIT_USAGE)
    # The policies live as long as the process: keep the cyclic garbage collector from
    # walking their objects again on each collection (at 10,000 credentials that was half
    # of the due gate's time in `status` and `plan`).
    gc.freeze()
    return policies


def _one_shot() -> None:
    global _FAST_EXIT
    _FAST_EXIT = True


def _guard(fn: Callable[[], int | None]) -> None:
    """Run a command body; a known error is one clean line, never a traceback."""
    from rotator.errors import PermanentError, RotatorError

    try:
        code = fn()
    except PermanentError as exc:
        _fail(str(exc), EXIT_USAGE)
    except RotatorError as exc:
        _fail(str(exc), EXIT_FAILED)
    sys.exit(code or 0)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _warn(lines: list[str]) -> None:
    """Warnings on stderr, one line each, so that stdout stays the table or the JSON."""
    for line in lines:
        click.echo(f"warning: {line}", err=True)


def _note(line: str) -> None:
    """Context for the output, on stderr: stdout stays the table or the JSON."""
    click.echo(f"note: {line}", err=True)


def _now() -> datetime:
    return datetime.now(UTC)


def _ago(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    from rotator.durations import format_duration

    return format_duration(timedelta(seconds=max(seconds, 0)))


def _esc(text: object) -> str:
    """Stored or user text shown through rich, with its brackets taken literally."""
    from rich.markup import escape

    return escape("" if text is None else str(text))


def _when(iso: str | None) -> str:
    return iso.replace("T", " ")[:16] + " UTC" if iso else "-"


class _Rotator(click.Group):
    """The ``rotator`` group: a reader that goes away (``rotator audit export | head``) ends
    the command quietly with exit 0, as with cat, not with click's exit 1 (which here means a
    rotation failed)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            sys.exit(_closed_pipe())


@click.group(cls=_Rotator, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rotator")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details to stderr.")
@click.option("-c", "--config", "config_path", metavar="PATH", default=None, help=CONFIG_HELP)
def main(verbose: bool, config_path: str | None) -> None:
    """rotator: rotates the API keys an AI-agent fleet depends on, with no outage."""
    from rotator.log import setup_logging

    setup_logging(logging.DEBUG if verbose else logging.WARNING)


@main.command()
@config_option
def run(config_path: str | None) -> None:
    """Run the daemon: rotate due credentials, resume interrupted ones, reload on SIGHUP."""
    import signal

    # Until the daemon's own handlers are in place, a SIGTERM must still mean "stop cleanly".
    early: dict[str, str] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda num, _f: early.setdefault("stop", signal.Signals(num).name))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    from rotator.config import resolve_config_path
    from rotator.log import setup_logging
    from rotator.scheduling import open_daemon

    policies = _load(config_path)
    if logging.getLogger().level > logging.INFO:
        setup_logging(logging.INFO)

    def body() -> int:
        daemon = open_daemon(resolve_config_path(config_path), policies,
                             lambda: "stop" in early)
        if daemon is None:
            return 0
        daemon.install_signal_handlers()
        if "stop" in early:
            daemon.stop(early["stop"])
        daemon.run()
        return 0

    _guard(body)


@main.command()
@config_option
@json_option
@click.option("--online", is_flag=True,
              help="Also reach every vault and provider and check rotator's own access.")
@click.option("--strict", is_flag=True,
              help="Questionable settings (grace not shorter than interval, ...) are errors.")
def check(config_path: str | None, online: bool, strict: bool, as_json: bool) -> None:
    """Validate the policy file (exit 0), or print each problem with its place (exit 2)."""
    _one_shot()
    from rotator.config import Problem, load_policies, resolve_config_path
    from rotator.errors import ConfigError

    source = resolve_config_path(config_path)
    try:
        policies = load_policies(source)
    except ConfigError as exc:
        _check_report(str(source), [str(p) for p in exc.problems], [], [], as_json)
    from rotator.policy_lint import policy_warnings

    # (place, message): printed "place: warning: message", or as a problem with --strict.
    warnings = [(str(Problem(w.file, w.line, w.key, "")).removesuffix(": "), w.message)
                for w in policy_warnings(policies)]
    problems: list[str] = []
    if online:
        from rotator.runtime import Runtime
        from rotator.service import find_leftovers, online_check, reading_store

        runtime = Runtime(policies)
        try:
            failed: set[str] = set()  # reported with their reason already
            problems = [f"{policies.source}: {p}" for p in online_check(policies, runtime,
                                                                        failed)]
            with reading_store(policies) as store:
                report = find_leftovers(policies, runtime, store, skip=failed)
        finally:
            runtime.close()
        warnings += [(str(policies.source), line) for line in
                     [o.describe() for o in report.leftovers] + report.unchecked(failed)]
    if strict:
        problems += [f"{place}: {message}" for place, message in warnings]
        warnings = []
    summary = (f"{len(policies.credentials)} credential(s), {len(policies.providers)} "
               f"provider(s), {len(policies.vaults)} vault(s)"
               + (", all reachable" if online and not problems else ""))
    _check_report(str(policies.source), problems, warnings, [summary], as_json)


def _check_report(source: str, problems: list[str], warnings: list[tuple[str, str]],
                  summary: list[str], as_json: bool) -> NoReturn:
    """``check``'s verdict: exit 0 with the summary, or 2 with every problem."""
    shown = [f"{place}: warning: {message}" for place, message in warnings]
    if as_json:
        _print_json({"file": source, "ok": not problems, "problems": problems,
                     "warnings": shown, "summary": summary[0] if summary else None})
        sys.exit(EXIT_USAGE if problems else 0)
    for line in shown:
        click.echo(line, err=True)
    for line in problems:
        click.echo(line, err=True)
    if problems:
        click.echo(f"rotator: {len(problems)} problem(s) in {source}: fix them and run "
                   "`rotator check` again", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"{source}: OK: {summary[0]}")
    sys.exit(0)


@main.command()
@config_option
@json_option
@filter_options
def status(config_path: str | None, as_json: bool, names: tuple[str, ...], agent: str | None,
           provider: str | None) -> None:
    """One row per credential: agent, provider, key age, last rotation, next due, step."""
    _one_shot()
    policies = _load(config_path)
    chosen = _select(policies, names, agent, provider)

    def body() -> int:
        from rotator.service import (
            find_leftovers,
            leftovers_by_row,
            reading_context,
            status_rows,
        )

        with reading_context(policies, _note) as ctx:
            rows = [r for r in status_rows(ctx, _now()) if r["credential"] in chosen]
            report = find_leftovers(ctx.policies, ctx.runtime, ctx.store)
        # The JSON stays a list of rows (scripts index it): each row gains staged_leftovers;
        # what belongs to no row, and the vaults that could not be listed, go to stderr.
        orphans = leftovers_by_row(rows, report, policies)
        if as_json:
            _print_json(rows)
            _warn([o.describe() for o in orphans] + report.unchecked())
            return 0
        cells: list[list[Cell]] = []
        for r in rows:
            outcome = r["last_outcome"] or "-"
            style = {"success": "green", "failed": "red", "rolled_back": "yellow"}.get(outcome)
            cells.append([r["credential"], r["agent"], r["provider"], r["key_id"] or "-",
                          _ago(r["key_age_seconds"]), _when(r["last_rotated_at"]),
                          (outcome, f"[{style}]{outcome}[/]") if style else outcome,
                          _when(r["next_due_at"]) + (f" ({r['due_reason']})"
                                                     if r["due_reason"] else ""),
                          _rotating(r)])
        _print_rows(f"{len(rows)} credential(s)",
                    ("credential", "agent", "provider", "key id", "key age", "last rotation",
                     "outcome", "next due", "rotating / old keys still valid"), cells)
        _warn(report.warnings())
        return 0

    _guard(body)


@main.command()
@config_option
@json_option
@click.option("--within", default="30d", show_default=True, metavar="DURATION",
              help="How far ahead to look.")
@click.option("--all", "everything", is_flag=True,
              help="Every credential, with why it is or is not due (manual-only ones too).")
@filter_options
def plan(config_path: str | None, as_json: bool, within: str, everything: bool,
         names: tuple[str, ...], agent: str | None, provider: str | None) -> None:
    """What will rotate when, and why (the due gate's reason code)."""
    _one_shot()
    from rotator.durations import parse_duration

    try:
        horizon = parse_duration(within)
    except ValueError as exc:
        _fail(f"--within: {exc}")
    policies = _load(config_path)
    chosen = _select(policies, names, agent, provider)

    def body() -> int:
        from rotator.service import plan_rows, reading_context

        with reading_context(policies, _note) as ctx:
            rows = [r for r in plan_rows(ctx, _now(), horizon, everything)
                    if r["credential"] in chosen]
        if as_json:
            _print_json(rows)
            return 0
        title = ("every credential" if everything
                 else f"rotations due within {within}") + f": {len(rows)}"
        cells: list[list[Cell]] = []
        for r in rows:
            due: Cell = _when(r["due_at"]) if r["due_at"] else "never (manual)"
            if r["due_now"]:
                due = (f"{due} (overdue: rotates now)", f"{due} [red](overdue: rotates now)[/]")
            cells.append([due, r["credential"], r["agent"], r["provider"], r["reason"],
                          r["message"]])
        _print_rows(title, ("due", "credential", "agent", "provider", "reason", "why"), cells)
        return 0

    _guard(body)


@main.command("rotate-now")
@config_option
@click.argument("names", nargs=-1)
@click.option("--agent", help="Every credential this agent consumes.")
@click.option("--provider", help="Every credential of this provider.")
@click.option("--all", "all_", is_flag=True, help="Every credential in the policy file.")
@click.option("--revoke-immediately", is_flag=True,
              help="Skip the grace period: the old key dies as soon as the new one is live.")
@click.option("--revoke-first", is_flag=True,
              help="Kill the old key before anything else (a key being abused right now).")
@click.option("--reason", help="Why: recorded in the history and the audit trail.")
@click.option("--dry-run", is_flag=True, help="Show what would rotate; change nothing.")
@click.option("--concurrency", type=click.IntRange(1, 256), metavar="N",
              help="Rotations at once (default: max_concurrent_rotations). Each provider's "
                   "calls are paced to the rate it allows, however many run.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
def rotate_now(config_path: str | None, names: tuple[str, ...], agent: str | None,
               provider: str | None, all_: bool, revoke_immediately: bool, revoke_first: bool,
               reason: str | None, dry_run: bool, concurrency: int | None, yes: bool,
               as_json: bool) -> None:
    """Rotate now: for emergency revocation runbooks. Exits 1 if any rotation failed."""
    _one_shot()
    chosen_ways = sum([bool(names), agent is not None, provider is not None, all_])
    if chosen_ways != 1:
        _fail("say what to rotate: NAME..., --agent A, --provider P or --all (exactly one)")
    if revoke_immediately and revoke_first:
        _fail("--revoke-immediately and --revoke-first exclude each other")
    mode = "first" if revoke_first else "immediately" if revoke_immediately else "grace"
    policies = _load(config_path)
    if concurrency is not None:  # an emergency may need more workers than the daemon uses
        policies = policies.model_copy(update={"settings": policies.settings.model_copy(
            update={"max_concurrent_rotations": concurrency})})
    chosen = _select(policies, names, agent, provider, all_=all_)
    creds = [c for c in policies.credentials if c.name in chosen]
    err = _console(stderr=True)
    mode_text = {"grace": "old keys revoked after their grace period",
                 "immediately": "old keys revoked as soon as the new ones are live",
                 "first": "old keys revoked FIRST (agents may fail until the new key is stored)"}
    if dry_run:
        _dry_run(policies, creds, mode, mode_text[mode], as_json)
    if not yes:
        if not sys.stdin.isatty():
            _fail(f"about to rotate {len(creds)} credential(s) with no terminal to confirm; "
                  "pass --yes")
        err.print(f"About to rotate {len(creds)} credential(s): "
                  + _esc(", ".join(c.name for c in creds[:10]))
                  + (" ..." if len(creds) > 10 else ""))
        err.print(f"Mode: {mode_text[mode]}.")
        if not click.confirm("Proceed?", err=True):
            _fail("nothing rotated", EXIT_USAGE)

    if logging.getLogger().level > logging.DEBUG:
        # Each credential's lines below say the failed step and its cause, and a key to revoke
        # by hand, once: the engine's log lines saying the same are dropped (-v keeps them).
        logging.getLogger("rotator.engine").addFilter(
            lambda record: not getattr(record, "in_result", False))

    def body() -> int:
        from rotator.key_report import key_report
        from rotator.service import open_context
        from rotator.service import rotate_now as do_rotate

        out = _console()
        by_name = {c.name: c for c in creds}
        reports: list[dict[str, Any]] = []
        progress = _Progress(len(creds), enabled=not as_json and len(creds) > 1
                             and sys.stderr.isatty())

        with open_context(policies) as ctx:
            if agent is not None and policies.proxy is not None:
                # The agent may be compromised: its proxy tokens die with its keys.
                from rotator.proxy.runner import revoke

                revoke(ctx, agent, reason or "rotate-now --agent")
                err.print(f"proxy tokens of {_esc(agent)} revoked")

            def on_result(result: Any) -> None:
                report = key_report(ctx.store, ctx.runtime, by_name[result.credential], result)
                reports.append(report)
                progress.clear()
                if not as_json:
                    for line in _leak_lines(report):
                        out.print(line)
                progress.done(ok=result.ok)

            do_rotate(ctx, creds, revoke_mode=mode, reason=reason, on_result=on_result)
        progress.clear()
        order = {c.name: i for i, c in enumerate(creds)}
        reports.sort(key=lambda r: order[r["credential"]])
        failed = [r["credential"] for r in reports if r["outcome"] != "success"]
        if as_json:
            _print_json({"rotations": reports, "succeeded": len(reports) - len(failed),
                         "failed": len(failed)})
        else:
            click.echo(f"{len(reports) - len(failed)} rotated, {len(failed)} failed"
                       + (f": {', '.join(failed)}" if failed else ""))
        return EXIT_FAILED if failed else 0

    _guard(body)


def _rotating(row: dict[str, Any]) -> str:
    """The status table's last column: the step under way and who runs it, and every old key
    still valid (so which keys are live is never a guess)."""
    parts = []
    step = row["rotating_step"] if row["rotating_step"] != "grace" else None
    if step or row["rotating_on"]:
        parts.append(" on ".join(filter(None, (step, row["rotating_on"]))))
    for old in row["old_keys"]:
        if old["fate"] == "revoke_failing":
            parts.append(f"old key {old['key_id']} STILL VALID: revoking it failed, next try "
                         f"{_clock(old['retry_at'])}")
        else:
            parts.append(f"old key {old['key_id']} valid until {_clock(old['revoke_after'])}")
    return "; ".join(parts) or "-"


def _dry_run(policies: Policies, creds: list[Any], mode: str, mode_text: str,
             as_json: bool) -> NoReturn:
    """``rotate-now --dry-run``: a read-only preflight of each rotation; exit 1 if any would
    fail, saying why."""
    from rotator.runtime import Runtime
    from rotator.service import preflight

    runtime = Runtime(policies)
    try:
        problems = preflight(runtime, creds)
    finally:
        runtime.close()
    rows = [{"credential": c.name, "agent": c.agent, "provider": c.provider,
             "revoke_mode": mode, "grace_seconds": int(c.grace.total_seconds()),
             "ready": not problems[c.name], "problems": problems[c.name]} for c in creds]
    failing = [r for r in rows if not r["ready"]]
    if as_json:
        _print_json({"dry_run": True, "rotations": rows, "ready": len(rows) - len(failing),
                     "would_fail": len(failing)})
    else:
        for r in rows:
            what = f"{r['credential']} (agent {r['agent']}, provider {r['provider']})"
            if r["ready"]:
                click.echo(f"would rotate {what}: ready")
                continue
            click.echo(f"would FAIL {what}:")
            for problem in r["problems"]:
                click.echo(f"    {problem}")
        click.echo(f"{len(rows)} credential(s), {len(failing)} would fail; {mode_text}; "
                   "nothing changed (dry run: secrets read, access checked, nothing written)")
    sys.exit(EXIT_FAILED if failing else 0)


def _clock(iso: str | None) -> str:
    """``2026-12-05T08:41:02.1Z`` -> ``2026-12-05 08:41:02 UTC``."""
    return iso.replace("T", " ")[:19] + " UTC" if iso else "-"


def _leak_lines(r: dict[str, Any]) -> list[str]:
    """One credential's result as an operator reads it after a leak: the new key, the old
    key's fate, or the step that failed with its root cause, once."""
    marks = {"success": "[green]✓[/]", "rolled_back": "[yellow]↺[/]",
             "skipped": "[yellow]…[/]", "interrupted": "[yellow]…[/]"}
    head = f"{marks.get(r['outcome'], '[red]✗[/]')} {_esc(r['credential'])} (agent " \
           f"{_esc(r['agent'])})"
    lines = []
    if r["outcome"] == "success":
        lines.append(f"{head}: new key {_esc(r['new_key_id'])} is current")
    elif r["failed_step"]:
        lines.append(f"{head}: {r['outcome']} at step {r['failed_step']}: {_esc(r['cause'])}")
        rest = r["message"].removeprefix(r["cause"] or "").lstrip("; ")
        if rest and rest != r["cause"]:
            lines.append(f"    then: {_esc(rest)}")
    else:
        lines.append(f"{head}: {r['outcome']}: {_esc(r['message'])}")
    old = r["old_key"]
    if old is not None:
        key = _esc(old["key_id"] or "")
        fate = old["fate"]
        if fate == "revoked":
            dead = ", checked dead at the provider" if old["verified_dead"] else ""
            lines.append(f"    old key {key}: revoked at {_clock(old['revoked_at'])}{dead}")
        elif fate == "handed_over":
            lines.append(f"    old key {key}: shared with credentials that still use it; "
                         "revoked when the last of them has rotated")
        elif fate == "in_grace":
            lines.append(f"    old key {key}: still valid until {_clock(old['revoke_after'])} "
                         "(its grace), then revoked")
        elif fate == "revoke_failing":
            lines.append(f"    [red]old key {key}: STILL VALID[/], revoking it failed "
                         f"({old['attempts']} attempt(s)): {_esc(old['error'])}; next try "
                         f"{_clock(old['retry_at'])}")
        elif fate == "manual":
            lines.append(f"    [bold red]ACTION NEEDED[/] old key: {_esc(old['action'])}")
        elif fate == "current":
            lines.append(f"    old key {key}: still the agent's key (not revoked)")
    return lines


class _Progress:
    """``[n/N] f failed, Ns`` on stderr for a batch on a terminal; nothing when piped."""

    def __init__(self, total: int, enabled: bool) -> None:
        import time

        self.total, self.enabled, self.finished, self.failed = total, enabled, 0, 0
        self._started = time.monotonic()
        self._shown = False
        self._lock = threading.Lock()
        self.show()

    def show(self) -> None:
        import time

        if self.enabled:
            elapsed = time.monotonic() - self._started
            sys.stderr.write(f"\r\033[K[{self.finished}/{self.total}] {self.failed} failed, "
                             f"{elapsed:.0f}s elapsed")
            sys.stderr.flush()
            self._shown = True

    def clear(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._shown = False

    def done(self, ok: bool) -> None:
        with self._lock:
            self.finished += 1
            self.failed += 0 if ok else 1
            if self.finished < self.total:
                self.show()


@main.command()
@config_option
@json_option
@filter_options
@click.option("--limit", default=50, show_default=True, help="How many rotations to show.")
def history(config_path: str | None, as_json: bool, names: tuple[str, ...], agent: str | None,
            provider: str | None, limit: int) -> None:
    """Past rotations with their steps, durations, outcomes and reasons (newest first)."""
    _one_shot()
    policies = _load(config_path)
    _select(policies, (), agent, provider)  # names are checked against the store too, below

    def body() -> int:
        from rotator.service import history_rows, open_context

        with open_context(policies, create=False) as ctx:
            # A credential since removed from the file still has its history.
            gone = [n for n in names if ctx.store.rotations(n, limit=1)]
            chosen = _select(policies, names, agent, provider, allow_unknown=gone)
            if not names and not agent and not provider:
                rows = history_rows(ctx, None, limit)
            else:
                rows = history_rows(ctx, sorted(chosen | set(gone)), limit)
        if as_json:
            _print_json(rows)
            return 0
        from rich.table import Table

        table = Table(title=f"{len(rows)} rotation(s)")
        for col in ("started", "credential", "rotation", "trigger", "outcome", "took",
                    "old key -> new key", "steps", "reason / error"):
            table.add_column(col)
        for r in rows:
            steps = " ".join(f"{s['step']}{'' if s['status'] == 'succeeded' else '!'}"
                             for s in r["steps"])
            took = f"{r['duration_seconds']:.1f}s" if r["duration_seconds"] is not None else "-"
            table.add_row(_when(r["started_at"]), _esc(r["credential"]), r["rotation_id"],
                          r["trigger"], r["outcome"] or r["status"], took,
                          _esc(f"{r['old_key_id'] or '-'} -> {r['new_key_id'] or '-'}"), steps,
                          _esc(r["error"] or r["reason"] or ""))
        _print_table(table)
        return 0

    _guard(body)


@main.command()
@config_option
@json_option
@filter_options
@click.option("--since", default="24h", show_default=True, metavar="TIME|DURATION",
              help="From when: an ISO time, or a duration meaning that long ago.")
@click.option("--until", default=None, metavar="TIME|DURATION",
              help="Up to when (default now): an ISO time, or a duration meaning that long ago.")
@click.option("--width", type=click.Choice(["1m", "1h", "1d"]), default="1h",
              show_default=True, help="Bucket width.")
@click.option("--key-id", metavar="KEY", help="Only this key (an id from status or history).")
def usage(config_path: str | None, as_json: bool, names: tuple[str, ...], agent: str | None,
          provider: str | None, since: str, until: str | None, width: str,
          key_id: str | None) -> None:
    """What each key did (current, old, revoked), per bucket, from the provider's records.

    Step 3 of the leak runbook: a key's calls after it was replaced are not its agent's."""
    _one_shot()
    policies = _load(config_path)
    chosen = _select(policies, names, agent, provider)
    creds = [c for c in policies.credentials if c.name in chosen]
    start = _parse_since(since)
    end = _parse_since(until, "--until") if until is not None else _now()
    if end <= start:
        _fail("--until must be after --since")

    def body() -> int:
        from rotator.key_usage import WIDTHS, usage_of
        from rotator.service import open_context

        with open_context(policies, create=False) as ctx:
            keys = usage_of(ctx.runtime, ctx.store, creds, start, end, WIDTHS[width],
                            key_id=key_id)
        if key_id is not None and not keys:
            _fail(f"--key-id: {key_id} is not a key rotator knows for the credentials chosen "
                  "(`rotator history` lists old and new key ids)")
        if as_json:
            _print_json({"since": start.isoformat().replace("+00:00", "Z"), "width": width,
                         "keys": [k.as_json() for k in keys]})
            return 0
        from rich.table import Table

        table = Table(title=f"usage since {_when(start.isoformat())}, {width} buckets")
        for col in ("credential", "key", "role", "bucket", "requests", "tokens", "note"):
            table.add_column(col)
        for k in keys:
            role = k.role + (f" (replaced {_when(k.replaced_at.isoformat())})"
                             if k.replaced_at else "")
            if not k.buckets:
                table.add_row(_esc(k.credential), _esc(k.key_id), role, "-", "0", "-", "")
            for b in k.buckets:
                after = k.replaced_at is not None and b.start >= k.replaced_at
                table.add_row(_esc(k.credential), _esc(k.key_id), role,
                              _when(b.start.isoformat()),
                              str(b.requests) if b.requests is not None else "-",
                              str(b.tokens) if b.tokens is not None else "-",
                              "[bold red]after replacement: not its agent[/]" if after else "")
        _print_table(table)
        misused = [k for k in keys if k.used_after_replacement()]
        if misused:
            _warn([f"{k.credential}: key {k.key_id} made {k.used_after_replacement()} "
                   f"request(s) after it was replaced: someone else holds it"
                   for k in misused])
        return 0

    _guard(body)


@main.group()
def audit() -> None:
    """The audit trail: check its hash chain, export it as JSON lines."""


def _open_store(policies: Policies) -> Any:
    from rotator.state.store import StateStore

    return StateStore(policies.settings.state_url, create=False)


@audit.command("verify")
@config_option
@json_option
def audit_verify(config_path: str | None, as_json: bool) -> None:
    """Recompute the hash chain; exit 1 naming the first edited, deleted or moved event."""
    _one_shot()
    policies = _load(config_path)

    def body() -> int:
        from rotator.audit import AuditLog

        store = _open_store(policies)
        try:
            result = AuditLog(store).verify()
        finally:
            store.close()
        if as_json:
            _print_json({"ok": result.ok, "checked": result.checked,
                         "first_bad_id": result.first_bad_id, "problem": result.problem})
        elif result.ok:
            click.echo(f"audit trail OK: {result.checked} events")
        else:
            click.echo(f"audit trail BROKEN at event {result.first_bad_id}: {result.problem} "
                       f"({result.checked - 1} events before it verified)")
        return 0 if result.ok else EXIT_FAILED

    _guard(body)


def _parse_since(text: str, option: str = "--since") -> datetime:
    """An ISO time (naive means UTC) or a duration meaning that long ago (``7d``)."""
    from rotator.durations import parse_duration

    try:
        return _now() - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        _fail(f"{option}: {text!r} is neither an ISO time (2026-11-01T00:00:00Z) nor a "
              "duration meaning that long ago (7d, 12h)")
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@audit.command("export")
@config_option
@click.option("--since", metavar="TIME|DURATION",
              help="Only events at or after this ISO time, or this long ago (7d, 12h).")
@click.option("--credential", metavar="NAME", help="Only events of this credential.")
@click.option("-o", "--output", metavar="FILE", default="-", show_default=True,
              help="Write the JSON lines here instead of stdout.")
def audit_export(config_path: str | None, since: str | None, credential: str | None,
                 output: str) -> None:
    """Write the audit trail as JSON lines (one event per line), for a SIEM."""
    _one_shot()
    start = _parse_since(since) if since else None
    policies = _load(config_path)

    def body() -> int:
        from rotator.audit import AuditLog

        store = _open_store(policies)
        try:
            with click.open_file(output, "w", encoding="utf-8") as out:
                for event in AuditLog(store).export(start, credential):
                    out.write(json.dumps(event, ensure_ascii=False) + "\n")
        except BrokenPipeError:
            raise
        except OSError as exc:
            _fail(f"-o {output}: {exc.strerror or exc}")
        finally:
            store.close()
        return 0

    _guard(body)


@main.group()
def db() -> None:
    """The state store's schema: on PostgreSQL, `db upgrade` once per release before starting
    the replicas (SQLite upgrades itself)."""


def _schema_engine(url: str, *, create: bool) -> Any:
    from rotator.state import schema

    with schema.reaching(url):
        return schema.make_engine(url, create=create)


@db.command("upgrade")
@config_option
def db_upgrade(config_path: str | None) -> None:
    """Bring the state store's schema to this release's (keeps every row; run it once, from one
    machine, before starting the new release's replicas; running it again does nothing)."""
    _one_shot()
    policies = _load(config_path)

    def body() -> int:
        from rotator.state import schema
        from rotator.state.urls import safe_url

        url = policies.settings.state_url
        engine = _schema_engine(url, create=True)
        try:
            with schema.reaching(url):
                before, after = schema.upgrade(engine, url)
        finally:
            engine.dispose()
        if before == after:
            click.echo(f"{safe_url(url)}: schema already at {after}, this rotator's; nothing "
                       "to do")
        else:
            click.echo(f"{safe_url(url)}: schema upgraded from {before or 'nothing (new store)'}"
                       f" to {after}")
        return 0

    _guard(body)


@db.command("current")
@config_option
@json_option
def db_current(config_path: str | None, as_json: bool) -> None:
    """Show the state store's schema revision against this release's. Exits 0 when they match,
    1 when `rotator db upgrade` is needed, 2 when the store is newer than this rotator."""
    _one_shot()
    policies = _load(config_path)

    def body() -> int:
        from rotator.state import schema
        from rotator.state.urls import safe_url

        url = policies.settings.state_url
        engine = _schema_engine(url, create=False)
        try:
            with schema.reaching(url):
                found = schema.status(engine)
        finally:
            engine.dispose()
        where = safe_url(url)
        if as_json:
            _print_json({"state_url": where, "revision": found.revision, "head": found.head,
                         "status": found.state})
        else:
            click.echo({
                "current": f"{where}: schema {found.revision}, this rotator's: up to date",
                "behind": f"{where}: schema {found.revision}; this rotator needs {found.head}: "
                          "run `rotator db upgrade`",
                "empty": f"{where}: no rotator schema yet; run `rotator db upgrade`",
                "newer": f"{where}: schema {found.revision} is newer than this rotator knows "
                         f"({found.head}): upgrade rotator",
            }[found.state])
        return {"current": 0, "behind": EXIT_FAILED, "empty": EXIT_FAILED}.get(found.state,
                                                                                 EXIT_USAGE)

    _guard(body)


@main.command()
@config_option
@json_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--git", "history", is_flag=True,
              help="Also every commit of the repository (deleted files included).")
@click.option("--verify", is_flag=True,
              help="Ask each key's service (the policy file's providers) whether it is still "
                   "live: a live key in a file or in history is an incident.")
@click.option("--policy-out", type=click.Path(path_type=Path), metavar="FILE",
              help="Also write a draft policy file for the keys found (never a value).")
def scan(config_path: str | None, paths: tuple[Path, ...], history: bool, verify: bool,
         as_json: bool, policy_out: Path | None) -> None:
    """Find plaintext keys in files and git history: which agent holds which key, where,
    and which keys several agents share (never a value: a fingerprint tells them apart)."""
    _one_shot()

    def body() -> int:
        import time

        from rotator.scan import scan as run_scan

        policies = _load(config_path) if verify else None
        started = time.monotonic()
        inventory = run_scan(paths, git=history)
        took = time.monotonic() - started
        verdicts: dict[str, Any] = {}
        if policies is not None:
            from rotator.runtime import Runtime
            from rotator.scan_verify import verify as verify_keys

            runtime = Runtime(policies)
            try:
                verdicts = verify_keys(inventory, runtime)
            finally:
                runtime.close()
        live = sorted({fp for fp, v in verdicts.items() if v.state == "live"})
        if policy_out is not None:
            from rotator.policy_draft import draft_policy

            if policy_out.exists():
                _fail(f"--policy-out: {policy_out} exists; give a new file name")
            policy_out.write_text(draft_policy(inventory.found, " ".join(map(str, paths))))
            _note(f"draft policy written to {policy_out}: fill in each \"FILL IN\", then "
                  f"`rotator check -c {policy_out}`")
        if as_json:
            found = [f.as_json() for f in inventory.found]
            if verify:
                for entry in found:
                    entry["verified"] = verdicts[entry["fingerprint"]].as_json()
            _print_json({"found": found, "files": inventory.files,
                         "history_versions": inventory.history_versions,
                         "seconds": round(took, 3), "live": live if verify else None})
            return 1 if live else 0
        from rich.table import Table

        keys = len({f.fingerprint for f in inventory.found})
        table = Table(title=f"{keys} key(s) at {len(inventory.found)} place(s) in "
                            f"{inventory.files} file(s)"
                            + (f" and {inventory.history_versions} file version(s) of history"
                               if history else ""))
        for col in ("agent", "service", "type", "where", "variable", "shared by",
                    "fingerprint", *(("verified",) if verify else ())):
            table.add_column(col)
        for f in inventory.found:
            state = ()
            if verify:
                v = verdicts[f.fingerprint]
                state = ({"live": "[bold red]LIVE[/]", "revoked": "revoked"}.get(
                    v.state, f"unchecked: {_esc(v.why)}"),)
            table.add_row(_esc(f.agent or "-"), _esc(f.service), _esc(f.kind), _esc(f.where),
                          _esc(f.variable or "-"),
                          _esc(f"{len(f.shared_by)} agents" if f.shared_by else "-"),
                          f.fingerprint, *state)
        _print_table(table)
        if verify:
            places = [f for f in inventory.found if f.fingerprint in live]
            if live:
                _warn([f"{len(live)} key(s) found are LIVE at their service ({len(places)} "
                       "place(s)): move each into the vault with `rotator import` and let its "
                       "first rotation revoke it, or revoke it now with `rotator revoke-found "
                       "FINGERPRINT`"])
            else:
                _note("no live key: every key checked is refused by its service")
        return 1 if live else 0

    _guard(body)


@main.command("import")
@config_option
@json_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--agent", help="Only the credentials this agent consumes.")
@click.option("--apply", "apply_", is_flag=True,
              help="Write to the vault (default: show what would be written).")
@click.option("--force", is_flag=True,
              help="Replace a vault secret that holds a different key.")
@click.option("--strip-env", is_flag=True,
              help="Replace each imported line of a .env file with a comment saying where the "
                   "key lives now (with --apply).")
def import_(config_path: str | None, paths: tuple[Path, ...], agent: str | None, apply_: bool,
            force: bool, strip_env: bool, as_json: bool) -> None:
    """Move keys from .env files and code into the vault, one per credential.

    Each credential takes its agent's key from the variable named by its field, in the files
    under PATH... Its first rotation then gives the agent a key of its own and revokes the
    imported one."""
    _one_shot()
    policies = _load(config_path)
    chosen = _select(policies, (), agent, None)
    creds = [c for c in policies.credentials if c.name in chosen]

    def body() -> int:
        from rotator import key_import
        from rotator.runtime import Runtime
        from rotator.scan import scan as run_scan

        inventory = run_scan(paths)
        by_name = {c.name: c for c in creds}
        runtime = Runtime(policies)
        try:
            rows = key_import.plan_import(policies, runtime, inventory, creds, force=force)
            if apply_:
                key_import.apply_plan(runtime, inventory, rows, by_name)
        finally:
            runtime.close()
        stripped, by_hand = (key_import.strip_env(inventory, rows, by_name, apply=apply_)
                             if strip_env else ([], []))
        taken = {(f.path, f.line) for row in rows for f in row.places}
        untaken = [f for f in inventory.found if (f.path, f.line) not in taken
                   and not (f.service == "aws" and "ACCESS_KEY_ID" in (f.variable or ""))]
        problems = [r for r in rows if r.action in key_import.PROBLEMS]
        if as_json:
            _print_json({"applied": apply_, "rows": [r.as_json() for r in rows],
                         "stripped": stripped, "remove_by_hand": by_hand,
                         "not_imported": [f.as_json() for f in untaken]})
            return 1 if problems else 0
        from rich.table import Table

        table = Table(title="import" if apply_ else "import (dry run: nothing written)")
        for col in ("credential", "from", "fingerprint", "to", "action", "detail"):
            table.add_column(col)
        for r in rows:
            shared = (f"; shared with {len(r.shared_with)} other credential(s): revoked once "
                      "the last has rotated" if r.shared_with else "")
            table.add_row(_esc(r.credential), _esc(", ".join(f.where for f in r.places) or "-"),
                          r.fingerprint or "-", _esc(r.target),
                          ("[red]" + r.action + "[/]") if r in problems else r.action,
                          _esc(r.detail + shared))
        _print_table(table)
        for f in untaken:
            _note(f"not imported: {f.where}: {f.variable or f.service} of "
                  f"{f.agent or 'no agent'} ({f.service} {f.kind}): no credential in the "
                  "policy file takes it")
        verb = "stripped" if apply_ else "would be stripped"
        for line in stripped:
            _note(f"{verb}: {line}")
        for line in by_hand:
            _note(f"remove by hand: {line}")
        pending = sum(r.action in ("write", "overwrite") for r in rows)
        if not apply_ and pending:
            _note(f"{pending} key(s) to write: run again with --apply")
        if problems:
            _warn([f"{len(problems)} credential(s) not imported: see their rows"])
        return 1 if problems else 0

    _guard(body)


@main.command("revoke-found")
@config_option
@json_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--key", "keys", multiple=True, required=True, metavar="FINGERPRINT",
              help="The fingerprint `rotator scan` printed for the key (repeatable).")
@click.option("--git", "history", is_flag=True, help="Also look in the git history.")
@click.option("--force", is_flag=True,
              help="Revoke even a key that is still a credential's key in the vault.")
def revoke_found_cmd(config_path: str | None, paths: tuple[Path, ...], keys: tuple[str, ...],
                     history: bool, force: bool, as_json: bool) -> None:
    """Revoke a key a scan found, by its fingerprint, at its service.

    For a key left in PATH... or their git history (--git) that no credential rotates: one
    only in history, a shared key nobody uses any more. Never give its value."""
    _one_shot()
    policies = _load(config_path)

    def body() -> int:
        from rotator.revoke_found import revoke_found
        from rotator.runtime import Runtime
        from rotator.scan import scan as run_scan

        inventory = run_scan(paths, git=history)
        runtime = Runtime(policies)
        try:
            outcomes = revoke_found(policies, runtime, inventory, list(keys), force=force)
        finally:
            runtime.close()
        bad = [o for o in outcomes if o.state not in ("revoked", "already_dead")]
        if as_json:
            _print_json({"outcomes": [o.as_json() for o in outcomes]})
        else:
            for o in outcomes:
                click.echo(f"{o.fingerprint}: {o.state.replace('_', ' ')}: {o.detail}")
        return 1 if bad else 0

    _guard(body)


@main.command()
@config_option
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Override [proxy] listen (port 0 picks a free one).")
@click.option("--metrics-address", default="127.0.0.1:9465", show_default=True,
              metavar="HOST:PORT", help="Where the proxy serves its /metrics.")
def proxy(config_path: str | None, listen: str | None, metrics_address: str) -> None:
    """Run the credential proxy: agents call it with rotator tokens, it attaches the real key
    (needs the `proxy` extra)."""
    policies = _load(config_path)
    if policies.proxy is None:
        _fail("the policy file has no [proxy] section: add one with its routes (see the "
              "README's 'Credential proxy')")
    if logging.getLogger().level > logging.INFO:
        from rotator.log import setup_logging

        setup_logging(logging.INFO)

    def body() -> int:
        from rotator.proxy.runner import ProxyRunner

        ProxyRunner(policies, listen, metrics_address).run_forever()
        return 0

    _guard(body)


@main.command()
@config_option
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio",
              show_default=True, help="MCP over stdio, or streamable HTTP.")
@click.option("--listen", default="127.0.0.1:8789", show_default=True, metavar="HOST:PORT",
              help="With --transport http: where to serve (path /mcp).")
@click.option("--token-env", default="ROTATOR_TOKEN", show_default=True, metavar="VAR",
              help="The environment variable holding the agent's rotator token.")
def mcp(config_path: str | None, transport: str, listen: str, token_env: str) -> None:
    """Serve the proxy's routes as MCP tools for one agent (needs the `proxy` and `mcp`
    extras): each tool call gets the route's credential attached, under the proxy's rules."""
    import os

    policies = _load(config_path)
    if policies.proxy is None:
        _fail("the policy file has no [proxy] section: its routes are the MCP tools")
    agent_token = os.environ.get(token_env, "").strip()
    if not agent_token:
        _fail(f"{token_env} is not set: put the agent's token there (rotator token issue, or "
              "rotator exec from its vault path)")

    def body() -> int:
        from rotator.app import App
        from rotator.proxy.mcp_server import build_mcp_server
        from rotator.proxy.recorder import CallRecorder
        from rotator.proxy.server import ProxyServer

        app = App(policies, actor="mcp")
        from prometheus_client import CollectorRegistry

        recorder = CallRecorder(app.audit, CollectorRegistry())
        try:
            server = ProxyServer(policies, app.runtime, app.store, on_call=recorder)
            mcp_app = build_mcp_server(server, agent_token)
            if transport == "stdio":
                mcp_app.run("stdio")
            else:
                host, _, port = listen.rpartition(":")
                mcp_app.run("streamable-http", host=host, port=int(port))
        finally:
            recorder.close()
            app.close(1.0)
        return 0

    _guard(body)


@main.group()
def token() -> None:
    """Short-lived scoped tokens for the credential proxy."""


@token.command("issue")
@config_option
@click.option("--agent", required=True, help="The agent the token is for.")
@click.option("--routes", required=True, metavar="R1,R2",
              help="Routes of [proxy.routes] it may call.")
@click.option("--ttl", default="1h", show_default=True, metavar="DURATION",
              help="How long it lives (at most [proxy] max_token_ttl).")
@click.option("--budget", type=int, default=None, metavar="N",
              help="At most N requests with it.")
@click.option("--json", "as_json", is_flag=True, help="Print {token, agent, routes, ...}.")
def token_issue(config_path: str | None, agent: str, routes: str, ttl: str,
                budget: int | None, as_json: bool) -> None:
    """Issue a token (printed on stdout, and nowhere else: hand it to the agent)."""
    from rotator.durations import parse_duration

    _one_shot()
    try:
        life = parse_duration(ttl)
    except ValueError as exc:
        _fail(f"--ttl: {exc}")
    policies = _load(config_path)

    def body() -> int:
        from rotator.proxy.runner import issue
        from rotator.service import open_context

        with open_context(policies) as ctx:
            value, claims = issue(ctx, agent, [r.strip() for r in routes.split(",")
                                                   if r.strip()], life, budget)
        if as_json:
            _print_json({"token": value, "agent": claims.agent, "routes": list(claims.routes),
                         "expires_at": claims.expires_at.isoformat().replace("+00:00", "Z"),
                         "token_id": claims.token_id, "budget": claims.budget})
        else:
            click.echo(value)
        return 0

    _guard(body)


@token.command("revoke")
@config_option
@click.option("--agent", required=True, help="Whose tokens: all issued until now.")
@click.option("--reason", default=None, help="Recorded in the audit trail.")
def token_revoke(config_path: str | None, agent: str, reason: str | None) -> None:
    """Refuse every token of an agent issued until now (the proxy sees it within a second)."""
    _one_shot()
    policies = _load(config_path)

    def body() -> int:
        from rotator.proxy.runner import revoke
        from rotator.service import open_context

        with open_context(policies) as ctx:
            at = revoke(ctx, agent, reason)
        click.echo(f"tokens of {agent} issued until {at.isoformat(timespec='seconds')} are "
                   "refused from now on")
        return 0

    _guard(body)


@main.command("exec", context_settings={"allow_interspersed_args": False})
@config_option
@click.option("--agent", required=True, help="Whose keys: every credential with this agent.")
@click.option("--watch", is_flag=True,
              help="Stay as the command's supervisor and act when a rotation stores a new key.")
@click.option("--restart", is_flag=True,
              help="With --watch: restart the command with the new keys (default: signal it).")
@click.option("--signal", "signal_name", default="SIGHUP", show_default=True, metavar="SIGNAL",
              help="With --watch: the signal that tells the command a key changed.")
@click.option("--poll", default="10s", show_default=True, metavar="DURATION",
              help="With --watch: how often to look at the vault.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(config_path: str | None, agent: str, watch: bool, restart: bool, signal_name: str,
          poll: str, command: tuple[str, ...]) -> None:
    """Run COMMAND with the agent's keys from the vault as environment variables (named after
    their vault fields), instead of a .env file; nothing is written to disk. Write it as
    `rotator exec --agent NAME -- COMMAND ARGS...`."""
    import signal as signals

    from rotator.durations import parse_duration

    if restart and not watch:
        _fail("--restart goes with --watch")
    try:
        signum = signals.Signals[signal_name if signal_name.startswith("SIG")
                                 else f"SIG{signal_name}"]
    except KeyError:
        _fail(f"--signal: no signal named {signal_name!r} (SIGHUP, SIGUSR1, ...)")
    try:
        interval = parse_duration(poll).total_seconds()
    except ValueError as exc:
        _fail(f"--poll: {exc}")
    policies = _load(config_path)
    if policies.proxy is None or agent not in policies.proxy.agents:
        _select(policies, (), agent, None)  # an unknown agent: say so, with the closest
    if watch and logging.getLogger().level > logging.INFO:
        from rotator.log import setup_logging

        setup_logging(logging.INFO)  # a supervisor says when it signals or restarts

    def body() -> int:
        from rotator.agent_exec import WatchOptions, exec_agent

        options = WatchOptions(poll=interval, restart=restart, signal=signum) if watch else None
        return exec_agent(policies, agent, command, options)

    _guard(body)


@main.command()
@verbose_option
@click.option("--duration", default=None, metavar="DURATION",
              help="Stop by itself after this long (default: run until Ctrl-C).")
@click.option("--workdir", default=None, metavar="DIR",
              help="Where the demo keeps its files (default: a temporary directory, removed "
                   "at the end).")
@click.option("--serve", is_flag=True,
              help="Also set up a second terminal to practise the leak runbook on the demo "
                   "(writes ./rotator-drill.env: source it there, then run rotator commands).")
def demo(duration: str | None, workdir: str | None, serve: bool) -> None:
    """A self-contained demo: a local OpenBao, the fake OpenAI API, one sample agent per agent
    in the policy file, and the daemon rotating their keys every few seconds."""
    from rotator.demo import run_demo
    from rotator.durations import parse_duration

    limit = None
    if duration:
        try:
            limit = parse_duration(duration).total_seconds()
        except ValueError as exc:
            _fail(f"--duration: {exc}")
    _guard(lambda: run_demo(duration=limit, workdir=Path(workdir) if workdir else None,
                            serve=serve))


def _closed_pipe() -> int:
    """The reader went away (``rotator audit export | head``): stop quietly, as cat does.
    Python would still complain flushing stdout at exit, so point it at /dev/null first."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def console_main() -> None:
    """The ``rotator`` console script: run the command, then leave without the interpreter's
    module teardown, which costs half a second with the SDKs loaded. By then every command
    has committed and closed what it opened; output and logs are flushed here."""
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    except BrokenPipeError:
        code = _closed_pipe()
    else:
        code = 0
    if isinstance(code, str):
        click.echo(code, err=True)
        code = 1
    if not _FAST_EXIT or any(not t.daemon for t in threading.enumerate()
                             if t is not threading.main_thread()):
        sys.exit(code)  # long-running commands keep the normal shutdown and its atexit hooks
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    console_main()
