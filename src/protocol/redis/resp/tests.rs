use proptest::prelude::*;

use super::*;

fn frames(input: &[u8]) -> Result<Vec<Frame>, RespError> {
    let mut scanner = Scanner::new(1 << 30);
    let mut out = Vec::new();
    scanner.feed(input, |f| out.push(f))?;
    Ok(out)
}

#[test]
fn the_first_element_of_an_array_or_push_is_captured() {
    let got = frames(b"*3\r\n$9\r\nSubscribe\r\n$1\r\nc\r\n:1\r\n>2\r\n$10\r\ninvalidate\r\n*0\r\n*2\r\n:1\r\n$1\r\nx\r\n").unwrap();
    assert_eq!(got[0].first(), "subscribe");
    assert_eq!(got[1].first(), "invalidate");
    assert!(got[1].is_push());
    assert_eq!(
        got[2].first(),
        "",
        "only a first element that is a bulk string"
    );
}

#[test]
fn nesting_is_bounded() {
    let mut deep = b"*1\r\n".repeat(MAX_DEPTH);
    deep.extend_from_slice(b":1\r\n");
    assert_eq!(frames(&deep).unwrap().len(), 1);
    let deeper = b"*1\r\n".repeat(MAX_DEPTH + 1);
    assert_eq!(frames(&deeper), Err(RespError::TooDeep));
}

#[test]
fn resp3_aggregates_attributes_pushes_and_streams() {
    let input: &[u8] = b"%2\r\n+a\r\n:1\r\n+b\r\n*2\r\n_\r\n#t\r\n\
        |1\r\n+ttl\r\n:3\r\n$2\r\nhi\r\n\
        >3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n\
        $?\r\n;2\r\nab\r\n;0\r\n\
        *?\r\n:1\r\n*1\r\n,1.5\r\n.\r\n\
        =7\r\ntxt:abc\r\n(123\r\n!3\r\nerr\r\n~0\r\n*-1\r\n$-1\r\n";
    let got = frames(input).unwrap();
    let kinds: Vec<u8> = got.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, b"%$>$*=(!~*$".to_vec(), "{got:?}");
    assert!(got[2].is_push());
    assert!(got[7].is_error());
    assert_eq!(got.last().unwrap().end, input.len());
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    assert_eq!(frames(b"?x\r\n"), Err(RespError::BadType(b'?')));
    assert!(matches!(frames(b"$abc\r\n"), Err(RespError::BadLength(_))));
    assert!(matches!(frames(b"*-5\r\n"), Err(RespError::BadLength(_))));
    assert_eq!(frames(b"$1\r\nab\r\n"), Err(RespError::MissingCrlf));
    let mut long = vec![b'+'];
    long.resize(MAX_LINE + 10, b'a');
    assert_eq!(frames(&long), Err(RespError::LineTooLong));
    let mut small = Scanner::new(10);
    assert_eq!(
        small.feed(b"$11\r\n", |_| {}),
        Err(RespError::TooLarge { len: 11, max: 10 })
    );
}

#[test]
fn a_large_payload_is_never_held() {
    let mut scanner = Scanner::new(1 << 30);
    let mut ends = Vec::new();
    scanner
        .feed(b"$67108864\r\n", |f| ends.push(f.end))
        .unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..64 {
        scanner.feed(&chunk, |f| ends.push(f.end)).unwrap();
        assert!(!scanner.at_boundary());
    }
    scanner.feed(b"\r\n", |f| ends.push(f.end)).unwrap();
    assert_eq!(ends, [2]);
    assert!(scanner.at_boundary());
    assert!(scanner.line.capacity() < 1024);
}

/// A random valid RESP value, encoded.
fn value(depth: u32) -> BoxedStrategy<Vec<u8>> {
    let leaf = prop_oneof![
        "[a-zA-Z0-9 ]{0,20}".prop_map(|s| format!("+{s}\r\n").into_bytes()),
        "[a-zA-Z0-9 ]{0,20}".prop_map(|s| format!("-ERR {s}\r\n").into_bytes()),
        any::<i64>().prop_map(|n| format!(":{n}\r\n").into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| {
            let mut out = format!("${}\r\n", b.len()).into_bytes();
            out.extend_from_slice(&b);
            out.extend_from_slice(b"\r\n");
            out
        }),
        Just(b"$-1\r\n".to_vec()),
        Just(b"_\r\n".to_vec()),
        Just(b"#f\r\n".to_vec()),
        Just(b",3.25\r\n".to_vec()),
        Just(b"(12345678901234567890\r\n".to_vec()),
        Just(b"$?\r\n;3\r\nabc\r\n;0\r\n".to_vec()),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    let inner = value(depth - 1);
    prop_oneof![
        2 => leaf,
        1 => (
            prop_oneof![Just(b'*'), Just(b'~'), Just(b'>')],
            proptest::collection::vec(inner.clone(), 0..5)
        )
            .prop_map(|(kind, items)| {
                let mut out = vec![kind];
                out.extend_from_slice(format!("{}\r\n", items.len()).as_bytes());
                items.iter().for_each(|i| out.extend_from_slice(i));
                out
            }),
        1 => proptest::collection::vec((inner.clone(), inner.clone()), 0..3).prop_map(|pairs| {
            let mut out = format!("%{}\r\n", pairs.len()).into_bytes();
            for (k, v) in &pairs {
                out.extend_from_slice(k);
                out.extend_from_slice(v);
            }
            out
        }),
        1 => (inner.clone(), inner.clone(), inner).prop_map(|(k, v, frame)| {
            let mut out = b"|1\r\n".to_vec();
            out.extend_from_slice(&k);
            out.extend_from_slice(&v);
            out.extend_from_slice(&frame);
            out
        }),
        1 => proptest::collection::vec(value(0), 0..4).prop_map(|items| {
            let mut out = b"*?\r\n".to_vec();
            items.iter().for_each(|i| out.extend_from_slice(i));
            out.extend_from_slice(b".\r\n");
            out
        }),
    ]
    .boxed()
}

proptest! {
    /// Frames split at random points are found exactly where they end, the
    /// same as when they arrive whole.
    #[test]
    fn split_frames_scan_identically(
        values in proptest::collection::vec(value(3), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut input = Vec::new();
        let mut ends = Vec::new();
        for v in &values {
            input.extend_from_slice(v);
            ends.push(input.len());
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
        points.push(0);
        points.push(input.len());
        points.sort_unstable();
        points.dedup();
        let mut scanner = Scanner::new(1 << 30);
        let mut got = Vec::new();
        for w in points.windows(2) {
            let base = w[0];
            scanner.feed(&input[w[0]..w[1]], |f| got.push(base + f.end)).unwrap();
        }
        prop_assert_eq!(got, ends);
        prop_assert!(scanner.at_boundary());
    }
}
