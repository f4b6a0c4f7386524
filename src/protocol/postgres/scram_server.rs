//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL
//! speaks it: lessor's own listener checks an unmodified client (psql,
//! pgbench, any libpq, JDBC or Rust driver) against a plaintext password
//! read from a file. Also here: the backend Authentication messages of the
//! exchange and the parser of the frontend `p` messages that carry it.
//!
//! The exchange, in the listener's words: send [`authentication_sasl`];
//! read a SASLInitialResponse, [`parse_sasl_initial_response`], hand the
//! data to [`ScramServer::client_first`] and send its answer in
//! [`authentication_sasl_continue`]; read a SASLResponse,
//! [`parse_sasl_response`], hand it to [`ScramServer::client_final`] and send
//! its answer in [`authentication_sasl_final`], then
//! [`authentication_ok`]. On any error the listener sends its own
//! ErrorResponse (PostgreSQL's is 28P01, "password authentication failed")
//! and closes.
//!
//! Held to PostgreSQL's `auth-scram.c`, not to our reading of the RFC:
//! mechanism `SCRAM-SHA-256` only; gs2 flag `n` or `y` (lessor's listener
//! has no TLS, so a client that could bind has nothing to bind to), `p=`
//! refused; no authzid (`a=`), no mandatory extension (`m=`); the username
//! in the message is ignored (the StartupMessage's user is the one
//! checked); optional extensions are skipped; the password is SASLprep'd,
//! or used raw when SASLprep refuses it. Unlike PostgreSQL, messages must
//! be UTF-8 (every driver sends ASCII) and a client that withholds its
//! initial response is refused rather than prompted.
//!
//! Invariants: one [`ScramServer`] is one exchange and only moves forward
//! (client-first, client-final, done), any error ending it; every input is
//! bounded before it is looked at and none panics; the proof is compared in
//! constant time; no error, and no `Debug`, shows the password, a key or a
//! proof.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::{BufMut, BytesMut};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The one SASL mechanism lessor offers.
pub(crate) const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// PBKDF2 rounds: PostgreSQL's default `scram_iterations`.
const ITERATIONS: u32 = 4096;
/// PostgreSQL's `SCRAM_DEFAULT_SALT_LEN`.
const SALT_LEN: usize = 16;
/// PostgreSQL's `SCRAM_RAW_NONCE_LEN`: 24 characters once in base64.
const NONCE_LEN: usize = 18;
/// Bound of a client-first-message (libpq's is about 30 bytes).
pub(crate) const MAX_CLIENT_FIRST: usize = 1024;
/// Bound of a client-final-message: it repeats the client's nonce (bounded
/// by the client-first) and adds ours and a 44-character proof.
pub(crate) const MAX_CLIENT_FINAL: usize = 2048;
/// Bound of the body of a frontend `p` message during the exchange: the
/// listener refuses a longer one before reading it.
pub(crate) const MAX_SASL_MESSAGE: usize = 4096;
/// How much of an unknown mechanism name an error repeats.
const MAX_SHOWN: usize = 64;

