//! The exchange against `postgres-protocol`'s SCRAM client (what
//! tokio-postgres runs against a real PostgreSQL) and its message codecs.

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use proptest::prelude::*;

use super::*;

const PASSWORD: &str = "correct horse battery staple";

/// What a client-first left behind: the client awaiting the
/// server-first-message, the server awaiting the client-final.
fn begin(
    server_password: &str,
    client: &[u8],
    binding: ChannelBinding,
) -> (ScramSha256, ScramServer) {
    let client = ScramSha256::new(client, binding);
    let mut server = ScramServer::new(server_password).unwrap();
    let server_first = server.client_first(client.message()).unwrap();
    let mut client = client;
    client.update(&server_first).unwrap();
    (client, server)
}

/// The whole exchange, every message through the wire codecs of both sides.
fn exchange(
    server_password: &str,
    client_password: &[u8],
    binding: ChannelBinding,
) -> Result<(), ScramError> {
    let mut out = BytesMut::new();
    authentication_sasl(&mut out);
    let Some(Message::AuthenticationSasl(body)) = Message::parse(&mut out).unwrap() else {
        panic!("not AuthenticationSASL");
    };
    let offered: Vec<String> = body
        .mechanisms()
        .map(|m| Ok(m.to_owned()))
        .collect()
        .unwrap();
    assert_eq!(offered, [SCRAM_SHA_256]);

    let mut client = ScramSha256::new(client_password, binding);
    let mut server = ScramServer::new(server_password).unwrap();
    frontend::sasl_initial_response(SCRAM_SHA_256, client.message(), &mut out).unwrap();
    let client_first = parse_sasl_initial_response(&out[5..])?.to_vec();
    out.clear();
    let server_first = server.client_first(&client_first)?;
    authentication_sasl_continue(&server_first, &mut out);
    let Some(Message::AuthenticationSaslContinue(body)) = Message::parse(&mut out).unwrap() else {
        panic!("not AuthenticationSASLContinue");
    };
    client.update(body.data()).unwrap();

    frontend::sasl_response(client.message(), &mut out).unwrap();
    let client_final = parse_sasl_response(&out[5..])?.to_vec();
    out.clear();
    let server_final = server.client_final(&client_final)?;
    authentication_sasl_final(&server_final, &mut out);
    let Some(Message::AuthenticationSaslFinal(body)) = Message::parse(&mut out).unwrap() else {
        panic!("not AuthenticationSASLFinal");
    };
    client
        .finish(body.data())
        .expect("the client accepts the server's signature");

    authentication_ok(&mut out);
    assert!(matches!(
        Message::parse(&mut out).unwrap(),
        Some(Message::AuthenticationOk)
    ));
    assert!(out.is_empty());
    Ok(())
}

#[test]
fn the_right_password_is_accepted_and_the_client_accepts_the_server_final() {
    exchange(PASSWORD, PASSWORD.as_bytes(), ChannelBinding::unsupported()).unwrap();
    exchange(PASSWORD, PASSWORD.as_bytes(), ChannelBinding::unrequested()).unwrap();
    exchange("", b"", ChannelBinding::unsupported()).unwrap();
}

#[test]
fn a_wrong_password_fails_as_such() {
    let err = exchange(
        PASSWORD,
        b"correct horse battery stable",
        ChannelBinding::unsupported(),
    );
    assert_eq!(err, Err(ScramError::WrongPassword));
}

#[test]
fn the_password_is_saslpreped_as_postgresql_does() {
    // A soft hyphen maps to nothing and U+2168 (ROMAN NUMERAL NINE) to "IX".
    exchange(
        "I\u{00AD}X",
        "\u{2168}".as_bytes(),
        ChannelBinding::unsupported(),
    )
    .unwrap();
    // A control character is prohibited: both sides fall back to the raw bytes.
    exchange(
        "a\u{7}b",
        "a\u{7}b".as_bytes(),
        ChannelBinding::unsupported(),
    )
    .unwrap();
    assert_eq!(
        exchange("a\u{7}b", b"ab", ChannelBinding::unsupported()),
        Err(ScramError::WrongPassword)
    );
}

