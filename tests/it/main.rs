//! lessor's integration tests: one crate (linking the dependency tree once),
//! a module per behaviour. Real sockets and real servers only.

mod admin;
mod backpressure;
mod blackhole;
mod cli;
mod conformance;
mod discovery;
mod failover;
mod faults;
mod fleet;
mod leak;
mod ops;
mod pg;
mod pg_diff;
mod pg_listen;
mod pool;
mod proto_golden;
mod protocol;
mod redis;
mod redis_diff;
mod redis_listen;
mod redis_listen_diff;
mod redis_listen_hostile;
mod redis_listen_lane_attack;
mod redis_listen_lane_attack2;
mod redis_listen_shared;
mod resp;
mod server;
mod shutdown;
mod stall;
mod support;
mod telemetry;
mod tls;
