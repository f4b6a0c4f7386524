//! The listener part's Markdown: one row per test and `-P`, the three
//! routes side by side, then the targets.

use std::fmt::Write as _;

use super::{PIPELINES, RedisBenchmarkReport, RedisBenchmarkRun, Route, Test};

/// The tests the targets are about.
const TARGET_TESTS: [Test; 2] = [Test::Get, Test::Set];

impl RedisBenchmarkReport {
    fn find(&self, test: Test, pipeline: usize, route: Route) -> Option<&RedisBenchmarkRun> {
        self.runs
            .iter()
            .find(|r| r.test == test.name() && r.pipeline == pipeline && r.route == route.name())
    }

    /// lessor's and twemproxy's runs of one setting, when both succeeded;
    /// else which failed.
    fn pair(
        &self,
        test: Test,
        pipeline: usize,
    ) -> Result<(&RedisBenchmarkRun, &RedisBenchmarkRun), String> {
        let ok = |route: Route| {
            self.find(test, pipeline, route)
                .filter(|r| r.error.is_none() && r.requests_per_sec.is_some())
                .ok_or_else(|| format!("{}'s run failed", route.name()))
        };
        Ok((ok(Route::Lessor)?, ok(Route::Twemproxy)?))
    }

    /// The requests/s and CPU targets of one setting: the figure as text,
    /// and whether it was met.
    fn targets(&self, test: Test, pipeline: usize) -> [(String, bool); 2] {
        match self.pair(test, pipeline) {
            Ok((l, t)) => {
                let (lr, tr) = (
                    l.requests_per_sec.unwrap_or(0.0),
                    t.requests_per_sec.unwrap_or(0.0),
                );
                let (lc, tc) = (
                    l.proxy_cpu_ms_per_1k.unwrap_or(f64::INFINITY),
                    t.proxy_cpu_ms_per_1k.unwrap_or(0.0),
                );
                [
                    (
                        format!("{:.2} ({lr:.0} / {tr:.0})", lr / tr.max(1e-9)),
                        lr >= tr,
                    ),
                    (format!("{lc:.2} / {tc:.2} ms"), lc <= tc),
                ]
            }
            Err(why) => [(why.clone(), false), (why, false)],
        }
    }

    /// The table, the targets and a summary line, as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} (`-c {} -n {}`, `-n {}` with `-P 16`; default 3-byte values; one run per test; PING is \
             PING_MBULK; LRANGE_100 is `LRANGE mylist 0 99` run as a command of its own): redis-server \
             with `--requirepass` directly (`-a`), twemproxy ({}: one server, server_connections: 1, \
             preconnect: true, redis_auth, clients AUTH with `-a`), lessor's Redis listener (auth: trust, \
             pool max_size {} / min_idle {}, runtime.worker_threads: {}); {} CPUs shared by \
             redis-benchmark, redis-server and the proxy\n",
            self.redis_benchmark_version,
            self.clients,
            self.requests,
            self.requests_pipelined,
            self.twemproxy_version,
            self.pool_size,
            self.pool_size,
            self.lessor_workers,
            self.cpus
        );
        let _ = writeln!(
            out,
            "| test | -P | direct req/s | twemproxy req/s | lessor req/s | lessor / twemproxy | \
             twemproxy CPU ms / 1,000 | lessor CPU ms / 1,000 | redis-server CPU ms / 1,000 (direct / twemproxy / lessor) |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for test in Test::ALL {
            for pipeline in PIPELINES {
                self.row(&mut out, test, pipeline);
            }
        }
        self.render_targets(&mut out);
        out
    }

    fn row(&self, out: &mut String, test: Test, pipeline: usize) {
        let run = |route| self.find(test, pipeline, route);
        let rps = |route| match run(route) {
            Some(RedisBenchmarkRun { error: Some(e), .. }) => format!("failed: {}", short(e)),
            Some(r) => r
                .requests_per_sec
                .map_or(String::new(), |v| format!("{v:.0}")),
            None => String::new(),
        };
        let cpu = |route, of: fn(&RedisBenchmarkRun) -> Option<f64>| {
            run(route)
                .and_then(of)
                .map_or("–".to_owned(), |v| format!("{v:.2}"))
        };
        let ratio = self.pair(test, pipeline).map_or(String::new(), |(l, t)| {
            let (l, t) = (
                l.requests_per_sec.unwrap_or(0.0),
                t.requests_per_sec.unwrap_or(0.0),
            );
            format!("{:.2}", l / t.max(1e-9))
        });
        let redis = Route::ALL
            .map(|route| cpu(route, |r| r.redis_cpu_ms_per_1k))
            .join(" / ");
        let _ = writeln!(
            out,
            "| {} | {pipeline} | {} | {} | {} | {ratio} | {} | {} | {redis} |",
            test.name(),
            rps(Route::Direct),
            rps(Route::Twemproxy),
            rps(Route::Lessor),
            cpu(Route::Twemproxy, |r| r.proxy_cpu_ms_per_1k),
            cpu(Route::Lessor, |r| r.proxy_cpu_ms_per_1k),
        );
    }

    fn render_targets(&self, out: &mut String) {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let _ = writeln!(out, "\n| figure | value | target | |");
        let _ = writeln!(out, "|---|---:|---:|---|");
        let (mut rps_met, mut cpu_met, mut settings) = (0, 0, 0);
        for test in TARGET_TESTS {
            for pipeline in PIPELINES {
                let [(rps, rps_ok), (cpu, cpu_ok)] = self.targets(test, pipeline);
                let setting = format!("{}, {} clients, -P {pipeline}", test.name(), self.clients);
                let _ = writeln!(
                    out,
                    "| {setting}: requests/s, lessor / twemproxy | {rps} | ≥ 1.00 | {} |",
                    verdict(rps_ok)
                );
                let _ = writeln!(
                    out,
                    "| {setting}: CPU per 1,000 commands, lessor / twemproxy | {cpu} | lessor ≤ twemproxy | {} |",
                    verdict(cpu_ok)
                );
                settings += 1;
                rps_met += usize::from(rps_ok);
                cpu_met += usize::from(cpu_ok);
            }
        }
        let _ = writeln!(
            out,
            "\nredis-benchmark targets (GET and SET, {} clients, -P 1 and -P 16): lessor requests/s >= \
             twemproxy's: met in {rps_met} of {settings}; lessor CPU/command <= twemproxy's: met in \
             {cpu_met} of {settings}",
            self.clients
        );
    }
}

/// An error short enough for a table cell, without `|`.
fn short(e: &str) -> String {
    let e = e.replace('|', "/");
    match e.char_indices().nth(140) {
        Some((at, _)) => format!("{}…", &e[..at]),
        None => e,
    }
}
