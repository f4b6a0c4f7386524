//! Protocol-aware upstreams. A `tcp` upstream's leases move bytes lessor
//! does not understand; a protocol upstream's are parsed both ways, so that
//! lessor opens the session itself (credentials stay in the sidecar), knows
//! exactly whether a released connection is clean, and can answer a whole
//! request in one `Exchange` call.

pub(crate) mod redis;
