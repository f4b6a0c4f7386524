//! `lessor exchange` on a PostgreSQL upstream: backend messages printed the
//! way psql prints them.

/// PostgreSQL backend messages as psql prints them: each result set as an
/// aligned table with its row count, each command's tag, errors and
/// notices with their SQLSTATE.
pub fn render_postgres(bytes: &[u8]) -> String {
    use fallible_iterator::FallibleIterator;
    use postgres_protocol::message::backend::Message;
    let mut buf = bytes::BytesMut::from(bytes);
    let mut out = String::new();
    let mut columns: Vec<String> = Vec::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    while let Ok(Some(message)) = Message::parse(&mut buf) {
        match message {
            Message::RowDescription(body) => {
                columns = body
                    .fields()
                    .map(|f| Ok(f.name().to_owned()))
                    .collect()
                    .unwrap_or_default();
                rows.clear();
            }
            Message::DataRow(body) => {
                let row = body
                    .ranges()
                    .map(|r| Ok(r.map_or_else(String::new, |r| text(&body.buffer()[r]))))
                    .collect()
                    .unwrap_or_default();
                rows.push(row);
            }
            Message::CommandComplete(body) => {
                let tag = body.tag().unwrap_or_default().to_owned();
                if columns.is_empty() {
                    out.push_str(&tag);
                    out.push('\n');
                } else {
                    out.push_str(&aligned(&columns, &rows));
                    columns.clear();
                    rows.clear();
                }
            }
            Message::ErrorResponse(body) => {
                out.push_str(&server_message(body.fields()));
                columns.clear();
            }
            Message::NoticeResponse(body) => out.push_str(&server_message(body.fields())),
            Message::EmptyQueryResponse => out.push_str("(empty query)\n"),
            _ => {}
        }
    }
    out
}

/// An ErrorResponse or NoticeResponse as one line, psql's way.
fn server_message(fields: postgres_protocol::message::backend::ErrorFields<'_>) -> String {
    let e = crate::protocol::postgres::handshake::ServerError::from_fields(fields);
    format!("{}:  {} (SQLSTATE {})\n", e.severity, e.message, e.code)
}

/// One result set, psql's aligned format.
fn aligned(columns: &[String], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .chain(std::iter::once(&columns[i]))
            .map(|v| v.chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..columns.len()).map(width).collect();
    let line = |cells: &[String]| {
        let cells: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(i, w)| format!(" {:<w$} ", cells.get(i).map_or("", String::as_str)))
            .collect();
        format!("{}\n", cells.join("|").trim_end())
    };
    let mut out = line(columns);
    let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(w + 2)).collect();
    out.push_str(&dashes.join("+"));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
    }
    let n = rows.len();
    out.push_str(&format!("({n} {})\n", if n == 1 { "row" } else { "rows" }));
    out
}
