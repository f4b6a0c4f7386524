//! The debugging commands behind `lessor lease` and `lessor stats`, and the
//! byte escaping they share. Kept in the library so tests drive them.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;

use lessor_client::pb::{Disposition, UpstreamStats};
use lessor_client::{Client, ClientError, LeaseOptions};

mod admin;
mod postgres;

pub use admin::{AdminCommandError, control, leases, profile, runtime, wait_ready};
pub use postgres::render_postgres;

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

/// `a=1,b=2` of the nonzero counts, sorted; `-` when there are none.
fn nonzero(counts: &std::collections::HashMap<String, u64>) -> String {
    let mut items: Vec<_> = counts.iter().filter(|(_, n)| **n > 0).collect();
    items.sort();
    if items.is_empty() {
        return "-".to_owned();
    }
    items
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(",")
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
        "PROTOCOL",
        "EXCHANGES",
        "TLS",
    ];
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
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
                nonzero(&s.evictions),
                s.protocol.clone(),
                nonzero(&s.exchanges),
                s.tls
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |t| t.mode.clone()),
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
        let show = s.endpoints.len() > 1
            || s.endpoints
                .iter()
                .any(|e| !e.ready || e.ejected || !e.role.is_empty());
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
            if !e.role.is_empty() {
                state.push(',');
                state.push_str(&e.role);
            }
            let _ = writeln!(
                out,
                "  {} endpoint {}  {state}  conns={} idle={}",
                s.name, e.address, e.connections, e.idle
            );
        }
    }
    for s in stats {
        if let Some(t) = &s.tls {
            let _ = writeln!(out, "  {} tls {}", s.name, tls_line(t));
        }
    }
    for s in stats {
        if let Some(f) = &s.fleet {
            let _ = writeln!(out, "  {} fleet {}", s.name, fleet_line(f));
        }
    }
    out
}

/// One upstream's share of its fleet budget: how the cap is decided, the
/// cap, the claim and the group's total, and waits at the cap.
fn fleet_line(f: &lessor_client::pb::UpstreamFleet) -> String {
    let mut line = format!(
        "{} group={} cap={} claim={} share={} claimed={}/{} live_peers={} held={} waiting_at_cap={} cap_waits={}",
        f.mode,
        f.group,
        f.effective_cap,
        f.claim,
        f.share,
        f.claimed_total,
        f.budget,
        f.live_peers,
        f.held,
        f.waiting,
        f.waits
    );
    if !f.last_error.is_empty() {
        let _ = write!(line, " last_error={:?}", f.last_error);
    }
    line
}

/// One upstream's TLS facts: the name verified, the client certificate's
/// expiry, and a reload that is failing.
fn tls_line(t: &lessor_client::pb::UpstreamTls) -> String {
    let mut line = format!("{} server_name={}", t.mode, t.server_name);
    if t.client_cert_not_after_unix > 0 {
        let at = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(t.client_cert_not_after_unix.unsigned_abs());
        let _ = write!(
            line,
            " client_cert_expires={}",
            humantime::format_rfc3339_seconds(at)
        );
    }
    if !t.last_reload_error.is_empty() {
        let _ = write!(line, " reload_failing=\"{}\"", t.last_reload_error);
    }
    line
}

/// Splits a command typed as text the way redis-cli does: words separated by
/// spaces; `"..."` with `\n \r \t \" \\ \xNN` escapes, or `'...'` taken as is.
pub fn split_command(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut words = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            break;
        };
        let mut word = Vec::new();
        match first {
            '"' => {
                chars.next();
                loop {
                    match chars.next() {
                        None => return Err(format!("unbalanced quotes in `{text}`")),
                        Some('"') => break,
                        Some('\\') => {
                            let escaped = match chars.next() {
                                Some('n') => "\n".to_owned(),
                                Some('r') => "\r".to_owned(),
                                Some('t') => "\t".to_owned(),
                                Some('x') => {
                                    let hex: String = chars.by_ref().take(2).collect();
                                    let byte = u8::from_str_radix(&hex, 16)
                                        .map_err(|_| format!("bad \\x escape in `{text}`"))?;
                                    word.push(byte);
                                    continue;
                                }
                                Some(c) => c.to_string(),
                                None => return Err(format!("unbalanced quotes in `{text}`")),
                            };
                            word.extend_from_slice(escaped.as_bytes());
                        }
                        Some(c) => word.extend_from_slice(c.to_string().as_bytes()),
                    }
                }
            }
            '\'' => {
                chars.next();
                loop {
                    match chars.next() {
                        None => return Err(format!("unbalanced quotes in `{text}`")),
                        Some('\'') => break,
                        Some(c) => word.extend_from_slice(c.to_string().as_bytes()),
                    }
                }
            }
            _ => {
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() {
                        break;
                    }
                    word.extend_from_slice(c.to_string().as_bytes());
                    chars.next();
                }
            }
        }
        words.push(word);
    }
    if words.is_empty() {
        return Err("an empty command".into());
    }
    Ok(words)
}

