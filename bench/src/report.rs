//! `bench-server report raw.tsv`: turns bench/run.sh's raw lines into the
//! markdown of bench/results/latest.md.
//!
//! Raw lines (tab-separated):
//! `meta KEY VALUE`,
//! `wrk CONTENDER WORKLOAD REP RPS P50_US P99_US MAX_US REQUESTS ERRORS STMTS/REQ PG_EXEC_US/REQ
//! SERVER_CPU_US/REQ PG_CPU_US/REQ CONNECTIONS PGBOUNCER_CPU_US/REQ`,
//! `pgbench SCRIPT REP TPS LATENCY_AVG_MS PG_CPU_US/TX CONCURRENCY`,
//! `prune CONTENDER ROWS PRUNE_MS SLICES LONGEST_DELETE_MS EXPIRED_LEFT`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write,
};

const CONTENDERS: [(&str, &str); 9] = [
    ("ceiling", "axum without sessions (HTTP ceiling)"),
    ("pg-session", "**tower-pg-session**"),
    (
        "pg-session-b",
        "tower-pg-session, second build (BENCH_SERVER_B)",
    ),
    (DEMO, "the demo app (examples/demo.rs)"),
    (
        POOLED,
        "tower-pg-session through PgBouncer (transaction mode)",
    ),
    ("tower-sessions", "tower-sessions + sqlx-store"),
    (PEER, "the same, pool ping off"),
    ("tower-sessions-always-save", "the same with always-save"),
    ("express", "express-session + connect-pg-simple"),
];
const WORKLOADS: [&str; 4] = ["read", "write", "new", "mixed"];
/// The pgbench line each workload is compared with.
const PGBENCH: [(&str, &str); 3] = [
    ("read", "select"),
    ("write", "select_upsert"),
    ("new", "upsert"),
];
const OURS: &str = "pg-session";
/// Ours with `Pooler::Transaction`, through PgBouncer in transaction mode.
const POOLED: &str = "pg-session-pgbouncer";
/// The suffix of pgbench's scripts run through PgBouncer.
const PGBOUNCER: &str = "@pgbouncer";
/// The best-configured peer: tower-sessions with its pool's ping off.
const PEER: &str = "tower-sessions-noping";
/// The demo app, measured beside the minimal server.
const DEMO: &str = "demo";
/// axum without sessions: the HTTP ceiling.
const CEILING: &str = "ceiling";
/// The connections of lines written before the concurrency sweep.
const DEFAULT_CONNECTIONS: u32 = 32;
/// The concurrency the under-load targets are read at.
const LOADED: u32 = 32;

#[derive(Default)]
struct Cell {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    max: f64,
    errors: u64,
    stmts: Vec<f64>,
    pg_us: Vec<f64>,
    server_cpu: Vec<f64>,
    pg_cpu: Vec<f64>,
    pooler_cpu: Vec<f64>,
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| {
        let s = format!("{x:.digits$}");
        // Thousands separators for the integer part.
        let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(i, f)| (i, f));
        let mut out = String::new();
        for (i, ch) in int.chars().enumerate() {
            if i > 0 && (int.len() - i) % 3 == 0 && ch != '-' {
                out.push(',');
            }
            out.push(ch);
        }
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
        out
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn times(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}×"))
}

/// `a` against `b`, as a signed percentage.
fn change(a: Option<f64>, b: Option<f64>) -> String {
    ratio(a, b).map_or("–".into(), |r| format!("{:+.1} %", (r - 1.0) * 100.0))
}

/// A contender's name in the tables (its key when it has none).
fn display_name(c: &str) -> &str {
    CONTENDERS
        .iter()
        .find(|(k, _)| *k == c)
        .map_or(c, |(_, n)| *n)
}

/// The medians of one cell, for the tables and the chart.
struct Point {
    rps: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
}

/// Every cell of one run, by contender, workload label and connections.
struct Run {
    cells: BTreeMap<(String, String, u32), Cell>,
    /// pgbench by script and the concurrency it is compared with: tps, latency, CPU.
    pgbench: BTreeMap<(String, u32), [Vec<f64>; 3]>,
}

