//! A PgBouncer in transaction mode in front of the test database, on a free
//! port of 127.0.0.1, with few server connections so that its clients really
//! share them. Stopped (and its directory removed) when dropped, also when
//! the test fails.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use sqlx::{postgres::PgPoolOptions, PgPool};

use super::{database_url, random_suffix};

/// Server connections PgBouncer opens to Postgres at most.
pub const SERVER_CONNECTIONS: u32 = 2;

pub struct PgBouncer {
    pub port: u16,
    database: String,
    dir: PathBuf,
    child: Child,
}

fn binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin")])
            .map(|d| d.join("pgbouncer"))
            .find(|p| p.is_file())
    });
    found.expect("pgbouncer is installed (scripts/test.sh installs Debian's package)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

impl PgBouncer {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// As [`Self::start`], with the server connections' `search_path` set to
    /// `schema` (PgBouncer does not pass a client's `options` on).
    pub async fn start_with(schema: Option<&str>) -> Self {
        Self::start_in(schema, "transaction", SERVER_CONNECTIONS).await
    }

    /// PgBouncer in session mode: each client keeps its server connection,
    /// as if connected straight to Postgres, and [`Self::round_trips`]
    /// counts every round trip of a client that speaks to Postgres directly.
    pub async fn start_in_session_mode() -> Self {
        Self::start_in(None, "session", 20).await
    }

    /// `servers`: the server connections PgBouncer opens at most.
    async fn start_in(schema: Option<&str>, mode: &str, servers: u32) -> Self {
        let options: sqlx::postgres::PgConnectOptions = database_url().parse().unwrap();
        let database = options.get_database().unwrap_or("test").to_owned();
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("tower-pg-session-pgbouncer-{}", random_suffix()));
        fs::create_dir_all(&dir).unwrap();
        let ini = dir.join("pgbouncer.ini");
        fs::write(
            &ini,
            format!(
                "[databases]\n\
                 {database} = host={host} port={pg_port} dbname={database} user={user}{connect_query}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = any\n\
                 pool_mode = {mode}\n\
                 default_pool_size = {servers}\n\
                 min_pool_size = 0\n\
                 reserve_pool_size = 0\n\
                 max_client_conn = 500\n\
                 ignore_startup_parameters = extra_float_digits\n\
                 server_reset_query =\n\
                 stats_users = {user}\n\
                 query_wait_timeout = 20\n",
                host = options.get_host(),
                pg_port = options.get_port(),
                user = options.get_username(),
                connect_query = schema
                    .map(|s| format!(" connect_query='SET search_path = {s}'"))
                    .unwrap_or_default(),
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.join("pgbouncer.log")).unwrap();
        let mut cmd = Command::new(binary());
        // PgBouncer refuses to run as root; it drops to this user itself, so
        // the child is PgBouncer and killing it stops it.
        if is_root() {
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let bouncer = Self {
            port,
            database,
            dir,
            child,
        };
        bouncer.wait_ready().await;
        bouncer
    }

    async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url()).await {
                let _ = sqlx::Connection::close(conn).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("PgBouncer did not start: {}", self.log());
    }

    /// The URL clients use to reach the database through PgBouncer.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port, self.database
        )
    }

    /// A pool of `size` connections through PgBouncer, which gives up after
    /// 10 s. Its connections carry [`Self::application_name`], which
    /// PgBouncer sets on the server connection each transaction runs on.
    pub async fn pool(&self, size: u32) -> PgPool {
        self.pool_waiting(size, Duration::from_secs(10)).await
    }

    /// [`Self::pool`], giving up after `wait` (which also bounds a store's
    /// row lock waits).
    pub async fn pool_waiting(&self, size: u32, wait: Duration) -> PgPool {
        let options: sqlx::postgres::PgConnectOptions = self.url().parse().unwrap();
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(wait)
            .test_before_acquire(false)
            .connect_with(options.application_name(&self.application_name()))
            .await
            .unwrap()
    }

    /// The round trips PgBouncer relayed to Postgres so far: each answer
    /// that ends with `ReadyForQuery` (`total_query_count` of `SHOW STATS`).
    pub async fn round_trips(&self) -> i64 {
        use sqlx::{Connection, Executor, Row};
        let admin = format!("postgres://postgres@127.0.0.1:{}/pgbouncer", self.port);
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        let rows = conn.fetch_all("SHOW STATS").await.unwrap();
        let row = rows
            .iter()
            .find(|r| r.try_get::<String, _>("database").ok().as_deref() == Some(&self.database))
            .expect("PgBouncer has stats for the database");
        // A numeric column, in text (the console speaks the simple protocol).
        let count = row
            .try_get_unchecked::<String, _>("total_query_count")
            .unwrap()
            .parse()
            .unwrap();
        let _ = conn.close().await;
        count
    }

    pub fn application_name(&self) -> String {
        format!("pgbouncer_{}", self.port)
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
