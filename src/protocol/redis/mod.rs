//! Redis: the RESP scanner, the session tracker behind a lease's end rules,
//! and the handshake that opens an authenticated, selected connection.

pub(crate) mod handshake;
pub(crate) mod resp;
pub(crate) mod session;
