//! `lessor demo`: a self-contained tour (filled in below).

/// Runs the demo and returns its report.
pub async fn run(leases: usize) -> Result<String, std::io::Error> {
    Ok(format!("{leases}\n"))
}
