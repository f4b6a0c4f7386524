//! The Markdown table `--compare` prints.

use std::fmt::Write as _;

use super::CompareReport;

impl CompareReport {
    /// The Markdown report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "lessor-bench --compare: upstream `{}`, {}-byte requests; {} CPUs; lessor runtime.worker_threads={}, bench client runtime {} worker, baseline+upstream runtime {} worker\n",
            self.upstream,
            self.payload,
            self.cpus,
            self.lessor_workers,
            self.client_workers,
            self.server_workers
        );
        let _ = writeln!(out, "| | operation | p50 µs | p90 µs | p99 µs | p99.9 µs |");
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
        for m in &self.measures {
            let l = &m.latency;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                m.name, m.what, l.p50, l.p90, l.p99, l.p999
            );
        }
        let exchanges = self.throughput.iter().any(|t| t.e_per_sec.is_some());
        let _ = writeln!(
            out,
            "\n| concurrency | U echoes/s | C bb8 leases/s | C deadpool leases/s | C bb8 / U |{}",
            if exchanges {
                " E exchanges/s | E / U |"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "|---:|---:|---:|---:|---:|{}",
            if exchanges { "---:|---:|" } else { "" }
        );
        for t in &self.throughput {
            let e = t.e_per_sec.map_or(String::new(), |e| {
                format!(" {e:.0} | {:.2} |", e / t.u_per_sec.max(1e-9))
            });
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.0} | {:.2} |{e}",
                t.concurrency,
                t.u_per_sec,
                t.c_bb8_per_sec,
                t.c_deadpool_per_sec,
                t.c_bb8_per_sec / t.u_per_sec.max(1e-9)
            );
        }
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let growth =
            (self.rss_after_all_kib as f64 / self.rss_after_10k_kib.max(1) as f64 - 1.0) * 100.0;
        let _ = writeln!(out, "\n| figure | value | target | |");
        let _ = writeln!(out, "|---|---:|---:|---|");
        let _ = writeln!(
            out,
            "| A p50 / U p50 | {:.2} | ≤ 1.30 | {} |",
            self.ratio_a_over_u,
            verdict(self.ratio_a_over_u <= 1.3)
        );
        let _ = writeln!(
            out,
            "| R p50 / (U + T) p50 | {:.2} | ≤ 1.30 | {} |",
            self.ratio_r_over_u_plus_t,
            verdict(self.ratio_r_over_u_plus_t <= 1.3)
        );
        let _ = writeln!(
            out,
            "| C throughput / U throughput at 32 | {:.2} | ≥ 0.50 | {} |",
            self.ratio_c_over_u_throughput_32,
            verdict(self.ratio_c_over_u_throughput_32 >= 0.5)
        );
        if let Some(r) = self.ratio_e_over_u_plus_t {
            let _ = writeln!(
                out,
                "| E PING p50 / (U + T) p50 | {r:.2} | ≤ 1.20 | {} |",
                verdict(r <= 1.2)
            );
        }
        if let Some(r) = self.ratio_e_over_u_throughput_32 {
            let _ = writeln!(
                out,
                "| E throughput / U throughput at 32 | {r:.2} | ≥ 0.80 | {} |",
                verdict(r >= 0.8)
            );
        }
        let _ = writeln!(
            out,
            "| idle RSS, 4 upstreams × 32 connections | {:.1} MiB | ≤ 20 MiB | {} |",
            self.rss_idle_4x32_kib as f64 / 1024.0,
            verdict(self.rss_idle_4x32_kib <= 20 * 1024)
        );
        let _ = writeln!(
            out,
            "| RSS after {} cycles vs after 10k | {:+.1}% ({} → {} KiB) | within 10% | {} |",
            self.stability_cycles,
            growth,
            self.rss_after_10k_kib,
            self.rss_after_all_kib,
            verdict(growth.abs() <= 10.0)
        );
        let _ = writeln!(
            out,
            "| idle RSS, 2 upstreams × 8 connections | {:.1} MiB | | |",
            self.rss_idle_kib as f64 / 1024.0
        );
        let _ = writeln!(
            out,
            "| lessor CPU per 1000 lease cycles | {:.1} ms | | |",
            self.cpu_ms_per_1k_cycles
        );
        if let Some(cpu) = self.cpu_ms_per_1k_exchanges {
            let _ = writeln!(out, "| lessor CPU per 1000 Exchanges | {cpu:.1} ms | | |");
        }
        if let Some(listener) = &self.redis_benchmark {
            out.push('\n');
            out.push_str(&listener.render());
        }
        out
    }
}
