//! `bench-server report raw.tsv`: turns bench/run.sh's raw lines into the
//! markdown of bench/results/latest.md.
//!
//! Raw lines (tab-separated):
//! `meta KEY VALUE`,
//! `wrk CONTENDER WORKLOAD REP RPS P50_US P99_US MAX_US REQUESTS ERRORS STMTS/REQ PG_EXEC_US/REQ
//! SERVER_CPU_US/REQ PG_CPU_US/REQ`,
//! `pgbench SCRIPT REP TPS LATENCY_AVG_MS PG_CPU_US/TX`,
//! `prune CONTENDER ROWS PRUNE_MS SLICES LONGEST_DELETE_MS EXPIRED_LEFT`.

use std::{collections::BTreeMap, fmt::Write};

const CONTENDERS: [(&str, &str); 6] = [
    ("ceiling", "axum without sessions (HTTP ceiling)"),
    ("pg-session", "**tower-pg-session**"),
    (
        POOLED,
        "tower-pg-session through PgBouncer (transaction mode)",
    ),
    ("tower-sessions", "tower-sessions + sqlx-store"),
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

pub fn report(raw: &str) -> String {
    let mut meta = Vec::new();
    let mut cells: BTreeMap<(String, String), Cell> = BTreeMap::new();
    let mut pgbench: BTreeMap<String, [Vec<f64>; 3]> = BTreeMap::new();
    let mut prunes: Vec<Vec<String>> = Vec::new();
    let mut memory: Vec<(String, f64, f64, f64)> = Vec::new();
    for line in raw.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let x = |i: usize| {
            f.get(i)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        match f[0] {
            "meta" if f.len() >= 3 => meta.push((f[1].to_owned(), f[2].to_owned())),
            "wrk" if f.len() >= 10 => {
                let c = cells.entry((f[1].to_owned(), f[2].to_owned())).or_default();
                c.rps.push(x(4));
                c.p50.push(x(5) / 1e3);
                c.p99.push(x(6) / 1e3);
                c.max = c.max.max(x(7) / 1e3);
                c.errors += x(9) as u64;
                c.stmts.push(x(10));
                c.pg_us.push(x(11));
                c.server_cpu.push(x(12));
                c.pg_cpu.push(x(13));
            }
            "pgbench" if f.len() >= 5 => {
                let e = pgbench.entry(f[1].to_owned()).or_default();
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
    // The median of one field over the repetitions of a cell.
    let cell_median = |c: &str, w: &str, field: fn(&Cell) -> &Vec<f64>| {
        cells
            .get(&(c.into(), w.into()))
            .and_then(|x| median(field(x)))
    };
    let rps = |c: &str, w: &str| cell_median(c, w, |x| &x.rps);
    let stmts = |c: &str, w: &str| cell_median(c, w, |x| &x.stmts);
    // READ on the table of live sessions only, run alternately with READ at
    // `rows` (reports before that measured it once, before filling).
    let baseline =
        |c: &str, rows: &str| rps(c, &format!("read@live:{rows}")).or_else(|| rps(c, "read@live"));
    // How many times the other contender's req/s ours are, in workload `w`.
    let vs = |w: &str, other: &str| ratio(rps(OURS, w), rps(other, w));
    let pg_tps = |s: &str| pgbench.get(s).and_then(|p| median(&p[0]));
    let present: Vec<_> = CONTENDERS
        .iter()
        .filter(|(c, _)| WORKLOADS.iter().any(|w| rps(c, w).is_some()))
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
         the Postgres backends of the benchmark database: not the WAL writer or other helpers).\n",
    );

    if !present.is_empty() || !pgbench.is_empty() {
        // The summary: req/s per workload, then statements per request.
        out.push_str("\n## Summary (median req/s)\n\n| contender | READ | WRITE | NEW | MIXED | statements READ / WRITE / NEW / MIXED |\n|---|---:|---:|---:|---:|---|\n");
        for (c, name) in &present {
            let s: Vec<String> = WORKLOADS.iter().map(|w| num(stmts(c, w), 2)).collect();
            let _ = write!(out, "| {name} |");
            for w in WORKLOADS {
                let _ = write!(out, " {} |", num(rps(c, w), 0));
            }
            let s = if *c == "ceiling" {
                String::new()
            } else {
                s.join(" / ")
            };
            let _ = writeln!(out, " {s} |");
        }
        if !pgbench.is_empty() {
            let _ = writeln!(
            out,
            "| pgbench: PK select / select+upsert / upsert alone | {} | {} | {} | | 1 / 2 / 1 |",
            num(pg_tps("select"), 0),
            num(pg_tps("select_upsert"), 0),
            num(pg_tps("upsert"), 0)
        );
        }

        // Every cell.
        out.push_str("\n## Every cell (median of the repetitions; max over all)\n\n| contender | workload | req/s | p50 ms | p99 ms | max ms | errors | statements/request | Postgres exec µs/request | CPU µs/request: server | Postgres |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (c, name) in &present {
            for w in WORKLOADS {
                let Some(cell) = cells.get(&(c.to_string(), w.to_string())) else {
                    continue;
                };
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
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
        for (script, [tps, lat, cpu]) in &pgbench {
            let _ = writeln!(
                out,
                "| pgbench | {script}.sql | {} | avg {} | | | | | | | {} |",
                num(median(tps), 0),
                num(median(lat), 2),
                num(median(cpu), 0)
            );
        }

        // Ratios of ours to everything else.
        out.push_str("\n## tower-pg-session's req/s ÷ each other's\n\n| workload |");
        let others: Vec<_> = present.iter().filter(|(c, _)| *c != OURS).collect();
        for (_, name) in &others {
            let _ = write!(out, " ÷ {name} |");
        }
        out.push_str(" ÷ pgbench (same statements) |\n|---|");
        out.push_str(&"---:|".repeat(others.len() + 1));
        out.push('\n');
        for w in WORKLOADS {
            let _ = write!(out, "| {} |", w.to_uppercase());
            for (c, _) in &others {
                let _ = write!(out, " {} |", times(vs(w, c)));
            }
            let script = PGBENCH.iter().find(|(pw, _)| *pw == w).map(|(_, s)| *s);
            let pg = script.map_or("–".into(), |s| {
                format!("{} ({s})", times(ratio(rps(OURS, w), pg_tps(s))))
            });
            let _ = writeln!(out, " {pg} |");
        }

        // Ours through a transaction pooler against ours direct.
        if present.iter().any(|(c, _)| *c == POOLED) {
            out.push_str("\n## tower-pg-session through PgBouncer in transaction mode ÷ direct\n\n\
                Each statement in a transaction of its own, unnamed (BEGIN and COMMIT count as \
                statements; PgBouncer's own CPU is in neither column of CPU).\n\n\
                | workload | req/s direct | req/s through PgBouncer | ratio | statements/request direct | through PgBouncer |\n\
                |---|---:|---:|---:|---:|---:|\n");
            for w in WORKLOADS {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} |",
                    w.to_uppercase(),
                    num(rps(OURS, w), 0),
                    num(rps(POOLED, w), 0),
                    times(ratio(rps(POOLED, w), rps(OURS, w))),
                    num(stmts(OURS, w), 2),
                    num(stmts(POOLED, w), 2)
                );
            }
        }

        // The targets the crate is held to.
        let targets: [(&str, Option<f64>, f64); 6] = [
            (
                "READ ≥ 1.6× tower-sessions",
                vs("read", "tower-sessions"),
                1.6,
            ),
            (
                "READ ≥ 4.5× tower-sessions always-save",
                vs("read", "tower-sessions-always-save"),
                4.5,
            ),
            ("READ ≥ 12× connect-pg-simple", vs("read", "express"), 12.0),
            (
                "READ ≥ 50 % of pgbench select",
                ratio(rps(OURS, "read"), pg_tps("select")),
                0.5,
            ),
            (
                "WRITE ≥ 1.3× tower-sessions",
                vs("write", "tower-sessions"),
                1.3,
            ),
            (
                "NEW ≥ 1.5× tower-sessions",
                vs("new", "tower-sessions"),
                1.5,
            ),
        ];
        out.push_str("\n## Targets\n");
        let rows = targets.map(|(what, got, want)| {
            (
                what.to_owned(),
                got.map(|g| times(Some(g))),
                got.map(|g| g >= want),
            )
        });
        targets_table(&mut out, &rows);
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
            let during = cells.get(&(c.into(), "read@prune".into()));
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
        let sizes: Vec<(&String, u64)> = cells
            .keys()
            .filter_map(|(c, l)| Some((c, l.strip_prefix("read@")?.parse().ok()?)))
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
