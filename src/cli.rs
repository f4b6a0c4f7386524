//! The debugging commands behind `lessor lease` and `lessor stats`, and the
//! byte escaping they share. Kept in the library so tests drive them.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;

use lessor_client::pb::{Disposition, UpstreamStats};
use lessor_client::{Client, ClientError, LeaseOptions};

/// Turns `PING\r\n` (as typed in a shell) into bytes: `\r \n \t \0 \\ \xNN`.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                let byte = u8::from_str_radix(&hex, 16)
                    .map_err(|_| format!("`\\x{hex}` in {text:?}: expected two hex digits"))?;
                out.push(byte);
            }
            Some(other) => {
                return Err(format!(
                    "unknown escape `\\{}` in {text:?}",
                    char::from(other)
                ));
            }
            None => return Err(format!("{text:?} ends with a lone backslash")),
        }
    }
    Ok(out)
}

/// Shows bytes the way [`unescape`] reads them.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out
}

/// What `lessor lease` does.
#[derive(Debug, Clone)]
pub struct LeaseCommand {
    /// The upstream to lease from.
    pub upstream: String,
    /// Texts to send, in order, each already unescaped.
    pub sends: Vec<Vec<u8>>,
    /// How long to wait for the first reply bytes after each send.
    pub wait: Duration,
    /// Release with EVICT instead of RETURN.
    pub evict: bool,
}

/// Runs a debugging lease and writes a transcript to `out`.
pub async fn lease(
    client: &Client,
    cmd: &LeaseCommand,
    out: &mut String,
) -> Result<(), ClientError> {
    let mut lease = client
        .lease(&cmd.upstream, &LeaseOptions::default())
        .await?;
    let g = lease.granted();
    let _ = writeln!(
        out,
        "granted lease {} on {} ({}), connection {} ({}, use {}), waited {}µs",
        g.lease_id,
        g.upstream,
        g.endpoint,
        g.connection_id,
        if g.reused { "reused" } else { "new" },
        g.connection_uses,
        g.wait_us
    );
    for send in &cmd.sends {
        let _ = writeln!(out, "> {}", escape(send));
        lease.send(Bytes::copy_from_slice(send)).await?;
        // First bytes within `wait`, then whatever follows within 50ms.
        let mut deadline = cmd.wait;
        while let Ok(got) = tokio::time::timeout(deadline, lease.recv()).await {
            match got? {
                Some(data) => {
                    let _ = writeln!(out, "< {}", escape(&data));
                    deadline = Duration::from_millis(50);
                }
                None => break,
            }
        }
        if lease.ended().is_some() {
            break;
        }
    }
    let ended = match lease.ended().cloned() {
        Some(ended) => ended,
        None => {
            let disposition = if cmd.evict {
                Disposition::Evict
            } else {
                Disposition::Return
            };
            lease.release(disposition).await?
        }
    };
    let _ = write!(
        out,
        "ended: {} ({})",
        ended.disposition().as_str_name(),
        ended.reason().as_str_name()
    );
    if !ended.detail.is_empty() {
        let _ = write!(out, ": {}", ended.detail);
    }
    out.push('\n');
    Ok(())
}

/// Renders `Stats` as a table, one row per upstream.
pub fn stats_table(stats: &[UpstreamStats]) -> String {
    let header = [
        "UPSTREAM",
        "ENGINE",
        "READY",
        "CONNS",
        "IDLE",
        "LEASED",
        "WAITING",
        "MAX",
        "GRANTED",
        "CREATED",
        "CONN_ERR",
        "CHECKS",
        "CHECK_FAIL",
        "TIMEOUTS",
        "EVICTIONS",
    ];
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            let mut evictions: Vec<_> = s.evictions.iter().filter(|(_, n)| **n > 0).collect();
            evictions.sort();
            let evictions = evictions
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                s.name.clone(),
                s.engine.clone(),
                if s.ready { "yes" } else { "no" }.to_owned(),
                s.connections.to_string(),
                s.idle.to_string(),
                s.leased.to_string(),
                s.waiting.to_string(),
                s.max_size.to_string(),
                s.leases_granted.to_string(),
                s.connections_created.to_string(),
                s.connect_errors.to_string(),
                s.health_checks.to_string(),
                s.health_check_failures.to_string(),
                s.checkout_timeouts.to_string(),
                if evictions.is_empty() {
                    "-".to_owned()
                } else {
                    evictions
                },
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let _ = write!(l, "{cell:<w$}  ", w = widths[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    // Endpoints, for upstreams with more than one (discovery) or a problem.
    for s in stats {
        let show = s.endpoints.len() > 1 || s.endpoints.iter().any(|e| !e.ready || e.ejected);
        for e in s.endpoints.iter().filter(|_| show) {
            let mut state = if e.terminating {
                "terminating"
            } else if e.ready {
                "ready"
            } else {
                "not-ready"
            }
            .to_owned();
            if e.ejected {
                state.push_str(",ejected");
            }
            let _ = writeln!(
                out,
                "  {} endpoint {}  {state}  conns={} idle={}",
                s.name, e.address, e.connections, e.idle
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip() {
        let raw = b"PING\r\n\t\\ \x00\xff";
        assert_eq!(unescape(&escape(raw)).unwrap(), raw);
        assert_eq!(unescape("PING\\r\\n").unwrap(), b"PING\r\n");
        assert_eq!(unescape("\\x41\\x0a").unwrap(), b"A\n");
        assert!(unescape("\\q").unwrap_err().contains("unknown escape"));
        assert!(unescape("\\xZZ").is_err());
        assert!(unescape("ab\\").is_err());
    }

    #[test]
    fn stats_table_lists_every_upstream_and_nonzero_evictions() {
        let mut s = UpstreamStats {
            name: "redis".into(),
            engine: "bb8".into(),
            max_size: 8,
            ready: true,
            ..Default::default()
        };
        s.evictions.insert("dirty".into(), 2);
        s.evictions.insert("shutdown".into(), 0);
        let table = stats_table(&[s]);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("UPSTREAM"));
        assert!(lines[1].starts_with("redis"));
        assert!(lines[1].ends_with("dirty=2"), "{table}");
    }
}
