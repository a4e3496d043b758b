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

/// Deletes every Redis key under `prefix` when dropped (also while a failed test unwinds).
pub struct RedisPrefix(pub String);

impl RedisPrefix {
    /// How many keys the store made under the prefix (all its keys start `{<prefix>`).
    pub fn keys(&self) -> Vec<Vec<u8>> {
        let client = redis::Client::open(REDIS_URL).unwrap();
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("no Redis at {REDIS_URL}: {e}; run scripts/ensure-redis"));
        let pattern = format!("{{{}*", self.0);
        let mut cursor: u64 = 0;
        let mut found = Vec::new();
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut con)
                .unwrap();
            found.extend(keys);
            if next == 0 {
                return found;
            }
            cursor = next;
        }
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(REDIS_URL) else {
            return;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let pattern = format!("{{{}*", self.0);
        let mut cursor: u64 = 0;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<Vec<u8>>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut con)
            else {
                return;
            };
            if !keys.is_empty() {
                let _: redis::RedisResult<u64> = redis::cmd("UNLINK").arg(&keys).query(&mut con);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
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
