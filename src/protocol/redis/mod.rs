//! Redis: the client-side reader that follows redis-server's own parser,
//! the RESP scanner of replies, the session tracker behind a lease's end rules,
//! and the handshake that opens an authenticated, selected connection.

pub(crate) mod command;
pub(crate) mod handshake;
pub(crate) mod resp;
pub(crate) mod restore;
pub(crate) mod session;