/// Shows RESP replies the way redis-cli does: `OK`, `(integer) 1`,
/// `"value"`, `(nil)`, `(error) ERR ...`, numbered aggregates. Whatever is
/// not RESP is shown escaped.
pub fn render_replies(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match render_one(rest, 0, &mut out) {
            Some(used) => rest = &rest[used..],
            None => {
                let _ = writeln!(out, "{}", escape(rest));
                break;
            }
        }
    }
    out
}

/// Renders one complete reply; returns its length, or `None` if it is not
/// one.
fn render_one(buf: &[u8], indent: usize, out: &mut String) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..line_end]).ok()?;
    let after = line_end + 2;
    let pad = " ".repeat(indent);
    match buf[0] {
        b'+' => {
            let _ = writeln!(out, "{line}");
            Some(after)
        }
        b'-' => {
            let _ = writeln!(out, "(error) {line}");
            Some(after)
        }
        b':' => {
            let _ = writeln!(out, "(integer) {line}");
            Some(after)
        }
        b',' => {
            let _ = writeln!(out, "(double) {line}");
            Some(after)
        }
        b'#' => {
            let _ = writeln!(out, "({})", if line == "t" { "true" } else { "false" });
            Some(after)
        }
        b'_' => {
            let _ = writeln!(out, "(nil)");
            Some(after)
        }
        b'$' | b'=' | b'!' => {
            let len: i64 = line.parse().ok()?;
            if len < 0 {
                let _ = writeln!(out, "(nil)");
                return Some(after);
            }
            let len = len as usize;
            let body = buf.get(after..after + len)?;
            let prefix = if buf[0] == b'!' { "(error) " } else { "" };
            let _ = writeln!(out, "{prefix}\"{}\"", escape(body));
            Some(after + len + 2)
        }
        b'*' | b'~' | b'>' | b'%' => {
            let n: i64 = line.parse().ok()?;
            if n < 0 {
                let _ = writeln!(out, "(nil)");
                return Some(after);
            }
            if n == 0 {
                let _ = writeln!(out, "(empty array)");
                return Some(after);
            }
            let items = if buf[0] == b'%' { n * 2 } else { n } as usize;
            let mut used = after;
            for i in 0..items {
                if i > 0 {
                    out.push_str(&pad);
                }
                let _ = write!(out, "{}) ", i + 1);
                used += render_one(&buf[used..], indent + 3, out)?;
            }
            Some(used)
        }
        _ => None,
    }
}

/// Runs `lessor exchange`: on a Redis upstream each text is one command
/// (split like redis-cli); on a PostgreSQL upstream each is one simple
/// query. All go in one Exchange; the replies are written to `out`
/// (PostgreSQL results aligned like psql's).
pub async fn exchange(
    client: &Client,
    upstream: &str,
    texts: &[String],
    timeout: Option<Duration>,
    out: &mut String,
) -> Result<(), ExchangeCommandError> {
    let postgres = client
        .stats(upstream)
        .await?
        .first()
        .is_some_and(|s| s.protocol == "postgres");
    let mut request = Vec::new();
    for text in texts {
        if postgres {
            let query = crate::exchange::query_message(text).ok_or_else(|| {
                ExchangeCommandError::Command("a query cannot contain NUL".into())
            })?;
            request.extend_from_slice(&query);
            continue;
        }
        let words = split_command(text).map_err(ExchangeCommandError::Command)?;
        let words: Vec<&[u8]> = words.iter().map(Vec::as_slice).collect();
        crate::protocol::redis::resp::encode_command(&mut request, &words);
    }
    let reply = client.exchange(upstream, request, timeout).await?;
    if postgres {
        out.push_str(&render_postgres(&reply.reply));
    } else {
        out.push_str(&render_replies(&reply.reply));
    }
    Ok(())
}

