//! The fake API's Leases live in `lessor::testing` (the fleet simulation of
//! `lessor-bench` serves them too).

pub use lessor::testing::FakeLeases as Leases;
