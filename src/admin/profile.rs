//! The tools teams use on their Go services, pointed at lessor itself, on
//! the control address (loopback by default):
//!
//! - `GET /debug/pprof/profile?seconds=N`: a CPU profile of every lessor
//!   thread for N seconds (default 30, at most 60), sampled at 99 Hz by
//!   pprof-rs, as the gzipped `profile.proto` that `go tool pprof` reads,
//!   with symbolized Rust frames. One at a time: a second request while one
//!   runs gets 429.
//! - `GET /debug/pprof/heap`: the live heap by allocation site, from
//!   jemalloc's sampling profiler (one allocation per 512 KiB on average),
//!   as the gzipped `profile.proto` `go tool pprof` reads.
//! - `GET /debug/runtime`: the serving tokio runtime's figures as JSON
//!   (workers, alive tasks, global queue depth, busy time and parks per
//!   worker, blocking threads); `/metrics` carries the same as
//!   `lessor_runtime_*`. `?tasks=1` adds every task's stack (tokio's task
//!   dump, in builds that have it: see `.cargo/config.toml`).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

/// The longest profile one request may take.
const SECONDS_MAX: u64 = 60;
/// Samples per second: not a divisor of common timer rates, as Go's 100 Hz
/// profiler avoids lockstep too.
const FREQUENCY: i32 = 99;

/// What the profiling handlers need.
#[derive(Clone)]
pub(crate) struct ProfileState {
    /// The runtime that serves leases (not the admin thread's own).
    pub runtime: tokio::runtime::Handle,
    /// Set while a CPU profile runs: one at a time.
    pub busy: Arc<AtomicBool>,
}

/// `?seconds=N`.
#[derive(Debug, Deserialize)]
pub(crate) struct ProfileQuery {
    seconds: Option<u64>,
}

/// Clears the busy flag however the request ends (a client that leaves
/// mid-profile drops the handler's future).
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// `GET /debug/pprof/profile`.
pub(crate) async fn cpu(
    State(state): State<ProfileState>,
    Query(q): Query<ProfileQuery>,
) -> Response {
    let seconds = q.seconds.unwrap_or(30);
    if seconds == 0 || seconds > SECONDS_MAX {
        return (
            StatusCode::BAD_REQUEST,
            format!("seconds must be between 1 and {SECONDS_MAX}\n"),
        )
            .into_response();
    }
    if state.busy.swap(true, Ordering::AcqRel) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "a CPU profile is already running; try again when it ends\n",
        )
            .into_response();
    }
    let _running = Running(state.busy.clone());
    let guard = match pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
    {
        Ok(guard) => guard,
        Err(e) => return unavailable(&e.to_string()),
    };
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    // Symbolizing is CPU work: off the admin thread's only worker.
    let encoded = tokio::task::spawn_blocking(move || encode(&guard)).await;
    match encoded {
        Ok(Ok(body)) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile.pb.gz\"",
                ),
            ],
            body,
        )
            .into_response(),
        Ok(Err(e)) => unavailable(&e),
        Err(e) => unavailable(&e.to_string()),
    }
}

fn encode(guard: &pprof::ProfilerGuard<'_>) -> Result<Vec<u8>, String> {
    use pprof::protos::Message;
    let report = guard.report().build().map_err(|e| e.to_string())?;
    let profile = report.pprof().map_err(|e| e.to_string())?;
    let raw = profile.write_to_bytes().map_err(|e| e.to_string())?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).map_err(|e| e.to_string())?;
    gz.finish().map_err(|e| e.to_string())
}

fn unavailable(why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("CPU profile failed: {why}\n"),
    )
        .into_response()
}

/// `GET /debug/pprof/heap`: what the live heap holds, by allocation
/// site, as the gzipped `profile.proto` of jemalloc's sampling profiler
/// (addresses with the binary's mappings: `go tool pprof <lessor binary>
/// heap.pb.gz` names them).
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub(crate) async fn heap() -> Response {
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return heap_unavailable("jemalloc's profiler is off in this process");
    };
    let ctl = ctl.clone();
    // The dump writes a file and parses it: off the admin thread's worker.
    let dumped = tokio::task::spawn_blocking(move || ctl.blocking_lock().dump_pprof()).await;
    match dumped {
        Ok(Ok(body)) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"heap.pb.gz\"",
                ),
            ],
            body,
        )
            .into_response(),
        Ok(Err(e)) => heap_unavailable(&e.to_string()),
        Err(e) => heap_unavailable(&e.to_string()),
    }
}

/// `GET /debug/pprof/heap` where lessor runs on the system allocator.
#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
pub(crate) async fn heap() -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        "this build runs on the system allocator, which keeps no heap profile \
         (lessor uses jemalloc's profiler on Linux x86_64 and aarch64)\n",
    )
        .into_response()
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
fn heap_unavailable(why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("heap profile failed: {why}\n"),
    )
        .into_response()
}