/// Why an exchange failed. No variant carries the password, a key or a
/// proof.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ScramError {
    /// The OS random source failed while drawing a salt and a nonce.
    #[error("drawing a SCRAM salt and nonce: the OS random source failed")]
    Random(#[source] getrandom::Error),
    /// The client chose a mechanism lessor does not offer.
    #[error("SASL mechanism {0:?} is not offered (only SCRAM-SHA-256)")]
    Mechanism(String),
    /// A message longer than its bound.
    #[error("{message} of {len} bytes exceeds its {max}-byte bound")]
    TooLong {
        /// Which message.
        message: &'static str,
        /// Its length.
        len: usize,
        /// Its bound.
        max: usize,
    },
    /// A message outside the grammar.
    #[error("malformed {message}: {reason}")]
    Malformed {
        /// Which message.
        message: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The client requires channel binding (gs2 flag `p=`).
    #[error("the client requires SCRAM channel binding, which lessor does not offer")]
    ChannelBinding,
    /// A part of SCRAM PostgreSQL does not support either.
    #[error("unsupported SCRAM feature: {0}")]
    Unsupported(&'static str),
    /// The client-final's `c=` is not the client-first's gs2 header.
    #[error("the client-final-message's channel binding does not repeat its gs2 header")]
    BindingMismatch,
    /// The client-final's nonce is not this exchange's.
    #[error("the client-final-message's nonce is not this exchange's")]
    Nonce,
    /// The proof does not verify: the client does not know the password.
    #[error("password authentication failed: the SCRAM client proof does not verify")]
    WrongPassword,
    /// A message arrived at the wrong step (or after the exchange ended).
    #[error("{0} out of order in the SCRAM exchange")]
    OutOfOrder(&'static str),
}

/// Shorthand for [`ScramError::Malformed`].
fn malformed(message: &'static str, reason: &'static str) -> ScramError {
    ScramError::Malformed { message, reason }
}

/// One SCRAM-SHA-256 exchange, server side.
pub(crate) struct ScramServer {
    /// The password, SASLprep'd as PostgreSQL does.
    password: Vec<u8>,
    /// Random per exchange: lessor holds the plaintext, not a stored verifier.
    salt: [u8; SALT_LEN],
    /// Base64 of random bytes, so printable and comma-free as SCRAM requires.
    server_nonce: String,
    state: State,
}

/// Where an exchange is: it only moves down this list.
enum State {
    First,
    Final {
        /// Base64 of the client-first's gs2 header, as `c=` must repeat it.
        cbind: String,
        /// The client's nonce followed by ours.
        nonce: String,
        client_first_bare: String,
        server_first: String,
    },
    Done,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = match self.state {
            State::First => "client-first",
            State::Final { .. } => "client-final",
            State::Done => "done",
        };
        f.debug_struct("ScramServer")
            .field("awaiting", &step)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// Starts an exchange checking `password` (the plaintext), with a fresh
    /// random salt and server nonce and 4096 iterations.
    pub(crate) fn new(password: &str) -> Result<Self, ScramError> {
        let mut salt = [0; SALT_LEN];
        let mut nonce = [0; NONCE_LEN];
        getrandom::fill(&mut salt).map_err(ScramError::Random)?;
        getrandom::fill(&mut nonce).map_err(ScramError::Random)?;
        // PostgreSQL's pg_saslprep: a password SASLprep refuses is used raw.
        let password = match stringprep::saslprep(password) {
            Ok(p) => p.into_owned().into_bytes(),
            Err(_) => password.as_bytes().to_vec(),
        };
        Ok(Self {
            password,
            salt,
            server_nonce: STANDARD.encode(nonce),
            state: State::First,
        })
    }

    /// Takes the SASLInitialResponse's data (the client-first-message) and
    /// returns the server-first-message, for AuthenticationSASLContinue.
    pub(crate) fn client_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::First) {
            self.state = State::Done;
            return Err(ScramError::OutOfOrder("client-first-message"));
        }
        self.state = State::Done;
        let first = ClientFirst::parse(data)?;
        let nonce = format!("{}{}", first.nonce, self.server_nonce);
        let server_first = format!("r={nonce},s={},i={ITERATIONS}", STANDARD.encode(self.salt));
        let out = server_first.clone().into_bytes();
        self.state = State::Final {
            cbind: STANDARD.encode(first.gs2_header),
            nonce,
            client_first_bare: first.bare.to_owned(),
            server_first,
        };
        Ok(out)
    }

    /// Takes the SASLResponse's data (the client-final-message) and, when
    /// its proof is right, returns the server-final-message, for
    /// AuthenticationSASLFinal. Runs the 4096 PBKDF2 rounds (a few
    /// milliseconds of CPU).
    pub(crate) fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::Final {
            cbind,
            nonce,
            client_first_bare,
            server_first,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfOrder("client-final-message"));
        };
        let fin = ClientFinal::parse(data)?;
        // PostgreSQL compares the base64 text, not what it decodes to.
        if fin.cbind != cbind {
            return Err(ScramError::BindingMismatch);
        }
        if fin.nonce != nonce {
            return Err(ScramError::Nonce);
        }
        let salted = hi(&self.password, &self.salt, ITERATIONS);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let auth_message = format!("{client_first_bare},{server_first},{}", fin.without_proof);
        // ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage). Knowing
        // ClientKey, the proof XOR ClientKey must be that HMAC, which hmac's
        // verify compares in constant time.
        let mut claimed = fin.proof;
        for (c, k) in claimed.iter_mut().zip(client_key) {
            *c ^= k;
        }
        keyed(&stored_key)
            .chain_update(auth_message.as_bytes())
            .verify_slice(&claimed)
            .map_err(|_| ScramError::WrongPassword)?;
        let server_key = hmac(&salted, b"Server Key");
        let signature = hmac(&server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(signature)).into_bytes())
    }
}