/// Why `lessor exchange` failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeCommandError {
    /// A command could not be split into words.
    #[error("{0}")]
    Command(String),
    /// lessor refused or failed the Exchange.
    #[error(transparent)]
    Client(#[from] ClientError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_results_print_like_psql() {
        // RowDescription (two columns), two DataRows, CommandComplete,
        // ErrorResponse, ReadyForQuery.
        let mut b = Vec::new();
        let mut msg = |tag: u8, body: &[u8]| {
            b.push(tag);
            b.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            b.extend_from_slice(body);
        };
        let field = |name: &str| {
            let mut f = name.as_bytes().to_vec();
            f.push(0);
            f.extend_from_slice(&[0; 18]);
            f
        };
        msg(b'T', &[&[0, 2][..], &field("id"), &field("name")].concat());
        let row = |id: &str, name: &str| {
            let mut r = vec![0, 2];
            for v in [id, name] {
                r.extend_from_slice(&(v.len() as i32).to_be_bytes());
                r.extend_from_slice(v.as_bytes());
            }
            r
        };
        msg(b'D', &row("1", "ada"));
        msg(b'D', &row("22", "grace"));
        msg(b'C', b"SELECT 2\0");
        msg(b'E', b"SERROR\0C22012\0Mdivision by zero\0\0");
        msg(b'Z', b"I");
        assert_eq!(
            render_postgres(&b),
            " id | name\n----+-------\n 1  | ada\n 22 | grace\n(2 rows)\n\
             ERROR:  division by zero (SQLSTATE 22012)\n"
        );
    }

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
        assert!(lines[1].contains(" dirty=2 "), "{table}");
    }

    #[test]
    fn stats_table_shows_the_fleet_share() {
        let s = UpstreamStats {
            name: "cache".into(),
            fleet: Some(lessor_client::pb::UpstreamFleet {
                budget: 20,
                effective_cap: 4,
                claim: 5,
                claimed_total: 21,
                live_peers: 5,
                group: "cache".into(),
                mode: "coordinated".into(),
                share: 4,
                held: 5,
                waiting: 2,
                waits: 9,
                ..Default::default()
            }),
            ..Default::default()
        };
        let table = stats_table(&[s]);
        assert!(
            table.contains(
                "  cache fleet coordinated group=cache cap=4 claim=5 share=4 claimed=21/20 live_peers=5 held=5 waiting_at_cap=2 cap_waits=9\n"
            ),
            "{table}"
        );
    }

    #[test]
    fn stats_table_shows_tls_and_the_client_certificate_expiry() {
        let s = UpstreamStats {
            name: "db".into(),
            tls: Some(lessor_client::pb::UpstreamTls {
                mode: "verify-full".into(),
                server_name: "db.internal".into(),
                client_cert_not_after_unix: 1_938_038_400,
                last_reload_error: "tls.cert_file: bad".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let table = stats_table(&[s]);
        let lines: Vec<_> = table.lines().collect();
        assert!(lines[0].ends_with(" TLS"), "{table}");
        assert!(lines[1].ends_with(" verify-full"), "{table}");
        assert_eq!(
            lines[2],
            "  db tls verify-full server_name=db.internal client_cert_expires=2031-06-01T00:00:00Z reload_failing=\"tls.cert_file: bad\""
        );
    }

    #[test]
    fn commands_split_like_redis_cli() {
        let words = split_command(r#"SET k "a b\n\x41" 'c d'"#).unwrap();
        assert_eq!(
            words,
            [
                b"SET".to_vec(),
                b"k".to_vec(),
                b"a b\nA".to_vec(),
                b"c d".to_vec()
            ]
        );
        assert!(split_command("GET \"open").is_err());
        assert!(split_command("   ").is_err());
    }

    #[test]
    fn replies_render_like_redis_cli() {
        let shown = render_replies(
            b"+OK\r\n:3\r\n$-1\r\n*2\r\n$1\r\na\r\n*1\r\n:1\r\n-ERR no\r\n%1\r\n+k\r\n#t\r\nxyz",
        );
        assert_eq!(
            shown,
            "OK\n(integer) 3\n(nil)\n1) \"a\"\n2) 1) (integer) 1\n(error) ERR no\n1) k\n2) (true)\nxyz\n"
        );
    }
}
