#!/usr/bin/env python3
"""Scale benchmark (issue 13): the monitor on day summaries, 10,000 patients on the 2-core machine.

Targets (2 shared cores, InfluxDB on the same machine):

1. 10,000 patients x 30 days: a full evaluation under 60 s, a steady-state one under 15 s;
2. 1,000 patients: a full evaluation under 10 s;
3. over-pressure sample -> delivered e-mail under 60 s at 10,000 patients, also while a full evaluation runs;
4. storage per patient-year of raw samples and of summaries, measured.

What runs (``bench/monitor_bench.py`` supplies the synthetic clinic, its generator and the CPU watch):

data
    ``--patients`` patients registered (one clinic, 15 % boots, 5 sock prescriptions). The first
    ``--raw-patients`` (1,000) get ``--days`` (31) local days of raw samples, written in the ingester's line
    format with its receipts, exactly as ``monitor_bench`` writes them; the other 9,000 get today's raw samples
    only. The raw patients' summaries are built from their raw samples by the monitor's own code
    (``monitor.summaries.load``, timed: the summariser's cost), then their complete days are copied, by the
    summaries' own encoder (``summaries.lines_for``), onto the 9,000 others (each from a raw patient of the same
    kind and prescription; ``basis`` recomputed for the target): generating 10,000 patients' 31 days of raw
    samples would take about 45 minutes and 15 GB here, and a full evaluation reads summaries only. Today's
    summaries of the 9,000 are built from their own raw samples (timed).
evaluate
    ``Monitor.evaluate_once()`` on a fresh state database (the first evaluation of a new replica: every
    patient-day's flags inserted), again with its state (the hourly full evaluation), then steady state: a
    minute of new data for every sock and an incremental evaluation (today's summaries younger than
    ``today_every_s``: not rebuilt), once more with today's summaries due and the default rebuild limit (the
    evaluation rebuilds its share, about 1,000 patients' today, as every steady evaluation does in production),
    and once with no limit (every patient's today rebuilt from raw in one evaluation: the worst steady round).
    The same for the 1,000 raw patients alone.
latency
    ``Monitor.run()`` (interval 60 s, safety 10 s) from a fresh state, so its first evaluation is full; while it
    runs, an over-pressure sample is written for a boot patient every ``--trial-gap-s``, and the time to the SMTP
    server receiving the e-mail naming the patient is measured.
storage
    ``du`` of InfluxDB's shards per retention policy after compaction: raw (``autogen``) per sample and per
    patient-year, summaries and flags (``forever``) per patient-day and patient-year.

Command: ``.venv/bin/python bench/scale_bench.py`` (about 25 minutes with data generation).
Smoke: ``.venv/bin/python bench/scale_bench.py --patients 400 --raw-patients 100 --days 8 --trials 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import monitor_bench as mb  # noqa: E402

from devices.registry.db import make_engine, session_factory  # noqa: E402
from devices.registry.service import Registry  # noqa: E402
from monitor import summaries  # noqa: E402
from monitor.app import Monitor  # noqa: E402
from monitor.compliance import InfluxReader, local_days  # noqa: E402
from monitor.model import PatientContext  # noqa: E402
from monitor.registry import load_contexts  # noqa: E402
from tests.smtp import SmtpTestServer  # noqa: E402

say = mb.say


def contexts_of(url: str) -> list[PatientContext]:
    engine = make_engine(url)
    try:
        return load_contexts(Registry(session_factory(engine)))
    finally:
        engine.dispose()


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (0 if absent)."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


async def timed_cpu(influx: Any, coro: Any) -> tuple[float, dict[str, float], Any]:
    with mb.CpuWatch(influx) as watch:
        started = time.monotonic()
        result = await coro
        wall = time.monotonic() - started
    return wall, {k: round(v, 1) for k, v in watch.result.items()}, result


async def build_summaries(args: argparse.Namespace, influx: Any, patients: list[mb.Patient], url10k: str,
                          now_ms: int) -> dict[str, Any]:  # fmt: skip
    """Raw patients' summaries from raw (timed), copied onto the others, today's of the others from raw (timed)."""
    reader = InfluxReader(influx.url, timeout_s=600)
    await summaries.ensure_policy(reader, mb.DATABASE, 0)
    contexts = {c.patient: c for c in contexts_of(url10k)}
    raw = [contexts[p.code] for p in patients[: args.raw_patients]]
    rest = [contexts[p.code] for p in patients[args.raw_patients :]]
    span = args.days_back + 6
    report = summaries.Report()
    wall, cpu, _ = await timed_cpu(influx, summaries.load(reader, mb.DATABASE, raw, span, now_ms, write=True,
                                                          report=report))  # fmt: skip
    out: dict[str, Any] = {"bootstrap_patients": len(raw), "bootstrap_patient_days": report.rebuilt,
                           "bootstrap_s": round(wall, 2), "bootstrap_cpu": cpu,
                           "bootstrap_patient_days_per_s": round(report.rebuilt / wall, 1)}  # fmt: skip
    say(f"  summaries of {len(raw)} raw patients: {report.rebuilt} patient-days in {wall:.1f} s {cpu}")
    days = local_days(mb.TIMEZONE, span, now_ms)
    stored = await summaries.read(reader, mb.DATABASE, raw, days[0][1], days[-1][2], now_ms)
    by_kind: dict[tuple[str, int], list[str]] = defaultdict(list)
    for p in patients[: args.raw_patients]:
        by_kind[(p.kind, p.rx if p.kind == "sock" else 0)].append(p.code)
    lines: list[str] = []
    written = 0
    for n, p in enumerate(patients[args.raw_patients :]):
        sources = by_kind[(p.kind, p.rx if p.kind == "sock" else 0)]
        source = stored.get(sources[n % len(sources)], {})
        target = contexts[p.code]
        for s in source.values():
            if s.stats.complete:
                copy = replace(s.stats, legs={k: replace(v) for k, v in s.stats.legs.items()},
                               worn_devices={target.devices[0]} if s.stats.worn_devices else set())  # fmt: skip
                lines += summaries.lines_for(target, copy, s.summarised_ms)
        if len(lines) > 50_000:
            await summaries.write_lines(reader, mb.DATABASE, lines)
            written += len(lines)
            lines = []
    await summaries.write_lines(reader, mb.DATABASE, lines)
    written += len(lines)
    say(f"  copied complete days onto {len(rest)} patients: {written:,} summary lines")
    report = summaries.Report()
    wall, cpu, _ = await timed_cpu(influx, summaries.load(reader, mb.DATABASE, rest, 0, now_ms, write=True,
                                                          report=report))  # fmt: skip
    say(f"  today's summaries of {len(rest)} patients from raw: {report.rebuilt} in {wall:.1f} s {cpu}")
    out.update(copied_lines=written, today_patients=len(rest), today_rebuilt=report.rebuilt, today_s=round(wall, 2),
               today_cpu=cpu)  # fmt: skip
    return out


async def evaluate_phase(args: argparse.Namespace, influx: Any, patients: list[mb.Patient], url: str,
                         label: str) -> dict[str, Any]:  # fmt: skip
    """Full (fresh state), full (kept state), steady (today deferred), steady (today due): each timed."""
    out: dict[str, Any] = {"rounds": []}
    for r in range(args.repeat):
        used = mb.wait_quiet(influx, args.quiet_wait)
        state = mb.fresh_state(args.data_dir, f"{label}-{r}")
        mon = Monitor(mb.settings_for(args, influx.url, url, state, 1, log_level="WARNING"))
        mon.reader = replace(mon.reader, timeout_s=600)
        assert mon.state.acquire_lease(mon.replica, 3600)
        row: dict[str, Any] = {"others_cpus_before": used}
        wall, cpu, ok = await timed_cpu(influx, mon.evaluate_once())
        assert ok, "evaluation failed"
        row["full_fresh"] = {"s": round(wall, 2), "cpu": cpu, "rebuilt": mon.counters.last_rebuilt}
        say(f"  [{label} {r}] full, fresh state: {wall:.2f} s {cpu} rebuilt {mon.counters.last_rebuilt}")
        mon._full_at = 0.0  # the hourly full evaluation, on a state that has every day already
        wall, cpu, ok = await timed_cpu(influx, mon.evaluate_once())
        row["full_kept"] = {"s": round(wall, 2), "cpu": cpu, "rebuilt": mon.counters.last_rebuilt}
        say(f"  [{label} {r}] full, kept state: {wall:.2f} s {cpu} rebuilt {mon.counters.last_rebuilt}")
        mb.new_minute(influx.url, patients, int(time.time() * 1000))
        wall, cpu, ok = await timed_cpu(influx, mon.evaluate_once())
        row["steady"] = {"s": round(wall, 2), "cpu": cpu, "rebuilt": mon.counters.last_rebuilt,
                         "read": mon.counters.last_read_days}  # fmt: skip
        say(f"  [{label} {r}] steady (today deferred): {wall:.2f} s {cpu} rebuilt {mon.counters.last_rebuilt}")
        # Today's summaries due for everyone, each evaluation rebuilding its default share of them (what a steady
        # evaluation does in production: every TODAY_EVERY_S, spread over the evaluations in between) ...
        mon.settings.rebuilds_per_evaluation = mon._rebuild_limit(len(mon._raw))
        mon.settings.today_every_s = 0.0
        mb.new_minute(influx.url, patients, int(time.time() * 1000))
        wall, cpu, ok = await timed_cpu(influx, mon.evaluate_once())
        row["steady_share_due"] = {"s": round(wall, 2), "cpu": cpu, "rebuilt": mon.counters.last_rebuilt}
        say(f"  [{label} {r}] steady (its share of today's due): {wall:.2f} s {cpu} "
            f"rebuilt {mon.counters.last_rebuilt}")
        # ... and the worst case: every patient's today rebuilt in one evaluation (TODAY_EVERY_S=0, no limit).
        mon.settings.rebuilds_per_evaluation = 0
        mb.new_minute(influx.url, patients, int(time.time() * 1000))
        wall, cpu, ok = await timed_cpu(influx, mon.evaluate_once())
        row["steady_today_due"] = {"s": round(wall, 2), "cpu": cpu, "rebuilt": mon.counters.last_rebuilt}
        say(f"  [{label} {r}] steady (every today due): {wall:.2f} s {cpu} rebuilt {mon.counters.last_rebuilt}")
        mon.state.close()
        out["rounds"].append(row)
    if not args.no_cprofile:
        state = mb.fresh_state(args.data_dir, f"{label}-profile")
        mon = Monitor(mb.settings_for(args, influx.url, url, state, 1, log_level="WARNING"))
        mon.reader = replace(mon.reader, timeout_s=600)
        assert mon.state.acquire_lease(mon.replica, 3600)
        out["profile_full_fresh"] = await asyncio.to_thread(mb.cprofile_evaluation, mon, 900)
        mon.state.close()
    return out


async def latency_phase(args: argparse.Namespace, influx: Any, patients: list[mb.Patient], url: str) -> dict[str, Any]:
    """Over-pressure -> e-mail while ``Monitor.run()``'s first (full) evaluation runs, and after it."""
    # Boots without an over-pressure in the last 2 days: an earlier run on the same data may have left one, whose
    # episode the first evaluation opens (and e-mails) before the trial's sample, which then rightly sends nothing.
    peaks = mb.influx_query(influx.url, f"SELECT max(foot_mmhg) FROM sample WHERE kind = 'boot' AND foot_mmhg > "
                            f"{mb.BOOT_MAX_MMHG} AND time >= now() - 2d GROUP BY patient")  # fmt: skip
    taken = {(x.get("tags") or {}).get("patient") for x in peaks["results"][0].get("series", [])}
    boots = [p for p in patients if p.kind == "boot" and p.profile == "compliant" and p.code not in taken]
    boots = boots[-args.trials * 2 :]
    trials: list[dict[str, Any]] = []
    with SmtpTestServer() as smtp:
        state = mb.fresh_state(args.data_dir, "latency")
        mon = Monitor(mb.settings_for(args, influx.url, url, state, smtp.port, log_level="WARNING"))
        mon.reader = replace(mon.reader, timeout_s=600)
        task = asyncio.create_task(mon.run())
        started = time.monotonic()
        try:
            for n, p in enumerate(boots[: args.trials * 2]):
                await asyncio.sleep(args.trial_gap_s if n else 5.0)
                during = mon.counters.evaluations == 0  # the first (full) evaluation has not finished yet
                sent_at = time.monotonic()
                t = int(time.time() * 1000)
                head = f"sample,clinic={mb.CLINIC},device={p.device},kind=boot,patient={p.code} "
                mb.influx_write(influx.url, [f"{head}foot_mmhg=121.5,ankle_mmhg=110.0,worn=true,worn_s=2.0,"
                                             f"seq=990000i {t}000000"])  # fmt: skip
                seen = len(smtp.received())
                mailed = False
                while not mailed and time.monotonic() - sent_at < args.trial_timeout_s:
                    mails = smtp.received()
                    mailed = any(p.code in str(m.message["Subject"]) for m in mails[seen:])
                    if not mailed:
                        await asyncio.sleep(0.2)
                took = time.monotonic() - sent_at
                trials.append({"patient": p.code, "s": round(took, 2) if mailed else None, "mailed": mailed,
                               "during_first_full_evaluation": during, "since_start_s": round(sent_at - started, 1),
                               "evaluations_done": mon.counters.evaluations})  # fmt: skip
                outcome = f"e-mailed after {took:.2f} s" if mailed else f"NOT e-mailed within {took:.0f} s"
                say(f"  trial {n}: {p.code} {outcome} (during the first full evaluation: {during})")
        finally:
            mon.stop()
            await asyncio.wait_for(task, 600)
            mon.state.close()
        first = mon.counters.last_evaluation_s
    return {"trials": trials, "first_evaluation_s": first}