/// A client-first-message, checked.
struct ClientFirst<'a> {
    /// `n,,` or `y,,`.
    gs2_header: &'a str,
    /// Everything after the gs2 header: part of the AuthMessage.
    bare: &'a str,
    nonce: &'a str,
}

impl<'a> ClientFirst<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, ScramError> {
        const MSG: &str = "client-first-message";
        let text = text(MSG, data, MAX_CLIENT_FIRST)?;
        let (flag, rest) = text
            .split_once(',')
            .ok_or(malformed(MSG, "no gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(malformed(MSG, "unexpected channel-binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(malformed(MSG, "unterminated gs2 header"))?;
        if authzid.starts_with("a=") {
            return Err(ScramError::Unsupported("authorization identity (a=)"));
        }
        if !authzid.is_empty() {
            return Err(malformed(MSG, "unexpected attribute in the gs2 header"));
        }
        let gs2_header = text
            .strip_suffix(bare)
            .ok_or(malformed(MSG, "no gs2 header"))?;
        let mut attrs = bare.split(',');
        let user = attrs.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(ScramError::Unsupported("mandatory extension (m=)"));
        }
        // The name is ignored: the StartupMessage's user is the one checked.
        if !user.starts_with("n=") {
            return Err(malformed(MSG, "expected the username (n=)"));
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(malformed(MSG, "expected the nonce (r=)"))?;
        if nonce.is_empty() {
            return Err(malformed(MSG, "empty nonce"));
        }
        extensions(MSG, attrs)?;
        Ok(Self {
            gs2_header,
            bare,
            nonce,
        })
    }
}

/// A client-final-message, parsed.
struct ClientFinal<'a> {
    cbind: &'a str,
    nonce: &'a str,
    /// Everything before `,p=`: part of the AuthMessage.
    without_proof: &'a str,
    proof: [u8; 32],
}

impl<'a> ClientFinal<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, ScramError> {
        const MSG: &str = "client-final-message";
        let text = text(MSG, data, MAX_CLIENT_FINAL)?;
        let mut attrs = text.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(malformed(MSG, "expected the channel binding (c=)"))?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(malformed(MSG, "expected the nonce (r=)"))?;
        // Optional extensions, then the proof, last.
        let proof = loop {
            let attr = attrs.next().ok_or(malformed(MSG, "no proof (p=)"))?;
            if let Some(proof) = attr.strip_prefix("p=") {
                break proof;
            }
            extensions(MSG, std::iter::once(attr))?;
        };
        if attrs.next().is_some() {
            return Err(malformed(MSG, "attributes after the proof"));
        }
        let without_proof = text
            .strip_suffix(proof)
            .and_then(|t| t.strip_suffix(",p="))
            .ok_or(malformed(MSG, "no proof (p=)"))?;
        let proof = STANDARD
            .decode(proof)
            .ok()
            .and_then(|p| <[u8; 32]>::try_from(p).ok())
            .ok_or(malformed(MSG, "the proof is not 32 bytes in base64"))?;
        Ok(Self {
            cbind,
            nonce,
            without_proof,
            proof,
        })
    }
}

/// A message as text: bounded, UTF-8, and NUL-free (PostgreSQL reads it as
/// a C string and refuses one whose length disagrees).
fn text<'a>(message: &'static str, data: &'a [u8], max: usize) -> Result<&'a str, ScramError> {
    if data.len() > max {
        return Err(ScramError::TooLong {
            message,
            len: data.len(),
            max,
        });
    }
    let text = std::str::from_utf8(data).map_err(|_| malformed(message, "not UTF-8"))?;
    if text.contains('\0') {
        return Err(malformed(message, "contains a NUL byte"));
    }
    Ok(text)
}

