use super::*;

fn session() -> RedisSession {
    RedisSession::new(1 << 20, 2)
}

#[test]
fn replies_pending_until_each_arrives() {
    let mut s = session();
    let sent = s
        .client_sent(&Bytes::from_static(b"INCR a\r\nINCR a\r\n"))
        .unwrap();
    assert_eq!(&sent[..], b"INCR a\r\nINCR a\r\n");
    assert_eq!(s.verdict(), Err("2 replies pending".into()));
    s.upstream_sent(Bytes::from_static(b":1\r\n:")).unwrap();
    assert_eq!(s.verdict(), Err("1 reply pending".into()));
    s.upstream_sent(Bytes::from_static(b"2\r\n")).unwrap();
    assert_eq!(s.verdict(), Ok(()));
}

#[test]
fn whole_commands_go_out_without_a_copy() {
    let mut s = session();
    let data = Bytes::from(b"SET k v\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec());
    let sent = s.client_sent(&data).unwrap();
    assert_eq!(sent, data);
    assert_eq!(sent.as_ptr(), data.as_ptr(), "the same bytes, not a copy");
    // A large value streams through in pieces, each forwarded as is.
    let head = Bytes::from(b"*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$100000\r\nxxxx".to_vec());
    let sent = s.client_sent(&head).unwrap();
    assert_eq!(sent.as_ptr(), head.as_ptr());
    let body = Bytes::from(vec![b'x'; 99_996]);
    assert_eq!(s.client_sent(&body).unwrap().as_ptr(), body.as_ptr());
}

#[test]
fn auth_is_answered_in_order_and_never_forwarded() {
    let mut s = session();
    let sent = s
        .client_sent(&Bytes::from_static(b"GET a\r\nAUTH pw\r\nGET b\r\n"))
        .unwrap();
    assert_eq!(&sent[..], b"GET a\r\nGET b\r\n");
    assert_eq!(s.take_local(), None, "not before GET a's reply");
    let out = s
        .upstream_sent(Bytes::from_static(b"$1\r\nx\r\n$1\r\ny\r\n"))
        .unwrap();
    assert_eq!(
        &out[..],
        b"$1\r\nx\r\n-ERR lessor: authentication is done by the sidecar\r\n$1\r\ny\r\n"
    );
    assert_eq!(s.verdict(), Ok(()));
}

#[test]
fn a_split_auth_never_leaks_its_head() {
    let mut s = session();
    assert!(
        s.client_sent(&Bytes::from_static(b"*2\r\n$4\r\nAU"))
            .unwrap()
            .is_empty()
    );
    assert!(
        s.client_sent(&Bytes::from_static(b"TH\r\n$2\r\npw"))
            .unwrap()
            .is_empty()
    );
    assert!(
        s.client_sent(&Bytes::from_static(b"\r\n"))
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.take_local().as_deref(),
        Some(&b"-ERR lessor: authentication is done by the sidecar\r\n"[..])
    );
    let sent = s
        .client_sent(&Bytes::from_static(b"*2\r\n$4\r\nPI"))
        .unwrap();
    assert!(sent.is_empty(), "held until named");
    let sent = s
        .client_sent(&Bytes::from_static(b"NG\r\n$2\r\nh"))
        .unwrap();
    assert_eq!(
        &sent[..],
        b"*2\r\n$4\r\nPING\r\n$2\r\nh",
        "named: streams on"
    );
}

#[test]
fn quit_is_answered_locally_and_ends_the_lease() {
    let mut s = session();
    assert!(
        s.client_sent(&Bytes::from_static(b"QUIT\r\n"))
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.take_local().as_deref(), Some(QUIT_OK));
    assert!(s.quit_done());
    assert_eq!(s.verdict(), Ok(()));
}

#[test]
fn state_changes_are_named() {
    let mut s = session();
    s.client_sent(&Bytes::from_static(b"SUBSCRIBE ch\r\n"))
        .unwrap();
    s.upstream_sent(Bytes::from_static(
        b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
    ))
    .unwrap();
    assert_eq!(s.verdict(), Err("subscribed".into()));
    let mut s = session();
    s.client_sent(&Bytes::from_static(
        b"CLIENT REPLY OFF\r\nGET a\r\nCLIENT NO-EVICT on\r\n",
    ))
    .unwrap();
    assert_eq!(s.replies_due(), 0, "nothing is answered with replies off");
    assert_eq!(s.verdict(), Ok(()));
    assert!(!s.is_clean());
    let undo = s.restore(&RedisConfig::default()).unwrap();
    assert_eq!(undo.undone, "CLIENT REPLY, CLIENT NO-EVICT");
    let mut s = session();
    s.client_sent(&Bytes::from_static(
        b"SELECT 5\r\nWATCH k\r\nMULTI\r\nSET a 1\r\n",
    ))
    .unwrap();
    s.upstream_sent(Bytes::from_static(b"+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n"))
        .unwrap();
    assert_eq!(s.verdict(), Ok(()), "clean, but changed");
    assert!(!s.is_clean());
    let undo = s.restore(&RedisConfig::default()).unwrap();
    assert_eq!(undo.undone, "MULTI, SELECT");
    assert_eq!(undo.replies, 2);
    assert_eq!(
        &undo.request[..],
        b"*1\r\n$7\r\nDISCARD\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n"
    );
    s.client_sent(&Bytes::from_static(b"EXEC\r\n")).unwrap();
    s.upstream_sent(Bytes::from_static(b"*1\r\n+OK\r\n"))
        .unwrap();
    assert_eq!(
        s.restore(&RedisConfig::default()).map(|r| r.undone),
        Some("SELECT".into())
    );
}

#[test]
fn quoted_and_blank_prefixed_commands_are_seen_as_redis_sees_them() {
    let mut s = session();
    let sent = s
        .client_sent(&Bytes::from_static(b"\"SELECT\" 5\r\n'MULTI'\r\n"))
        .unwrap();
    assert_eq!(sent.len(), 21, "forwarded");
    s.upstream_sent(Bytes::from_static(b"+OK\r\n+OK\r\n"))
        .unwrap();
    let undo = s.restore(&RedisConfig::default()).unwrap();
    assert_eq!(undo.undone, "MULTI, SELECT");
    // A local command after any number of blanks is never forwarded.
    let mut s = session();
    let mut blanks = vec![b' '; 5000];
    blanks.extend_from_slice(b"\x0bHELLO 3");
    assert!(s.client_sent(&Bytes::from(blanks)).unwrap().is_empty());
    assert!(
        s.client_sent(&Bytes::from_static(b"\r\n"))
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.take_local().as_deref(), Some(AUTH_REFUSED));
}

#[test]
fn replies_are_counted_as_redis_sends_them() {
    let mut s = session();
    s.client_sent(&Bytes::from_static(
        b"UNSUBSCRIBE a b\r\n$11\r\nBLPOP q1 10\r\n",
    ))
    .unwrap();
    assert_eq!(s.replies_due(), 4, "one per channel, then `$11` and BLPOP");
    let mut s = RedisSession::new(1 << 20, 3);
    s.client_sent(&Bytes::from_static(b"PUNSUBSCRIBE\r\nPING\r\n"))
        .unwrap();
    s.upstream_sent(Bytes::from_static(
        b">3\r\n$12\r\npunsubscribe\r\n_\r\n:0\r\n+PONG\r\n",
    ))
    .unwrap();
    assert_eq!(s.verdict(), Ok(()));
    let mut s = session();
    s.client_sent(&Bytes::from_static(
        b"CLIENT REPLY SKIP\r\nGET a\r\nGET b\r\n",
    ))
    .unwrap();
    assert_eq!(s.replies_due(), 1, "the skipped GET gets no reply");
    let mut s = session();
    s.client_sent(&Bytes::from_static(b"SUBSCRIBE a\r\nUNSUBSCRIBE\r\n"))
        .unwrap();
    assert!(s.verdict().unwrap_err().contains("not countable"));
}

#[test]
fn what_may_never_run_or_never_end_is_not_counted_clean() {
    // A queued OFF may never run: the flag stays set, and is restored.
    let mut s = session();
    s.client_sent(&Bytes::from_static(
        b"CLIENT NO-EVICT ON\r\nMULTI\r\nCLIENT NO-EVICT OFF\r\nDISCARD\r\n",
    ))
    .unwrap();
    s.upstream_sent(Bytes::from_static(b"+OK\r\n+OK\r\n+QUEUED\r\n+OK\r\n"))
        .unwrap();
    let undo = s.restore(&RedisConfig::default()).unwrap();
    assert_eq!(undo.undone, "CLIENT NO-EVICT");
    // Redis compares options as C strings: `ON\0` is ON.
    let mut s = session();
    s.client_sent(&Bytes::from_static(
        b"*3\r\n$6\r\nCLIENT\r\n$8\r\nTRACKING\r\n$3\r\nON\x00\r\n",
    ))
    .unwrap();
    s.upstream_sent(Bytes::from_static(b"+OK\r\n")).unwrap();
    assert!(!s.unchanged(), "tracking is on");
    // A silenced blocking command holds the connection with no reply.
    let mut s = session();
    s.client_sent(&Bytes::from_static(b"CLIENT REPLY SKIP\r\nBLPOP q 0\r\n"))
        .unwrap();
    assert!(s.verdict().unwrap_err().contains("not countable"));
}

#[test]
fn subscriptions_end_when_the_servers_count_reaches_zero() {
    for resp in [2u8, 3] {
        let mut s = RedisSession::new(1 << 20, resp);
        let a = if resp == 3 { ">" } else { "*" };
        let reply = |kind: &str, ch: &str, n: i64| {
            Bytes::from(format!(
                "{a}3\r\n${}\r\n{kind}\r\n${}\r\n{ch}\r\n:{n}\r\n",
                kind.len(),
                ch.len()
            ))
        };
        s.client_sent(&Bytes::from_static(b"SUBSCRIBE a b\r\nPSUBSCRIBE p*\r\n"))
            .unwrap();
        s.upstream_sent(reply("subscribe", "a", 1)).unwrap();
        s.upstream_sent(reply("subscribe", "b", 2)).unwrap();
        s.upstream_sent(reply("psubscribe", "p*", 3)).unwrap();
        assert_eq!(s.binds(), Some("subscribed"));
        // A message (an array in RESP2) answers nothing.
        s.upstream_sent(Bytes::from(format!(
            "{a}3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
        )))
        .unwrap();
        assert_eq!(s.replies_due(), 0);
        // An argument-less UNSUBSCRIBE owes one reply per channel (not
        // per pattern): two, and the pattern remains.
        s.client_sent(&Bytes::from_static(b"UNSUBSCRIBE\r\n"))
            .unwrap();
        assert_eq!(s.replies_due(), 2);
        s.upstream_sent(reply("unsubscribe", "b", 2)).unwrap();
        s.upstream_sent(reply("unsubscribe", "a", 1)).unwrap();
        assert_eq!(s.binds(), Some("subscribed"), "RESP{resp}");
        s.client_sent(&Bytes::from_static(b"PUNSUBSCRIBE\r\n"))
            .unwrap();
        assert_eq!(s.replies_due(), 1);
        s.upstream_sent(reply("punsubscribe", "p*", 0)).unwrap();
        assert_eq!(s.binds(), None, "RESP{resp}");
        assert_eq!(s.verdict(), Ok(()));
        assert!(s.is_clean());
        // Pipelined behind a SUBSCRIBE whose count is not known yet, an
        // argument-less unsubscribe cannot be counted.
        s.client_sent(&Bytes::from_static(b"SUBSCRIBE c\r\nUNSUBSCRIBE\r\n"))
            .unwrap();
        assert!(s.verdict().unwrap_err().contains("not countable"));
    }
}
