//! Undoing what a lease changed on a Redis session (`CLIENT REPLY ON`,
//! `DISCARD`, `UNWATCH`, `SELECT`...) before its connection is idle again:
//! the commands, and their run on the socket, every reply `+OK` or the
//! connection is closed.

use super::resp::Scanner;

/// Commands that undo a lease's session changes, sent before its
/// connection goes back to the pool.
#[derive(Debug, Clone)]
pub(crate) struct Restore {
    pub(super) request: Vec<u8>,
    pub(super) replies: usize,
    pub(super) max_frame: u64,
    /// What is undone, for logs.
    pub(super) undone: String,
}

/// How long the undo may take before the connection is closed instead.
const RESTORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl Restore {
    /// Sends the undo and reads its replies, within `RESTORE_TIMEOUT`;
    /// whether every one was `+OK`.
    pub(crate) async fn apply(&self, stream: &mut crate::net::Stream) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let undo = async {
            stream.write_all(&self.request).await.ok()?;
            let mut scanner = Scanner::new(self.max_frame);
            let (mut replies, mut ok) = (0, true);
            let mut buf = [0u8; 512];
            while replies < self.replies {
                let n = stream.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                scanner
                    .feed(&buf[..n], |f| {
                        replies += 1;
                        ok &= f.kind == b'+';
                    })
                    .ok()?;
            }
            (ok && scanner.at_boundary()).then_some(())
        };
        let done = matches!(
            tokio::time::timeout(RESTORE_TIMEOUT, undo).await,
            Ok(Some(()))
        );
        if !done {
            tracing::debug!(undone = %self.undone, "session restore failed; connection closed");
        }
        done
    }
}
