//! The redis crate (redis-rs) over lessor: a lease as redis-rs's connection
//! (a `Lease` is `AsyncRead + AsyncWrite`), and `Exchange` for single
//! commands. The application never sees a password: lessor opened the
//! session.
//!
//! ```sh
//! cargo run -p lessor-client --example redis_rs -- 127.0.0.1:7070 redis
//! ```
//!
//! The upstream must be `protocol: redis`. When the lease is dropped, lessor
//! applies `lease.on_abort`; with `on_abort: return` it returns the
//! connection exactly when every command has its reply.

use lessor_client::{Client, LeaseOptions};
use redis::RedisConnectionInfo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target = args
        .next()
        .or_else(|| std::env::var("LESSOR_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:7070".into());
    let upstream = args.next().unwrap_or_else(|| "redis".into());
    let client = Client::connect(&target).await?;

    // A lease as redis-rs's connection: pipelines, transactions, anything a
    // connection does, with lessor tracking every reply.
    let lease = client.lease(&upstream, &LeaseOptions::default()).await?;
    let granted = lease.granted().clone();
    let info = RedisConnectionInfo::default().set_skip_set_lib_name();
    let (mut conn, driver) = redis::aio::MultiplexedConnection::new_with_config(
        &info,
        lease,
        redis::AsyncConnectionConfig::new(),
    )
    .await?;
    let driving = tokio::spawn(driver);
    let () = redis::cmd("SET")
        .arg("greeting")
        .arg("hello from redis-rs")
        .query_async(&mut conn)
        .await?;
    let (greeting, count): (String, i64) = redis::pipe()
        .cmd("GET")
        .arg("greeting")
        .cmd("INCR")
        .arg("visits")
        .query_async(&mut conn)
        .await?;
    println!(
        "over lease {} (connection {}): GET greeting = {greeting:?}, visits = {count}",
        granted.lease_id, granted.connection_id
    );
    drop(conn);
    driving.await?;

    // Exchange: one command, one unary call, the connection back in the pool
    // before the reply arrives here.
    let get = redis::cmd("GET").arg("greeting").get_packed_command();
    let reply = client.exchange(&upstream, get, None).await?;
    let value: String = redis::from_redis_value(redis::parse_redis_value(&reply.reply)?)?;
    println!(
        "over Exchange (connection {}): GET greeting = {value:?}",
        reply.connection_id
    );
    Ok(())
}