#[test]
fn a_tampered_nonce_fails_as_such() {
    let (client, mut server) = begin(PASSWORD, PASSWORD.as_bytes(), ChannelBinding::unsupported());
    let fin = std::str::from_utf8(client.message()).unwrap();
    let (head, proof) = fin.split_once(",p=").unwrap();
    // The nonce's last character changed (to one it is not: nonces are
    // random, and a fixed replacement would sometimes change nothing).
    let last = if head.ends_with('x') { 'y' } else { 'x' };
    let tampered = format!("{}{last},p={proof}", &head[..head.len() - 1]);
    assert_eq!(
        server.client_final(tampered.as_bytes()),
        Err(ScramError::Nonce)
    );
}

#[test]
fn a_changed_channel_binding_attribute_fails() {
    let (client, mut server) = begin(PASSWORD, PASSWORD.as_bytes(), ChannelBinding::unsupported());
    let fin = std::str::from_utf8(client.message()).unwrap();
    // "n,," sent, "y,," claimed.
    let changed = fin.replacen("c=biws", "c=eSws", 1);
    assert_eq!(
        server.client_final(changed.as_bytes()),
        Err(ScramError::BindingMismatch)
    );
}

#[test]
fn channel_binding_is_refused() {
    let client = ScramSha256::new(
        PASSWORD.as_bytes(),
        ChannelBinding::tls_server_end_point(vec![7; 32]),
    );
    assert!(client.message().starts_with(b"p=tls-server-end-point,,"));
    let mut server = ScramServer::new(PASSWORD).unwrap();
    assert_eq!(
        server.client_first(client.message()),
        Err(ScramError::ChannelBinding)
    );
}

#[test]
fn garbage_client_first_messages_are_refused() {
    let malformed: &[&[u8]] = &[
        b"",
        b"garbage",
        b"n",
        b"n,",
        b"n,,",
        b"n,,n=",
        b"n,,n=,r=",
        b"n,,r=abc",
        b"n,,n=,x=abc",
        b"x,,n=,r=abc",
        b"n,u,n=,r=abc",
        b"n,,n=,r=abc,=x",
        b"n,,n=,r=abc,1=x",
        b"n,,n=,r=abc,",
        b"n,,n=,r=a\0bc",
        b"n,,n=,r=\xff",
    ];
    for data in malformed {
        let mut server = ScramServer::new(PASSWORD).unwrap();
        let err = server.client_first(data).unwrap_err();
        assert!(
            matches!(err, ScramError::Malformed { .. }),
            "{data:?}: {err:?}"
        );
    }
    let unsupported: &[&[u8]] = &[b"n,a=admin,n=,r=abc", b"n,,m=ext,n=,r=abc"];
    for data in unsupported {
        let mut server = ScramServer::new(PASSWORD).unwrap();
        let err = server.client_first(data).unwrap_err();
        assert!(
            matches!(err, ScramError::Unsupported(_)),
            "{data:?}: {err:?}"
        );
    }
}

#[test]
fn what_postgresql_accepts_in_a_client_first_is_accepted() {
    for data in [
        &b"n,,n=,r=abc"[..],
        b"y,,n=user,r=abc",
        b"n,,n=*,r=a=b,x=1,Y=",
        b"n,,n=,r=\xc3\xa9",
    ] {
        let mut server = ScramServer::new(PASSWORD).unwrap();
        let first = server.client_first(data).unwrap();
        assert!(first.starts_with(b"r="), "{data:?}");
    }
}

#[test]
fn garbage_client_final_messages_are_refused() {
    let (client, _) = begin(PASSWORD, PASSWORD.as_bytes(), ChannelBinding::unsupported());
    let good = std::str::from_utf8(client.message()).unwrap().to_owned();
    let (head, proof) = good.split_once(",p=").unwrap();
    let bad = [
        String::new(),
        "garbage".into(),
        head.to_owned(),
        format!("{head},p="),
        format!("{head},p=AAAA"),
        format!("{head},p={proof},x=1"),
        format!("{head},p={proof},"),
        format!("{head},1=x,p={proof}"),
        format!("{head},p={}", &proof[1..]),
        good.replacen("c=", "C=", 1),
        good.replacen(",r=", ",R=", 1),
    ];
    for data in &bad {
        let (_, mut server) = begin(PASSWORD, PASSWORD.as_bytes(), ChannelBinding::unsupported());
        let err = server.client_final(data.as_bytes()).unwrap_err();
        assert!(
            matches!(err, ScramError::Malformed { .. }),
            "{data:?}: {err:?}"
        );
    }
}