impl Run {
    fn cell(&self, c: &str, w: &str, n: u32) -> Option<&Cell> {
        self.cells.get(&(c.into(), w.into(), n))
    }
    /// A cell of a label measured at one concurrency only (scale runs, prune slices).
    fn any(&self, c: &str, w: &str) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|((cc, ww, _), _)| cc == c && ww == w)
            .map(|(_, x)| x)
    }
    fn point(&self, c: &str, w: &str, n: u32) -> Point {
        let cell = self.cell(c, w, n);
        Point {
            rps: cell.and_then(|x| median(&x.rps)),
            p50: cell.and_then(|x| median(&x.p50)),
            p99: cell.and_then(|x| median(&x.p99)),
        }
    }
    fn rps(&self, c: &str, w: &str, n: u32) -> Option<f64> {
        self.point(c, w, n).rps
    }
    fn pg_tps(&self, script: &str, n: u32) -> Option<f64> {
        // Lines from before the sweep carry no concurrency (0).
        self.pgbench
            .get(&(script.into(), n))
            .or_else(|| self.pgbench.get(&(script.into(), 0)))
            .and_then(|p| median(&p[0]))
    }
    /// [`Self::pg_tps`] of `script` run through PgBouncer.
    fn pg_tps_pooled(&self, script: &str, n: u32) -> Option<f64> {
        self.pg_tps(&format!("{script}{PGBOUNCER}"), n)
    }
    /// pgbench's req/s through PgBouncer ÷ direct, for the script workload
    /// `w` is compared with: what the pooler costs the database's own client.
    fn pooler_cost(&self, w: &str, n: u32) -> Option<f64> {
        let (_, script) = PGBENCH.iter().find(|(pw, _)| *pw == w)?;
        ratio(self.pg_tps_pooled(script, n), self.pg_tps(script, n))
    }
    /// The connections measured in the workloads, in order.
    fn levels(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self
            .cells
            .keys()
            .filter(|(_, w, _)| WORKLOADS.contains(&w.as_str()))
            .map(|(_, _, n)| *n)
            .collect();
        set.into_iter().collect()
    }
}

/// `memory` lines: contender, sessions, RSS KiB, requests.
type Memory = Vec<(String, f64, f64, f64)>;
/// `meta` lines: key, value.
type Meta = Vec<(String, String)>;
/// `prune` lines, their fields after the first.
type Prunes = Vec<Vec<String>>;

/// The raw lines: meta, the cells, prune lines, memory lines.
fn parse(raw: &str) -> (Meta, Run, Prunes, Memory) {
    let mut meta = Vec::new();
    let mut run = Run {
        cells: BTreeMap::new(),
        pgbench: BTreeMap::new(),
    };
    let mut prunes: Vec<Vec<String>> = Vec::new();
    let mut memory: Memory = Vec::new();
    for line in raw.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let x = |i: usize| {
            f.get(i)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let int = |i: usize, default: u32| f.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
        match f[0] {
            "meta" if f.len() >= 3 => meta.push((f[1].to_owned(), f[2].to_owned())),
            "wrk" if f.len() >= 10 => {
                let key = (
                    f[1].to_owned(),
                    f[2].to_owned(),
                    int(14, DEFAULT_CONNECTIONS),
                );
                let c = run.cells.entry(key).or_default();
                c.rps.push(x(4));
                c.p50.push(x(5) / 1e3);
                c.p99.push(x(6) / 1e3);
                c.max = c.max.max(x(7) / 1e3);
                c.errors += x(9) as u64;
                c.stmts.push(x(10));
                c.pg_us.push(x(11));
                c.server_cpu.push(x(12));
                c.pg_cpu.push(x(13));
                c.pooler_cpu.push(x(15));
            }
            "pgbench" if f.len() >= 5 => {
                let e = run.pgbench.entry((f[1].to_owned(), int(6, 0))).or_default();
                e[0].push(x(3));
                e[1].push(x(4));
                e[2].push(x(5));
            }
            "prune" if f.len() >= 7 => prunes.push(f[1..].iter().map(|s| s.to_string()).collect()),
            // memory contender sessions rss_kib requests
            "memory" if f.len() >= 5 => memory.push((f[1].to_owned(), x(2), x(3), x(4))),
            _ => {}
        }
    }
    (meta, run, prunes, memory)
}

