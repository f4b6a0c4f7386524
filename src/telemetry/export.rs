//! Span accounting around the SDK's batch processor. The processor drops
//! spans silently when its queue is full; here the queue bound is enforced
//! one step earlier, where drops can be counted: a span is handed on only
//! while fewer than `max_queue_size` spans are waiting for the exporter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

/// What happened to the spans lessor finished.
#[derive(Debug, Default)]
pub struct SpanCounters {
    /// Handed to the batch processor.
    pub queued: AtomicU64,
    /// Accepted by the collector.
    pub exported: AtomicU64,
    /// Sent, and refused or lost (collector down, timeout).
    pub failed: AtomicU64,
    /// Dropped because the export queue was full.
    pub dropped: AtomicU64,
}

impl SpanCounters {
    /// Spans queued and not yet exported or failed.
    fn waiting(&self) -> u64 {
        let done = self.exported.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        self.queued.load(Ordering::Relaxed).saturating_sub(done)
    }
}

/// Counts what the real exporter did with each batch.
#[derive(Debug)]
pub(super) struct CountingExporter<E> {
    inner: E,
    counters: Arc<SpanCounters>,
}

impl<E> CountingExporter<E> {
    /// Wraps `inner`.
    pub(super) fn new(inner: E, counters: Arc<SpanCounters>) -> Self {
        Self { inner, counters }
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        let counter = if result.is_ok() {
            &self.counters.exported
        } else {
            &self.counters.failed
        };
        counter.fetch_add(n, Ordering::Relaxed);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Drops (and counts) spans the batch processor has no room for.
#[derive(Debug)]
pub(super) struct Bounded<P> {
    inner: P,
    max_queue: u64,
    counters: Arc<SpanCounters>,
}

impl<P> Bounded<P> {
    /// Wraps `inner`, whose queue holds `max_queue` spans.
    pub(super) fn new(inner: P, max_queue: usize, counters: Arc<SpanCounters>) -> Self {
        Self {
            inner,
            max_queue: max_queue as u64,
            counters,
        }
    }
}

impl<P: SpanProcessor> SpanProcessor for Bounded<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.counters.waiting() >= self.max_queue {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