/// A client-final's proof as a client computes it, for messages
/// `postgres-protocol`'s client will not write (checked against that client
/// by the exchanges above).
fn prove(
    password: &str,
    client_first_bare: &str,
    server_first: &str,
    without_proof: &str,
) -> String {
    let salt = server_first
        .split(",s=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    let salted = hi(
        password.as_bytes(),
        &STANDARD.decode(salt).unwrap(),
        ITERATIONS,
    );
    let client_key = hmac(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
    let mut proof = hmac(&stored_key, auth_message.as_bytes());
    for (p, k) in proof.iter_mut().zip(client_key) {
        *p ^= k;
    }
    STANDARD.encode(proof)
}

#[test]
fn extensions_are_skipped_and_signed() {
    let mut server = ScramServer::new(PASSWORD).unwrap();
    let server_first = server.client_first(b"y,,n=,r=abc,x=ext").unwrap();
    let server_first = String::from_utf8(server_first).unwrap();
    let nonce = server_first.split(',').next().unwrap();
    let without_proof = format!("c=eSws,{nonce},z=1,q=");
    let proof = prove(PASSWORD, "n=,r=abc,x=ext", &server_first, &without_proof);
    let fin = format!("{without_proof},p={proof}");
    let server_final = server.client_final(fin.as_bytes()).unwrap();
    assert!(server_final.starts_with(b"v="));

    // Signed without the extension, the proof no longer verifies.
    let mut server = ScramServer::new(PASSWORD).unwrap();
    let server_first = String::from_utf8(server.client_first(b"n,,n=,r=abc").unwrap()).unwrap();
    let nonce = server_first.split(',').next().unwrap();
    let proof = prove(
        PASSWORD,
        "n=,r=abc",
        &server_first,
        &format!("c=biws,{nonce}"),
    );
    let fin = format!("c=biws,{nonce},z=1,p={proof}");
    assert_eq!(
        server.client_final(fin.as_bytes()),
        Err(ScramError::WrongPassword)
    );
}

#[test]
fn a_client_first_over_1_kib_is_too_long() {
    let mut data = b"n,,n=,r=".to_vec();
    data.resize(MAX_CLIENT_FIRST, b'a');
    ScramServer::new(PASSWORD)
        .unwrap()
        .client_first(&data)
        .unwrap();
    data.push(b'a');
    let err = ScramServer::new(PASSWORD).unwrap().client_first(&data);
    assert_eq!(
        err,
        Err(ScramError::TooLong {
            message: "client-first-message",
            len: MAX_CLIENT_FIRST + 1,
            max: MAX_CLIENT_FIRST
        })
    );
}

#[test]
fn the_exchange_only_moves_forward() {
    let mut server = ScramServer::new(PASSWORD).unwrap();
    assert_eq!(
        server.client_final(b"c=biws,r=x,p=y"),
        Err(ScramError::OutOfOrder("client-final-message"))
    );
    assert_eq!(
        server.client_first(b"n,,n=,r=abc"),
        Err(ScramError::OutOfOrder("client-first-message"))
    );

    let (client, mut server) = begin(PASSWORD, PASSWORD.as_bytes(), ChannelBinding::unsupported());
    assert_eq!(
        server.client_first(b"n,,n=,r=abc"),
        Err(ScramError::OutOfOrder("client-first-message"))
    );
    assert_eq!(
        server.client_final(client.message()),
        Err(ScramError::OutOfOrder("client-final-message"))
    );

    // One failed proof ends the exchange: no second guess.
    let (client, mut server) = begin(PASSWORD, b"wrong", ChannelBinding::unsupported());
    assert_eq!(
        server.client_final(client.message()),
        Err(ScramError::WrongPassword)
    );
    assert_eq!(
        server.client_final(client.message()),
        Err(ScramError::OutOfOrder("client-final-message"))
    );
}

#[test]
fn each_exchange_draws_its_own_salt_and_nonce() {
    let first = |s: &mut ScramServer| s.client_first(b"n,,n=,r=abc").unwrap();
    let a = first(&mut ScramServer::new(PASSWORD).unwrap());
    let b = first(&mut ScramServer::new(PASSWORD).unwrap());
    assert_ne!(a, b);
    let a = std::str::from_utf8(&a).unwrap();
    assert!(a.ends_with(",i=4096"), "{a}");
    let salt = a.split(",s=").nth(1).unwrap().split(',').next().unwrap();
    assert_eq!(STANDARD.decode(salt).unwrap().len(), SALT_LEN);
}

#[test]
fn errors_and_debug_show_no_secret() {
    let (client, mut server) = begin(PASSWORD, b"hunter2", ChannelBinding::unsupported());
    let fin = std::str::from_utf8(client.message()).unwrap().to_owned();
    let proof = fin.split_once(",p=").unwrap().1.to_owned();
    let shown = format!("{server:?}");
    let err = server.client_final(fin.as_bytes()).unwrap_err();
    for text in [shown, err.to_string(), format!("{err:?}")] {
        assert!(
            !text.contains(PASSWORD) && !text.contains("hunter2") && !text.contains(&proof),
            "{text}"
        );
    }
}

#[test]
fn sasl_initial_responses_are_checked() {
    let mut out = BytesMut::new();
    frontend::sasl_initial_response(
        "SCRAM-SHA-256-PLUS",
        b"p=tls-server-end-point,,n=,r=a",
        &mut out,
    )
    .unwrap();
    assert_eq!(
        parse_sasl_initial_response(&out[5..]),
        Err(ScramError::Mechanism("SCRAM-SHA-256-PLUS".into()))
    );
    assert_eq!(
        parse_sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xff"),
        Err(ScramError::Unsupported(
            "a SASLInitialResponse without the client-first-message"
        ))
    );
    for body in [
        &b""[..],
        b"SCRAM-SHA-256",
        b"SCRAM-SHA-256\0",
        b"SCRAM-SHA-256\0\0\0\0",
        b"SCRAM-SHA-256\0\0\0\0\x02a",
        b"SCRAM-SHA-256\0\0\0\0\x01ab",
        b"SCRAM-SHA-256\0\x80\0\0\0",
    ] {
        let err = parse_sasl_initial_response(body).unwrap_err();
        assert!(
            matches!(err, ScramError::Malformed { .. }),
            "{body:?}: {err:?}"
        );
    }
    assert_eq!(
        parse_sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\0"),
        Ok(&b""[..])
    );
    let long = vec![b'a'; MAX_SASL_MESSAGE + 1];
    assert!(matches!(
        parse_sasl_initial_response(&long),
        Err(ScramError::TooLong { .. })
    ));
    assert!(matches!(
        parse_sasl_response(&long),
        Err(ScramError::TooLong { .. })
    ));
}

/// Pieces a client-first is made of, right and wrong, so generated
/// messages reach every branch of the grammar.
fn client_first_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("n".into()),
        Just("y".into()),
        Just("p=tls-server-end-point".into()),
        Just("a=user".into()),
        Just("m=ext".into()),
        Just("n=".into()),
        Just("r=".into()),
        "[a-zA-Z0-9=]{0,3}=[ -~]{0,8}",
        "r=[!-+\\--~]{1,24}",
        any::<String>(),
    ]
}