def storage(args: argparse.Namespace, folder: Path, samples: int, raw_patient_days: int,
            summary_patient_days: int) -> dict[str, Any]:  # fmt: skip
    db = folder / "data" / mb.DATABASE
    raw_b = du(db / "autogen") + du(folder / "wal" / mb.DATABASE / "autogen")
    kept_b = du(db / "forever") + du(folder / "wal" / mb.DATABASE / "forever")
    per_day = raw_b / raw_patient_days if raw_patient_days else 0.0
    per_summary = kept_b / summary_patient_days if summary_patient_days else 0.0
    return {"raw_bytes": raw_b, "raw_samples": samples, "raw_bytes_per_sample": round(raw_b / max(1, samples), 2),
            "raw_patient_days": raw_patient_days, "raw_bytes_per_patient_day": round(per_day),
            "raw_mb_per_patient_year": round(per_day * 365 / 1e6, 1), "forever_bytes": kept_b,
            "summary_patient_days": summary_patient_days, "forever_bytes_per_patient_day": round(per_summary, 1),
            "forever_kb_per_patient_year": round(per_summary * 365 / 1e3, 1)}  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = args.data_dir / "influx"
    marker = args.data_dir / "data.json"
    params = {"patients": args.patients, "raw_patients": args.raw_patients, "days": args.days,
              "boot_share": args.boot_share, "sample_every_s": args.sample_every_s}  # fmt: skip
    old = json.loads(marker.read_text()) if marker.exists() else {}
    reuse = (not args.fresh and old.get("params") == params and time.time() - old.get("at", 0) < 3600 * 4)
    if not reuse:
        shutil.rmtree(folder, ignore_errors=True)
    influx = mb.start_influx(folder)
    results: dict[str, Any] = {"params": params, "environment": mb.environment()}
    try:
        patients = mb.fleet(args.patients, args.boot_share)
        now_ms = int(time.time() * 1000)
        today = datetime.now(UTC).date()
        url10k = mb.register(args.data_dir / "registry.db", patients, today - timedelta(days=args.days + 8))
        url1k = mb.register(args.data_dir / "registry-1k.db", patients[: args.raw_patients],
                            today - timedelta(days=args.days + 8))  # fmt: skip
        if reuse:
            results["data"] = old["data"]
            say("reusing the data of " + time.strftime("%H:%M", time.localtime(old["at"])))
        else:
            say(f"raw samples: {args.raw_patients} patients x {args.days} days")
            gen = mb.generate(args, influx.url, patients[: args.raw_patients], now_ms)
            say(f"  {gen['lines']:,} lines in {gen['seconds']:.0f} s")
            await asyncio.sleep(90)  # let the shards compact before measuring their size
            raw_samples = sum(gen["samples"].values())
            store = storage(args, folder, raw_samples, args.raw_patients * args.days, 0)
            say(f"raw samples today: {args.patients - args.raw_patients} more patients")
            one_day = argparse.Namespace(**{**vars(args), "days": 1})
            gen_today = mb.generate(one_day, influx.url, patients[args.raw_patients :], now_ms)
            summaries_built = await build_summaries(args, influx, patients, url10k, now_ms)
            results["data"] = {"raw": gen, "raw_today": gen_today, "summaries": summaries_built,
                               "storage_raw": store}  # fmt: skip
            marker.write_text(json.dumps({"params": params, "at": time.time(), "data": results["data"]}))
        if "evaluate" not in args.skip:
            say(f"evaluate: {args.patients} patients")
            results["evaluate_10k"] = await evaluate_phase(args, influx, patients, url10k, "all")
            say(f"evaluate: {args.raw_patients} patients")
            results["evaluate_1k"] = await evaluate_phase(
                argparse.Namespace(**{**vars(args), "no_cprofile": True}), influx, patients[: args.raw_patients],
                url1k, "raw")  # fmt: skip
        if "latency" not in args.skip:
            say(f"latency: {args.patients} patients, Monitor.run() from a fresh state")
            results["latency"] = await latency_phase(args, influx, patients, url10k)
        await asyncio.sleep(75)
        span = args.days_back + 7
        results["storage"] = storage(args, folder, results["data"]["raw"]["samples"]["sock"]
                                     + results["data"]["raw"]["samples"].get("boot", 0),
                                     args.raw_patients * args.days, args.patients * span)  # fmt: skip
        results["storage"]["raw_measured_before_the_other_patients_today"] = results["data"].get("storage_raw")
    finally:
        influx.stop()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=10_000)
    p.add_argument("--raw-patients", type=int, default=1_000)
    p.add_argument("--boot-share", type=float, default=0.15)
    p.add_argument("--days", type=int, default=31, help="local days of raw samples, today included")
    p.add_argument("--days-back", type=int, default=30)
    p.add_argument("--sample-every-s", type=int, default=60)
    p.add_argument("--data-dir", type=Path, default=mb.REPO / "var" / "scalebench")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--max-generate-s", type=float, default=1800.0)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--trial-gap-s", type=float, default=12.0)
    p.add_argument("--trial-timeout-s", type=float, default=180.0)
    p.add_argument("--quiet-wait", type=float, default=20.0)
    p.add_argument("--no-cprofile", action="store_true")
    p.add_argument("--skip", action="append", default=[], choices=["evaluate", "latency"])
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    args.data_dir = args.data_dir.resolve()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