/// The markdown report; `chart` names the SVG written beside it, if any.
pub fn report(raw: &str, chart: Option<&str>) -> String {
    let (meta, run, prunes, memory) = parse(raw);
    let levels = run.levels();
    let cell_median = |c: &str, w: &str, field: fn(&Cell) -> &Vec<f64>| {
        run.any(c, w).and_then(|x| median(field(x)))
    };
    let rps = |c: &str, w: &str| cell_median(c, w, |x| &x.rps);
    // READ on the table of live sessions only, run alternately with READ at
    // `rows` (reports before that measured it once, before filling).
    let baseline =
        |c: &str, rows: &str| rps(c, &format!("read@live:{rows}")).or_else(|| rps(c, "read@live"));
    // How many times the other contender's req/s ours are, in workload `w` at `n`.
    let vs = |w: &str, other: &str, n: u32| ratio(run.rps(OURS, w, n), run.rps(other, w, n));
    let present: Vec<_> = CONTENDERS
        .iter()
        .filter(|(c, _)| {
            WORKLOADS
                .iter()
                .any(|w| levels.iter().any(|n| run.rps(c, w, *n).is_some()))
        })
        .collect();

    let mut out = String::from("# Benchmark: tower-pg-session and the alternatives\n\n");
    for (k, v) in &meta {
        let _ = writeln!(out, "- {k}: {v}");
    }
    out.push_str(
        "\nAll on one machine: load generator, servers and Postgres share its cores, so only \
         the ratios mean something. Statements per request come from `pg_stat_statements` \
         (BEGIN and COMMIT count); \
         Postgres exec time from its `total_exec_time`; CPU from `/proc` (the server process, and \
         the Postgres backends of the benchmark database: not the WAL writer or other helpers). \
         pgbench runs with as many clients as there are HTTP connections, at most as many as \
         the servers' pools hold.\n",
    );
    if let Some(chart) = chart {
        let _ = writeln!(
            out,
            "\n![req/s and p99 against concurrency, every contender]({chart})"
        );
    }

    if !present.is_empty() || !run.pgbench.is_empty() {
        // The summary: req/s per workload and concurrency, then statements per request.
        out.push_str("\n## Summary (median req/s)\n\n| contender | connections | READ | WRITE | NEW | MIXED | statements READ / WRITE / NEW / MIXED |\n|---|---:|---:|---:|---:|---:|---|\n");
        for n in &levels {
            for (c, name) in &present {
                let stmts = |w: &str| run.cell(c, w, *n).and_then(|x| median(&x.stmts));
                let _ = write!(out, "| {name} | {n} |");
                for w in WORKLOADS {
                    let _ = write!(out, " {} |", num(run.rps(c, w, *n), 0));
                }
                let s = if *c == CEILING {
                    String::new()
                } else {
                    WORKLOADS
                        .iter()
                        .map(|w| num(stmts(w), 2))
                        .collect::<Vec<_>>()
                        .join(" / ")
                };
                let _ = writeln!(out, " {s} |");
            }
            if !run.pgbench.is_empty() {
                let _ = writeln!(
                    out,
                    "| pgbench: PK select / select+upsert / upsert alone | {n} | {} | {} | {} | | 1 / 2 / 1 |",
                    num(run.pg_tps("select", *n), 0),
                    num(run.pg_tps("select_upsert", *n), 0),
                    num(run.pg_tps("upsert", *n), 0)
                );
                let pooled = |s: &str| run.pg_tps_pooled(s, *n);
                if pooled("select").is_some() {
                    let _ = writeln!(
                        out,
                        "| pgbench through PgBouncer: PK select / select+upsert | {n} | {} | {} | | | 1 / 2 |",
                        num(pooled("select"), 0),
                        num(pooled("select_upsert"), 0)
                    );
                }
            }
        }

        // Every cell.
        out.push_str("\n## Every cell (median of the repetitions; max over all)\n\n| contender | workload | connections | req/s | p50 ms | p99 ms | max ms | errors | statements/request | Postgres exec µs/request | CPU µs/request: server | Postgres |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (c, name) in &present {
            for w in WORKLOADS {
                for n in &levels {
                    let Some(cell) = run.cell(c, w, *n) else {
                        continue;
                    };
                    let _ = writeln!(
                        out,
                        "| {name} | {} | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        w.to_uppercase(),
                        num(median(&cell.rps), 0),
                        num(median(&cell.p50), 2),
                        num(median(&cell.p99), 2),
                        num(Some(cell.max), 1),
                        cell.errors,
                        num(median(&cell.stmts), 2),
                        num(median(&cell.pg_us), 1),
                        num(median(&cell.server_cpu), 0),
                        num(median(&cell.pg_cpu), 0)
                    );
                }
            }
        }
        for ((script, n), [tps, lat, cpu]) in &run.pgbench {
            let script = match script.strip_suffix(PGBOUNCER) {
                Some(s) => format!("{s}.sql through PgBouncer"),
                None => format!("{script}.sql"),
            };
            let _ = writeln!(
                out,
                "| pgbench | {script} | {n} | {} | avg {} | | | | | | | {} |",
                num(median(tps), 0),
                num(median(lat), 2),
                num(median(cpu), 0)
            );
        }

        // Ratios of ours to everything else.
        out.push_str("\n## tower-pg-session's req/s ÷ each other's\n\n| workload | connections |");
        let others: Vec<_> = present.iter().filter(|(c, _)| *c != OURS).collect();
        for (_, name) in &others {
            let _ = write!(out, " ÷ {name} |");
        }
        out.push_str(" ÷ pgbench (same statements) |\n|---|---:|");
        out.push_str(&"---:|".repeat(others.len() + 1));
        out.push('\n');
        for w in WORKLOADS {
            for n in &levels {
                let _ = write!(out, "| {} | {n} |", w.to_uppercase());
                for (c, _) in &others {
                    let _ = write!(out, " {} |", times(vs(w, c, *n)));
                }
                let script = PGBENCH.iter().find(|(pw, _)| *pw == w).map(|(_, s)| *s);
                let pg = script.map_or("–".into(), |s| {
                    format!(
                        "{} ({s})",
                        times(ratio(run.rps(OURS, w, *n), run.pg_tps(s, *n)))
                    )
                });
                let _ = writeln!(out, " {pg} |");
            }
        }

        // Ours through a transaction pooler against ours direct.
        if present.iter().any(|(c, _)| *c == POOLED) {
            out.push_str("\n## tower-pg-session through PgBouncer in transaction mode ÷ direct\n\n\
                Each statement in a transaction of its own, unnamed (BEGIN and COMMIT count as \
                statements). The pooler's own cost: pgbench's statements through PgBouncer, \
                unnamed, ÷ the same prepared direct; and PgBouncer's CPU per request.\n\n\
                | workload | connections | req/s direct | req/s through PgBouncer | ratio | pgbench's ratio | statements/request direct | through PgBouncer | PgBouncer CPU µs/request |\n\
                |---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for w in WORKLOADS {
                for n in &levels {
                    let stmts = |c: &str| run.cell(c, w, *n).and_then(|x| median(&x.stmts));
                    let pooler_cpu = run.cell(POOLED, w, *n).and_then(|x| median(&x.pooler_cpu));
                    let _ = writeln!(
                        out,
                        "| {} | {n} | {} | {} | {} | {} | {} | {} | {} |",
                        w.to_uppercase(),
                        num(run.rps(OURS, w, *n), 0),
                        num(run.rps(POOLED, w, *n), 0),
                        times(ratio(run.rps(POOLED, w, *n), run.rps(OURS, w, *n))),
                        times(run.pooler_cost(w, *n)),
                        num(stmts(OURS), 2),
                        num(stmts(POOLED), 2),
                        num(pooler_cpu, 1)
                    );
                }
            }
        }

        out.push_str("\n## Targets\n");
        targets_table(&mut out, &targets(&run, &levels));
    }

    if !prunes.is_empty() {
        out.push_str("\n## Scale: READ with many expired rows, and a prune under READ load\n\n| contender | rows added (90 % expired) | READ req/s, live rows only | READ req/s with them | change | p99 ms, 10 s READ runs | p99 ms beside the prune (median 1 s slice) | p99 ms during it (median / worst 1 s slice) | ratio | max ms during it | prune ms | longest DELETE ms | expired rows left |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        // Ours: READ's change with the rows, the p99 ratio, the slowest request.
        let mut ours = None;
        for p in &prunes {
            let (c, rows) = (p[0].as_str(), p[1].as_str());
            let name = display_name(c);
            let live = baseline(c, rows);
            let big = rps(c, &format!("read@{rows}"));
            let runs = cell_median(c, &format!("read@{rows}"), |x| &x.p99);
            // Slices are compared with slices: a 1 s wrk run's p99 includes
            // its connections' start, which a 10 s run's hides.
            let beside = cell_median(c, "read@beside-prune", |x| &x.p99);
            let during = run.any(c, "read@prune");
            let p99_during = during.map_or("–".into(), |d| {
                let worst = d.p99.iter().copied().fold(0.0, f64::max);
                format!("{} / {}", num(median(&d.p99), 2), num(Some(worst), 2))
            });
            let slowdown = ratio(during.and_then(|d| median(&d.p99)), beside);
            let max = during.map(|d| d.max);
            if c == OURS {
                ours = Some((ratio(big, live), slowdown, max));
            }
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                num(rows.parse().ok(), 0),
                num(live, 0),
                num(big, 0),
                change(big, live),
                num(runs, 2),
                num(beside, 2),
                p99_during,
                slowdown.map_or("–".into(), |r| format!("{r:.2}×")),
                num(max, 1),
                p[2],
                p[4],
                p[5]
            );
        }
        out.push_str("\nTargets: READ with the rows within 10 % of READ without; p99 during the prune ≤ 1.5× the p99 before it (ratio: median 1 s slice during ÷ median 1 s slice beside, about twenty slices before the prune and one after); no request over 50 ms.\n");
        if let Some((grew, slowdown, max)) = ours {
            let shift = grew.map(|r| (r - 1.0) * 100.0);
            let rows = [
                (
                    "READ with the rows within 10 % of READ without".to_owned(),
                    shift.map(|s| format!("{s:+.1} %")),
                    shift.map(|s| s.abs() <= 10.0),
                ),
                (
                    "p99 during the prune ≤ 1.5× the p99 beside it".to_owned(),
                    slowdown.map(|r| format!("{r:.2}×")),
                    slowdown.map(|r| r <= 1.5),
                ),
                (
                    "no request over 50 ms during the prune".to_owned(),
                    max.map(|m| format!("{m:.1} ms")),
                    max.map(|m| m <= 50.0),
                ),
            ];
            targets_table(&mut out, &rows);
        }
        // Every table size measured, when there were several.
        let sizes: Vec<(&String, u64)> = run
            .cells
            .keys()
            .filter_map(|(c, l, _)| Some((c, l.strip_prefix("read@")?.parse().ok()?)))
            .collect();
        if sizes.len() > prunes.len() {
            out.push_str("\n| contender | rows added (90 % expired) | READ req/s | change from live rows only |\n|---|---:|---:|---:|\n");
            let mut sizes = sizes;
            sizes.sort();
            for (c, rows) in sizes {
                let name = display_name(c);
                let (live, big) = (
                    baseline(c, &rows.to_string()),
                    rps(c, &format!("read@{rows}")),
                );
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} |",
                    num(Some(rows as f64), 0),
                    num(big, 0),
                    change(big, live)
                );
            }
        }
    }

    if let Some(first) = memory.first() {
        out.push_str("\n## Memory: the server's resident size after READ over more and more distinct sessions\n\n| contender | distinct sessions | READ requests served | RSS MiB | ÷ the first |\n|---|---:|---:|---:|---:|\n");
        for (c, sessions, rss, requests) in &memory {
            let name = display_name(c);
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} |",
                num(Some(*sessions), 0),
                num(Some(*requests), 0),
                num(Some(rss / 1024.0), 1),
                times(ratio(Some(*rss), Some(first.2)))
            );
        }
        out.push_str("\nTarget: within 20 % (÷ the first between 0.8× and 1.2×) from 10,000 to 1,000,000 sessions.\n");
        if let Some(last) = memory.last().filter(|_| memory.len() > 1) {
            let grew = ratio(Some(last.2), Some(first.2));
            let rows = [(
                "resident size flat within 20 %".to_owned(),
                grew.map(|g| format!("{g:.2}×")),
                grew.map(|g| (0.8..=1.2).contains(&g)),
            )];
            targets_table(&mut out, &rows);
        }
    }
    out
}