proptest! {
    /// Arbitrary bytes, at any step, never panic and never pass.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1200)) {
        let _ = ScramServer::new(PASSWORD).unwrap().client_first(&data);
        let _ = parse_sasl_initial_response(&data);
        let _ = parse_sasl_response(&data);
        let mut server = ScramServer::new(PASSWORD).unwrap();
        server.client_first(b"n,,n=,r=abc").unwrap();
        prop_assert!(server.client_final(&data).is_err());
    }

    /// Client-firsts built from the grammar's pieces never panic, and any
    /// accepted one has a server-first that echoes its nonce.
    #[test]
    fn generated_client_firsts_never_panic(pieces in proptest::collection::vec(client_first_piece(), 0..6)) {
        let data = pieces.join(",");
        if let Ok(first) = ScramServer::new(PASSWORD).unwrap().client_first(data.as_bytes()) {
            let nonce = data.split(",r=").nth(1).unwrap().split(',').next().unwrap();
            let echoed = format!("r={nonce}");
            prop_assert!(first.starts_with(echoed.as_bytes()));
        }
    }
}

proptest! {
    // Each case runs the 4096 PBKDF2 rounds, unoptimized in tests.
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// A client-final with any one byte changed is refused.
    #[test]
    fn a_changed_client_final_is_refused(at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let (client, mut server) = begin(PASSWORD, PASSWORD.as_bytes(), ChannelBinding::unsupported());
        let mut fin = client.message().to_vec();
        let at = at.index(fin.len());
        fin[at] ^= flip;
        prop_assert!(server.client_final(&fin).is_err());
    }
}
