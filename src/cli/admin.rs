//! The commands that talk to the admin and control addresses: `lessor
//! leases`, `lessor wait`, `lessor pause|resume|reconnect|shutdown`, and
//! `lessor profile|runtime`.

use std::time::Duration;

/// Why a command against the admin server failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminCommandError {
    /// The admin server could not be reached.
    #[error("cannot reach lessor's admin server at {addr}: {source}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// It answered with an error.
    #[error("lessor answered {status}: {body}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// Its explanation.
        body: String,
    },
    /// `lessor wait` ran out of time.
    #[error("not ready within {0:?}")]
    NotReady(Duration),
}

/// Runs `lessor leases`: the live leases from `/debug/leases` on the admin
/// address, as the table (or JSON) the endpoint renders.
pub async fn leases(
    admin: &str,
    upstream: Option<&str>,
    older_than: Option<Duration>,
    json: bool,
) -> Result<String, AdminCommandError> {
    let mut query = Vec::new();
    if json {
        query.push("format=json".to_owned());
    }
    if let Some(upstream) = upstream {
        query.push(format!("upstream={upstream}"));
    }
    if let Some(age) = older_than {
        query.push(format!("older_than={}ms", age.as_millis()));
    }
    let path = format!("/debug/leases?{}", query.join("&"));
    admin_get(admin, &path).await
}

/// Runs `lessor wait`: polls `/readyz` until it answers 200, for an
/// application's entrypoint or an init container.
pub async fn wait_ready(admin: &str, timeout: Duration) -> Result<(), AdminCommandError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(got) = crate::admin::fetch(admin, "/readyz").await
            && got.status == 200
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(AdminCommandError::NotReady(timeout));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `lessor pause|resume|reconnect [UPSTREAM]` and `lessor shutdown`:
/// a POST to the control address (`admin.control_listen`); returns what
/// lessor did.
pub async fn control(
    control: &str,
    action: &str,
    upstream: Option<&str>,
) -> Result<String, AdminCommandError> {
    let path = match upstream {
        Some(u) => format!("/admin/{action}?upstream={u}"),
        None => format!("/admin/{action}"),
    };
    admin_call(control, "POST", &path).await
}

/// Runs `lessor profile`: a CPU profile of the running sidecar for
/// `seconds`, the gzipped `profile.proto` that `go tool pprof` reads.
pub async fn profile(control: &str, seconds: u64) -> Result<Vec<u8>, AdminCommandError> {
    let path = format!("/debug/pprof/profile?seconds={seconds}");
    let (status, body) = crate::admin::request_bytes(control, "GET", &path)
        .await
        .map_err(|source| AdminCommandError::Unreachable {
            addr: control.to_owned(),
            source,
        })?;
    if status != 200 {
        return Err(AdminCommandError::Refused {
            status,
            body: String::from_utf8_lossy(&body).trim_end().to_owned(),
        });
    }
    Ok(body)
}

/// Runs `lessor runtime`: the serving runtime's figures, as JSON (with
/// every task's stack when `tasks`).
pub async fn runtime(control: &str, tasks: bool) -> Result<String, AdminCommandError> {
    let path = if tasks {
        "/debug/runtime?tasks=1"
    } else {
        "/debug/runtime"
    };
    admin_get(control, path).await
}

/// GET on the admin server; the body when the status is 200.
async fn admin_get(admin: &str, path: &str) -> Result<String, AdminCommandError> {
    admin_call(admin, "GET", path).await
}

/// One request to the admin or control address; the body when the status
/// is 200.
async fn admin_call(admin: &str, method: &str, path: &str) -> Result<String, AdminCommandError> {
    let got = crate::admin::request(admin, method, path)
        .await
        .map_err(|source| AdminCommandError::Unreachable {
            addr: admin.to_owned(),
            source,
        })?;
    if got.status != 200 {
        return Err(AdminCommandError::Refused {
            status: got.status,
            body: got.body.trim_end().to_owned(),
        });
    }
    Ok(got.body)
}
