//! Signals: SIGTERM (how Kubernetes stops a pod) and SIGINT both start the
//! graceful drain that `server::run` performs; a second signal exits at once.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first SIGTERM or SIGINT. From then on, the next one exits
/// the process immediately (status 1), for an operator who cannot wait for
/// the drain.
pub async fn first_signal() {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; SIGTERM will kill without draining");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "draining"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "draining"),
    }
    // Detached on purpose: this task's only job is to end the process.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without draining");
        // Give the log line a moment to reach stdout.
        tokio::time::sleep(Duration::from_millis(10)).await;
        std::process::exit(1);
    });
}