/// A table of targets: what, the figure measured, and whether it is met.
fn targets_table(out: &mut String, rows: &[(String, Option<String>, Option<bool>)]) {
    out.push_str("\n| target | measured | met |\n|---|---:|---|\n");
    for (what, got, met) in rows {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(
            out,
            "| {what} | {} | {met} |",
            got.as_deref().unwrap_or("–")
        );
    }
}

/// One target: what, the figure measured, and whether it is met.
type Target = (String, Option<String>, Option<bool>);

/// At least `want` times: `got` is a ratio.
fn at_least(what: String, got: Option<f64>, want: f64) -> Target {
    (what, got.map(|g| times(Some(g))), got.map(|g| g >= want))
}

/// The targets the crate is held to.
fn targets(run: &Run, levels: &[u32]) -> Vec<Target> {
    let mut rows = Vec::new();
    // No cost for the lone request: against the ping-off peer at low concurrency.
    for n in levels.iter().filter(|n| **n <= 4) {
        let (ours, peer) = (run.point(OURS, "read", *n), run.point(PEER, "read", *n));
        for (what, a, b) in [("p50", ours.p50, peer.p50), ("p99", ours.p99, peer.p99)] {
            let r = ratio(a, b);
            rows.push((
                format!("{n} conn. READ {what} ≤ tower-sessions ping off"),
                a.zip(b).map(|(a, b)| format!("{a:.2} ms vs {b:.2} ms")),
                r.map(|r| r <= 1.0),
            ));
        }
        rows.push(at_least(
            format!("{n} conn. READ req/s ≥ 1.0× tower-sessions ping off"),
            ratio(ours.rps, peer.rps),
            1.0,
        ));
    }
    // Ahead of the best-configured peer under load.
    for w in ["read", "write", "new"] {
        rows.push(at_least(
            format!(
                "{LOADED} conn. {} ≥ 2× tower-sessions ping off",
                w.to_uppercase()
            ),
            ratio(run.rps(OURS, w, LOADED), run.rps(PEER, w, LOADED)),
            2.0,
        ));
    }
    // Past the database's own one-statement limit, at every concurrency.
    for n in levels {
        for (w, script, what) in [
            ("read", "select", "prepared PK select"),
            ("write", "select_upsert", "select+upsert"),
        ] {
            let pg = run.pg_tps(script, *n);
            let mut row = at_least(
                format!("{n} conn. {} ≥ 1.0× pgbench {what}", w.to_uppercase()),
                ratio(run.rps(OURS, w, *n), pg),
                1.0,
            );
            // Without shared statements a request costs about pgbench's time
            // for its statements plus the HTTP ceiling's for the request: a
            // ratio near ceiling ÷ (ceiling + pgbench), below 1. An estimate:
            // a bound where the machine is saturated, not at 1 connection,
            // where idle waits overlap.
            let bound = run.rps(CEILING, w, *n).zip(pg).map(|(c, p)| c / (c + p));
            if let (Some(got), Some(bound)) = (&mut row.1, bound) {
                let _ = write!(
                    got,
                    " (estimate without shared statements: {})",
                    times(Some(bound))
                );
            }
            rows.push(row);
        }
    }
    // The app, not only the crate; and through a transaction pooler.
    for w in ["read", "write", "new"] {
        rows.push(at_least(
            format!(
                "{LOADED} conn. demo {} within 15 % of the minimal server",
                w.to_uppercase()
            ),
            ratio(run.rps(DEMO, w, LOADED), run.rps(OURS, w, LOADED)),
            0.85,
        ));
    }
    for w in ["read", "write"] {
        let mut row = at_least(
            format!(
                "{LOADED} conn. {} through PgBouncer within 20 % of direct",
                w.to_uppercase()
            ),
            ratio(run.rps(POOLED, w, LOADED), run.rps(OURS, w, LOADED)),
            0.8,
        );
        if let (Some(got), Some(own)) = (&mut row.1, run.pooler_cost(w, LOADED)) {
            let _ = write!(got, " (pgbench's own: {})", times(Some(own)));
        }
        rows.push(row);
    }
    rows
}

