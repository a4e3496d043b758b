//! Support for geostate's end-to-end tests (`tests/tests/`): names unique to a run and guards
//! that remove what a test wrote on the shared local servers (Redis on 127.0.0.1:6379,
//! PostgreSQL at `GEOSTATE_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`), also
//! when the test fails. Nothing else on the servers is touched: no FLUSHALL, no shared schema
//! dropped.
//!
//! The tests themselves are the files of `tests/tests/`; `scripts/test` makes sure both
//! servers run before any test starts.

// Test support: a failure here is a failed test, said as plainly as possible.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

/// The shared Redis server.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";
/// The shared PostgreSQL database, unless `GEOSTATE_PG_URL` names another.
pub const PG_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The PostgreSQL database the tests use.
pub fn pg_url() -> String {
    std::env::var("GEOSTATE_PG_URL").unwrap_or_else(|_| PG_URL_DEFAULT.to_string())
}

/// A name fragment unique to this run: process id and time.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}_{}", std::process::id(), nanos % (1 << 40))
}

/// The keys of the Redis server at `url` that match `pattern` (SCAN, so the server is never
/// blocked).
pub fn redis_keys(url: &str, pattern: &str) -> redis::RedisResult<Vec<Vec<u8>>> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut cursor: u64 = 0;
    let mut found = Vec::new();
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(&mut con)?;
        found.extend(keys);
        if next == 0 {
            return Ok(found);
        }
        cursor = next;
    }
}

/// Deletes the keys of the Redis server at `url` that match `pattern`; best effort (for
/// clean-up in `Drop`, also while a failed test unwinds).
pub fn unlink_redis_keys(url: &str, pattern: &str) {
    let Ok(keys) = redis_keys(url, pattern) else {
        return;
    };
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
        return;
    };
    for chunk in keys.chunks(1000) {
        let _: redis::RedisResult<u64> = redis::cmd("UNLINK").arg(chunk).query(&mut con);
    }
}

/// Deletes every Redis key under `prefix` when dropped (also while a failed test unwinds).
pub struct RedisPrefix(pub String);

impl RedisPrefix {
    fn pattern(&self) -> String {
        format!("{{{}*", self.0)
    }

    /// The keys the store made under the prefix (all its keys start `{<prefix>`).
    pub fn keys(&self) -> Vec<Vec<u8>> {
        redis_keys(REDIS_URL, &self.pattern())
            .unwrap_or_else(|e| panic!("no Redis at {REDIS_URL}: {e}; run scripts/ensure-redis"))
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        unlink_redis_keys(REDIS_URL, &self.pattern());
    }
}

/// Drops the schema `name` when dropped (also while a failed test unwinds).
pub struct PgSchema {
    /// The database.
    pub url: String,
    /// The schema.
    pub name: String,
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let url = self.url.clone();
        let name = self.name.clone();
        // A runtime of its own in a thread of its own: usable while the test's runtime is
        // shutting down or unwinding.
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                use sqlx::Connection;
                let mut conn = match sqlx::PgConnection::connect(&url).await {
                    Ok(conn) => conn,
                    Err(e) => return eprintln!("cannot drop the test schema {name}: {e}"),
                };
                let drop = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(drop))
                    .execute(&mut conn)
                    .await
                {
                    eprintln!("cannot drop the test schema {name}: {e}");
                }
                let _ = conn.close().await;
            });
        });
        let _ = dropping.join();
    }
}

/// Whether schema `name` exists in the database at `url`.
pub async fn schema_exists(url: &str, name: &str) -> bool {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1")
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let _ = conn.close().await;
    n == 1
}