/// Optional extensions, skipped as PostgreSQL does, but each must be an
/// attribute: one ASCII letter, `=`, a value.
fn extensions<'a>(
    message: &'static str,
    attrs: impl Iterator<Item = &'a str>,
) -> Result<(), ScramError> {
    for attr in attrs {
        match attr.as_bytes() {
            [name, b'=', ..] if name.is_ascii_alphabetic() => {}
            _ => return Err(malformed(message, "an extension is not an attribute")),
        }
    }
    Ok(())
}

/// HMAC-SHA-256 keyed with `key`.
fn keyed(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length")
}

/// HMAC-SHA-256 of `data` under `key`.
fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    keyed(key).chain_update(data).finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256's first block: SCRAM's `Hi`.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let key = keyed(password);
    let mut u: [u8; 32] = key
        .clone()
        .chain_update(salt)
        .chain_update(1u32.to_be_bytes())
        .finalize()
        .into_bytes()
        .into();
    let mut out = u;
    for _ in 1..iterations {
        u = key.clone().chain_update(u).finalize().into_bytes().into();
        for (o, x) in out.iter_mut().zip(u) {
            *o ^= x;
        }
    }
    out
}

/// Appends AuthenticationSASL: the mechanisms offered, SCRAM-SHA-256 alone.
pub(crate) fn authentication_sasl(out: &mut BytesMut) {
    authentication(10, b"SCRAM-SHA-256\0\0", out);
}

/// Appends AuthenticationSASLContinue carrying
/// [`ScramServer::client_first`]'s answer.
pub(crate) fn authentication_sasl_continue(server_first: &[u8], out: &mut BytesMut) {
    authentication(11, server_first, out);
}

/// Appends AuthenticationSASLFinal carrying [`ScramServer::client_final`]'s
/// answer.
pub(crate) fn authentication_sasl_final(server_final: &[u8], out: &mut BytesMut) {
    authentication(12, server_final, out);
}

/// Appends AuthenticationOk.
pub(crate) fn authentication_ok(out: &mut BytesMut) {
    authentication(0, &[], out);
}

/// An Authentication message (`R`): its code, then `data`, which is
/// lessor's own and a few hundred bytes at most (a longer one is a bug
/// here and panics).
fn authentication(code: i32, data: &[u8], out: &mut BytesMut) {
    let len = i32::try_from(8 + data.len()).expect("an Authentication message under 2 GiB");
    out.reserve(1 + 8 + data.len());
    out.put_u8(b'R');
    out.put_i32(len);
    out.put_i32(code);
    out.put_slice(data);
}

/// Reads a SASLInitialResponse's body (what follows the `p` tag and the
/// length): the mechanism must be SCRAM-SHA-256; returns the data, the
/// client-first-message.
pub(crate) fn parse_sasl_initial_response(body: &[u8]) -> Result<&[u8], ScramError> {
    const MSG: &str = "SASLInitialResponse";
    bounded(MSG, body)?;
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(malformed(MSG, "the mechanism name is not NUL-terminated"))?;
    let (mechanism, rest) = body.split_at(nul);
    if mechanism != SCRAM_SHA_256.as_bytes() {
        let shown = &mechanism[..mechanism.len().min(MAX_SHOWN)];
        return Err(ScramError::Mechanism(
            String::from_utf8_lossy(shown).into_owned(),
        ));
    }
    let (len, data) = rest
        .get(1..)
        .and_then(<[u8]>::split_first_chunk::<4>)
        .ok_or(malformed(MSG, "no data length"))?;
    match i32::from_be_bytes(*len) {
        -1 => Err(ScramError::Unsupported(
            "a SASLInitialResponse without the client-first-message",
        )),
        len if usize::try_from(len) == Ok(data.len()) => Ok(data),
        _ => Err(malformed(MSG, "the data length disagrees with the message")),
    }
}

/// Reads a SASLResponse's body (what follows the `p` tag and the length):
/// all of it is the data, the client-final-message.
pub(crate) fn parse_sasl_response(body: &[u8]) -> Result<&[u8], ScramError> {
    bounded("SASLResponse", body)?;
    Ok(body)
}

/// A `p` message body within [`MAX_SASL_MESSAGE`].
fn bounded(message: &'static str, body: &[u8]) -> Result<(), ScramError> {
    if body.len() > MAX_SASL_MESSAGE {
        return Err(ScramError::TooLong {
            message,
            len: body.len(),
            max: MAX_SASL_MESSAGE,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
