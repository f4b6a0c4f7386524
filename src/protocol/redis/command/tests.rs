use proptest::prelude::*;

use super::*;

fn read(input: &[u8]) -> Result<Vec<Command>, ProtocolError> {
    let mut reader = CommandReader::new(1 << 30);
    let mut out = Vec::new();
    reader.feed(input, |c| out.push(c))?;
    Ok(out)
}

fn argv(input: &[u8]) -> Vec<Vec<String>> {
    read(input)
        .unwrap()
        .iter()
        .map(|c| {
            c.args
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .collect()
}

#[test]
fn inline_commands_split_as_redis_splits_them() {
    assert_eq!(argv(b"\"SELECT\" 5\r\n"), [["SELECT", "5"]]);
    assert_eq!(argv(b"\x0bMULTI\n"), [["MULTI"]]);
    assert_eq!(argv(b"SET k\x0bv x\r\n"), [["SET", "k\x0bv", "x"]]);
    assert_eq!(argv(b"\"a\"\x0bb\r\n"), [["a", "b"]]);
    assert_eq!(argv(b"ECHO \"\\x41\\n\\q\"\r\n"), [["ECHO", "A\nq"]]);
    assert_eq!(argv(b"ECHO 'it\\'s'\r\n"), [["ECHO", "it's"]]);
    assert_eq!(argv(b"ECHO a\"b c\"\r\n"), [["ECHO", "ab c"]]);
    assert_eq!(argv(b"ECHO \"\"\r\n"), [["ECHO", ""]]);
    assert_eq!(argv(b"a\r\rb\r\n"), [["a", "b"]]);
    for bad in [
        &b"ECHO \"a\r\n"[..],
        b"ECHO \"a\"b\r\n",
        b"ECHO 'a\r\n",
        b"ECHO \"\\\r\n",
    ] {
        assert_eq!(read(bad), Err(ProtocolError::UnbalancedQuotes), "{bad:?}");
    }
}

#[test]
fn anything_but_a_star_is_inline() {
    // A bulk string is no request: Redis reads `$11` and `BLPOP q1 10` as
    // two inline commands.
    assert_eq!(
        argv(b"$11\r\nBLPOP q1 10\r\n"),
        [vec!["$11"], vec!["BLPOP", "q1", "10"]]
    );
    assert_eq!(argv(b":1\r\n+x\r\n"), [[":1"], ["+x"]]);
}

#[test]
fn empty_requests_are_requests_without_arguments() {
    let got = read(b"\r\n\n   \r\n*0\r\n*-1\r\nPING\r\n").unwrap();
    let argcs: Vec<u64> = got.iter().map(|c| c.argc).collect();
    assert_eq!(argcs, [0, 0, 0, 0, 0, 1]);
}

#[test]
fn arrays_follow_redis_not_the_spec() {
    // The byte after a line's `\r` and the two after a payload are skipped
    // whatever they are.
    assert_eq!(argv(b"*2\rX$4\r\nECHO\r\n$2\r\nhixy"), [["ECHO", "hi"]]);
    assert_eq!(read(b"*+1\r\n"), Err(ProtocolError::BadCount));
    assert_eq!(read(b"*01\r\n"), Err(ProtocolError::BadCount));
    assert_eq!(read(b"*-0\r\n"), Err(ProtocolError::BadCount));
    assert_eq!(read(b"*2147483648\r\n"), Err(ProtocolError::BadCount));
    assert_eq!(read(b"*1\r\n$-1\r\n"), Err(ProtocolError::BadLength));
    assert_eq!(read(b"*1\r\n$536870913\r\n"), Err(ProtocolError::BadLength));
    assert_eq!(
        read(b"*1\r\n*1\r\n"),
        Err(ProtocolError::ExpectedBulk(b'*'))
    );
    assert_eq!(read(b"*1\r\n\r\n"), Err(ProtocolError::ExpectedBulk(b'\r')));
    assert_eq!(read(b"PING\0\n"), Err(ProtocolError::Nul));
    assert_eq!(read(b"*1\0\r\n"), Err(ProtocolError::Nul));
    let mut small = CommandReader::new(10);
    assert_eq!(
        small.feed(b"*1\r\n$11\r\n", |_| {}),
        Err(ProtocolError::TooLarge { len: 11, max: 10 })
    );
}

#[test]
fn lines_are_bounded_as_redis_bounds_them() {
    let mut long = vec![b'a'; INLINE_MAX + 1];
    assert_eq!(read(&long), Err(ProtocolError::InlineTooBig));
    long.truncate(INLINE_MAX);
    long.push(b'\n');
    assert_eq!(read(&long).unwrap().len(), 1);
    let mut count = b"*".to_vec();
    count.resize(INLINE_MAX + 1, b'1');
    assert_eq!(read(&count), Err(ProtocolError::CountTooBig));
}

#[test]
fn a_name_is_known_before_the_command_ends() {
    let mut reader = CommandReader::new(1 << 30);
    reader.feed(b"*2\r\n$4\r\nAU", |_| {}).unwrap();
    assert_eq!(reader.head(), Head::Unknown);
    reader.feed(b"TH", |_| {}).unwrap();
    assert_eq!(reader.head(), Head::Named("AUTH".into()));
    reader.feed(b"\r\n$3\r\np", |_| {}).unwrap();
    assert_eq!(reader.head(), Head::Named("AUTH".into()));
    let mut reader = CommandReader::new(1 << 30);
    reader.feed(b"*2\r\n$100\r\nxx", |_| {}).unwrap();
    assert_eq!(reader.head(), Head::Long);
    let mut reader = CommandReader::new(1 << 30);
    reader.feed(b"HELLO 3", |_| {}).unwrap();
    assert_eq!(
        reader.head(),
        Head::Unknown,
        "an inline line is whole first"
    );
}

#[test]
fn payloads_are_not_held() {
    let mut reader = CommandReader::new(1 << 30);
    reader
        .feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$67108864\r\n", |_| {})
        .unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..64 {
        reader.feed(&chunk, |_| panic!("not yet")).unwrap();
    }
    let mut got = Vec::new();
    reader.feed(b"\r\n", |c| got.push(c)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].args[2].len(), CAPTURE_BYTES);
    assert!(reader.line.capacity() <= 4096);
}

/// A request in one of the shapes clients (and hostile ones) send.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let word = proptest::collection::vec(any::<u8>(), 0..12);
    prop_oneof![
        proptest::collection::vec(word.clone(), 0..5).prop_map(|args| {
            let mut out = format!("*{}\r\n", args.len()).into_bytes();
            for a in &args {
                out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                out.extend_from_slice(a);
                out.extend_from_slice(b"\r\n");
            }
            out
        }),
        "[ -~\\t\\x0b\\x0c]{0,30}".prop_map(|line| format!("{line}\r\n").into_bytes()),
        "[a-z\" '\\\\]{0,20}".prop_map(|line| format!("{line}\n").into_bytes()),
    ]
}

proptest! {
    /// Requests split at random points are read exactly as when they
    /// arrive whole, errors included.
    #[test]
    fn split_requests_read_identically(
        requests in proptest::collection::vec(request(), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let input = requests.concat();
        let whole = read(&input);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
        points.push(0);
        points.push(input.len());
        points.sort_unstable();
        points.dedup();
        let mut reader = CommandReader::new(1 << 30);
        let mut got = Vec::new();
        let mut result = Ok(());
        for w in points.windows(2) {
            let base = w[0];
            result = reader.feed(&input[w[0]..w[1]], |mut c| {
                c.end += base;
                got.push(c);
            });
            if result.is_err() {
                break;
            }
        }
        match whole {
            Ok(whole) => {
                prop_assert_eq!(result, Ok(()));
                prop_assert_eq!(got, whole);
            }
            Err(e) => prop_assert_eq!(result, Err(e)),
        }
    }
}