/// The chart: for each workload, req/s and p99 against concurrency, one line
/// per contender. Plain SVG; concurrency levels evenly spaced. `None` when
/// the run has no such cells (only its scale or memory parts).
pub fn chart(raw: &str) -> Option<String> {
    const PALETTE: [&str; 9] = [
        "#888888", "#d62728", "#e377c2", "#ff7f0e", "#9467bd", "#1f77b4", "#17becf", "#2ca02c",
        "#8c564b",
    ];
    const W: f64 = 420.0;
    const H: f64 = 240.0;
    const PAD: f64 = 50.0;
    let (_, run, _, _) = parse(raw);
    let levels = run.levels();
    let present: Vec<(usize, &str, &str)> = CONTENDERS
        .iter()
        .enumerate()
        .filter(|(_, (c, _))| {
            WORKLOADS
                .iter()
                .any(|w| levels.iter().any(|n| run.rps(c, w, *n).is_some()))
        })
        // The contenders' keys: the tables' names lean on the rows above them.
        .map(|(i, (c, _))| (i, *c, *c))
        .collect();
    if present.is_empty() {
        return None;
    }
    let workloads: Vec<&str> = WORKLOADS
        .iter()
        .copied()
        .filter(|w| {
            present
                .iter()
                .any(|(_, c, _)| run.rps(c, w, levels[0]).is_some())
        })
        .collect();
    let legend_h = 20.0 * present.len() as f64 + 20.0;
    let (width, height) = (2.0 * W, legend_h + H * workloads.len() as f64);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (k, (i, _, name)) in present.iter().enumerate() {
        let y = 16.0 + 20.0 * k as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{PAD}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{}\" stroke-width=\"2\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            PAD + 24.0,
            PALETTE[*i % PALETTE.len()],
            PAD + 30.0,
            y + 4.0,
            name
        );
    }
    let x_of = |k: usize| {
        let span = W - 2.0 * PAD;
        PAD + if levels.len() > 1 {
            span * k as f64 / (levels.len() - 1) as f64
        } else {
            span / 2.0
        }
    };
    for (row, w) in workloads.iter().enumerate() {
        for (col, (what, field)) in [
            ("req/s", (|p: &Point| p.rps) as fn(&Point) -> Option<f64>),
            ("p99 ms", |p: &Point| p.p99),
        ]
        .into_iter()
        .enumerate()
        {
            let (ox, oy) = (col as f64 * W, legend_h + row as f64 * H);
            let values = |c: &str| -> Vec<Option<f64>> {
                levels.iter().map(|n| field(&run.point(c, w, *n))).collect()
            };
            let top = present
                .iter()
                .flat_map(|(_, c, _)| values(c))
                .flatten()
                .fold(0.0, f64::max)
                .max(1e-9)
                * 1.1;
            let y_of = |v: f64| oy + H - PAD + (v / top) * -(H - 1.6 * PAD);
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" font-weight=\"bold\">{} {what}</text>\
                 <line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\
                 <line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>",
                ox + PAD,
                oy + 0.5 * PAD,
                w.to_uppercase(),
                ox + PAD,
                oy + H - PAD,
                ox + W - PAD,
                oy + H - PAD,
                ox + PAD,
                oy + H - PAD,
                ox + PAD,
                y_of(top / 1.1),
                ox + PAD - 4.0,
                y_of(top / 1.1) + 4.0,
                num(Some(top / 1.1), if top < 20.0 { 1 } else { 0 }),
                ox + PAD - 4.0,
                oy + H - PAD + 4.0
            );
            for (k, n) in levels.iter().enumerate() {
                let _ = writeln!(
                    svg,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{n}</text>",
                    ox + x_of(k),
                    oy + H - PAD + 14.0
                );
            }
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">connections</text>",
                ox + W / 2.0,
                oy + H - PAD + 28.0
            );
            for (i, c, _) in &present {
                let color = PALETTE[*i % PALETTE.len()];
                let points: Vec<String> = values(c)
                    .iter()
                    .enumerate()
                    .filter_map(|(k, v)| v.map(|v| format!("{:.1},{:.1}", ox + x_of(k), y_of(v))))
                    .collect();
                if points.is_empty() {
                    continue;
                }
                let _ = writeln!(
                    svg,
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                    points.join(" ")
                );
                for p in &points {
                    let (x, y) = p.split_once(',').unwrap_or_default();
                    let _ = writeln!(
                        svg,
                        "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{color}\"/>"
                    );
                }
            }
        }
    }
    svg.push_str("</svg>\n");
    Some(svg)
}