/// The serving runtime's figures.
#[derive(Debug, serde::Serialize)]
pub(crate) struct RuntimeFigures {
    /// Worker threads.
    pub workers: usize,
    /// Tasks alive now.
    pub alive_tasks: usize,
    /// Tasks waiting in the shared queue.
    pub global_queue_depth: usize,
    /// Per worker: time spent polling tasks, times it parked, and (where
    /// the build has tokio's unstable figures) its local queue's depth.
    pub per_worker: Vec<WorkerFigures>,
    /// Threads of the blocking pool (profile encoding, large Exchange
    /// requests, SCRAM key derivation), and tasks waiting for one; `None`
    /// in a build without tokio's unstable figures.
    pub blocking_threads: Option<usize>,
    /// Tasks waiting for a blocking thread.
    pub blocking_queue_depth: Option<usize>,
    /// Whether this build can dump every task's stack (`?tasks=1`).
    pub task_dump_available: bool,
    /// A CPU profile is being taken now.
    pub profiling: bool,
    /// `?tasks=1`: every task's stack, as tokio traces it (idle tasks, at
    /// the await where each waits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<TaskTrace>>,
}

/// One worker's figures.
#[derive(Debug, serde::Serialize)]
pub(crate) struct WorkerFigures {
    /// Busy time since the runtime started, in seconds.
    pub busy_seconds: f64,
    /// Times it went to sleep for want of work since the runtime started.
    pub parks: u64,
    /// Tasks in its local queue now (unstable figures only).
    pub local_queue_depth: Option<usize>,
}

/// One task of a dump.
#[derive(Debug, serde::Serialize)]
pub(crate) struct TaskTrace {
    /// tokio's id of the task.
    pub id: String,
    /// Its stack: the frames from the task's future down to the await it
    /// waits at.
    pub trace: String,
}

/// Whether this build carries tokio's task dump.
pub(crate) const TASK_DUMP: bool = cfg!(all(
    tokio_unstable,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
));

impl RuntimeFigures {
    /// The figures of `runtime` now.
    pub(crate) fn of(runtime: &tokio::runtime::Handle) -> Self {
        let m = runtime.metrics();
        let workers = m.num_workers();
        #[cfg(tokio_unstable)]
        let (blocking_threads, blocking_queue_depth) = (
            Some(m.num_blocking_threads()),
            Some(m.blocking_queue_depth()),
        );
        #[cfg(not(tokio_unstable))]
        let (blocking_threads, blocking_queue_depth) = (None, None);
        Self {
            workers,
            alive_tasks: m.num_alive_tasks(),
            global_queue_depth: m.global_queue_depth(),
            per_worker: (0..workers)
                .map(|w| WorkerFigures {
                    busy_seconds: m.worker_total_busy_duration(w).as_secs_f64(),
                    parks: m.worker_park_count(w),
                    #[cfg(tokio_unstable)]
                    local_queue_depth: Some(m.worker_local_queue_depth(w)),
                    #[cfg(not(tokio_unstable))]
                    local_queue_depth: None,
                })
                .collect(),
            blocking_threads,
            blocking_queue_depth,
            task_dump_available: TASK_DUMP,
            profiling: false,
            tasks: None,
        }
    }
}

/// `?tasks=1`.
#[derive(Debug, Deserialize)]
pub(crate) struct RuntimeQuery {
    tasks: Option<String>,
}

/// How long a task dump may take: every worker must reach a point where it
/// can trace its idle tasks.
const DUMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Every task's stack, taken on the serving runtime itself.
#[cfg(all(
    tokio_unstable,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
async fn task_dump(runtime: &tokio::runtime::Handle) -> Result<Vec<TaskTrace>, String> {
    let handle = runtime.clone();
    let dumped = runtime.spawn(async move { handle.dump().await });
    let dump = tokio::time::timeout(DUMP_TIMEOUT, dumped)
        .await
        .map_err(|_| format!("the task dump did not finish within {DUMP_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    Ok(dump
        .tasks()
        .iter()
        .map(|task| TaskTrace {
            id: task.id().to_string(),
            trace: task.trace().to_string(),
        })
        .collect())
}

#[cfg(not(all(
    tokio_unstable,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
async fn task_dump(_: &tokio::runtime::Handle) -> Result<Vec<TaskTrace>, String> {
    Err(format!(
        "this build has no task dump (it needs the `tokio_unstable` cfg and tokio's `taskdump` feature, which the repository's .cargo/config.toml and Cargo.toml set on Linux x86_64 and aarch64)"
    ))
}

/// `GET /debug/runtime` (`?tasks=1`: with every task's stack).
pub(crate) async fn runtime(
    State(state): State<ProfileState>,
    Query(q): Query<RuntimeQuery>,
) -> Response {
    let mut figures = RuntimeFigures::of(&state.runtime);
    figures.profiling = state.busy.load(Ordering::Acquire);
    if matches!(q.tasks.as_deref(), Some("1" | "true")) {
        match task_dump(&state.runtime).await {
            Ok(tasks) => figures.tasks = Some(tasks),
            Err(why) => return (StatusCode::NOT_IMPLEMENTED, why + "\n").into_response(),
        }
    }
    match serde_json::to_string_pretty(&figures) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json + "\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
