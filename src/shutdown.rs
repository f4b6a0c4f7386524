//! Signals: SIGTERM (how Kubernetes stops a pod) and SIGINT both start the
//! graceful drain that `server::run` performs; a second signal exits at once.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first SIGTERM or SIGINT. From then on, the next one exits
/// the process immediately (status 1), for an operator who cannot wait for
/// the drain.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: the admin server (on a thread of its own) may answer
/// `/livez` before the server polls its shutdown future, and a SIGTERM in
/// between must drain, not kill. Call it inside the runtime.
pub fn first_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (mut term, mut int) = match handlers {
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
}
