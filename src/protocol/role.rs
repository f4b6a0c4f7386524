//! Whether a server takes writes: what an upstream with `role: primary`
//! or `role: replica` routes by. PostgreSQL tells it at startup (14 and
//! later report `in_hot_standby`, and `default_transaction_read_only`) and
//! again by ParameterStatus when a standby is promoted; older servers and
//! idle sessions are asked with a query. Redis is asked with `ROLE`.

use std::collections::BTreeMap;

use super::postgres::Backend;
use super::{OpenError, Opener};
use crate::net::Stream;

/// A server's role, as the server itself reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerRole {
    /// Takes writes.
    Primary,
    /// Read-only: a hot standby, a Redis replica, or a PostgreSQL server
    /// whose sessions are read-only by default.
    Replica,
}

impl ServerRole {
    /// The name used in `Stats`, logs and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
        }
    }
}

/// The role PostgreSQL's ParameterStatus reports imply, when they include
/// `in_hot_standby` (14 and later). A server out of recovery whose
/// sessions default to read-only cannot take a write without the client
/// asking for it, so it counts as a replica, as libpq's
/// `target_session_attrs=read-write` judges it.
pub(crate) fn from_parameters(parameters: &BTreeMap<String, String>) -> Option<ServerRole> {
    let standby = parameters.get("in_hot_standby")?;
    let read_only = parameters
        .get("default_transaction_read_only")
        .is_some_and(|v| v == "on");
    Some(if standby == "on" || read_only {
        ServerRole::Replica
    } else {
        ServerRole::Primary
    })
}

impl Opener {
    /// The role of a freshly opened session's server: from its startup
    /// reports where they tell it, else asked. `None` for `tcp`.
    pub(crate) async fn learn_role(
        &self,
        stream: &mut Stream,
        backend: Option<&Backend>,
    ) -> Result<Option<ServerRole>, OpenError> {
        if let Some(role) = backend.and_then(|b| from_parameters(&b.parameters)) {
            return Ok(Some(role));
        }
        self.ask_role(stream).await
    }

    /// Asks an idle session's server for its role now. `None` for `tcp`.
    pub(crate) async fn ask_role(
        &self,
        stream: &mut Stream,
    ) -> Result<Option<ServerRole>, OpenError> {
        let replica = match self {
            Self::Tcp => return Ok(None),
            Self::Redis(_) => super::redis::handshake::ask_role(stream).await?,
            Self::Postgres(_) => {
                let (recovery, read_only) = super::postgres::handshake::ask_role(stream).await?;
                recovery || read_only
            }
        };
        Ok(Some(if replica {
            ServerRole::Replica
        } else {
            ServerRole::Primary
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn startup_reports_tell_the_role_from_postgresql_14() {
        assert_eq!(
            from_parameters(&params(&[("server_version", "13.9")])),
            None
        );
        assert_eq!(
            from_parameters(&params(&[
                ("in_hot_standby", "off"),
                ("default_transaction_read_only", "off")
            ])),
            Some(ServerRole::Primary)
        );
        assert_eq!(
            from_parameters(&params(&[("in_hot_standby", "on")])),
            Some(ServerRole::Replica)
        );
        assert_eq!(
            from_parameters(&params(&[
                ("in_hot_standby", "off"),
                ("default_transaction_read_only", "on")
            ])),
            Some(ServerRole::Replica),
            "read-only by default takes no write"
        );
    }
}
