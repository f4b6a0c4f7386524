//! `GET /debug/leases`: every live lease, who holds it and since when,
//! oldest first (newest last), as an aligned table or, with
//! `?format=json`, a JSON array. `upstream=U` and `older_than=30s` filter.

use std::time::Duration;

use crate::lease::registry::{LeaseSnapshot, Leases, Printable};

/// The listing for a raw query string; `Err` names a bad parameter.
pub(crate) fn render(leases: &Leases, query: &str) -> Result<(String, &'static str), String> {
    let (mut json, mut upstream, mut older_than) = (false, None, Duration::ZERO);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "format" if value == "json" => json = true,
            "format" if value == "text" => json = false,
            "upstream" => upstream = Some(value.to_owned()),
            "older_than" => {
                older_than =
                    humantime::parse_duration(value).map_err(|e| format!("older_than: {e}"))?;
            }
            _ => {
                return Err(format!(
                    "unknown parameter `{key}` (format, upstream, older_than)"
                ));
            }
        }
    }
    let min_age = u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX);
    let rows: Vec<LeaseSnapshot> = leases
        .snapshot()
        .into_iter()
        .filter(|l| upstream.as_deref().is_none_or(|u| l.upstream == u) && l.age_ms >= min_age)
        .collect();
    if json {
        let text = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        return Ok((text + "\n", "application/json"));
    }
    Ok((table(&rows), "text/plain; charset=utf-8"))
}

/// The aligned text table; the client-chosen holder is escaped
/// ([`Printable`]), so one row stays one line.
pub(crate) fn table(rows: &[LeaseSnapshot]) -> String {
    let header = [
        "LEASE",
        "UPSTREAM",
        "ENDPOINT",
        "CONN",
        "HOLDER",
        "TRACE",
        "AGE",
        "IDLE",
        "TO_UP",
        "TO_CLIENT",
        "STATE",
    ];
    let ms = |v: u64| format!("{:.1}s", v as f64 / 1000.0);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|l| {
            vec![
                l.lease_id.clone(),
                l.upstream.clone(),
                l.endpoint.clone(),
                l.connection_id.to_string(),
                if l.holder.is_empty() {
                    "-".into()
                } else {
                    Printable(&l.holder).to_string()
                },
                if l.trace_id.is_empty() {
                    "-".into()
                } else {
                    l.trace_id.clone()
                },
                ms(l.age_ms),
                ms(l.idle_ms),
                l.bytes_to_upstream.to_string(),
                l.bytes_to_client.to_string(),
                l.state.to_owned(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out.push_str(&format!(
        "({} live {})\n",
        rows.len(),
        if rows.len() == 1 { "lease" } else { "leases" }
    ));
    out
}
