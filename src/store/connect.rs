//! Reaching the database: one URL naming one or several hosts, TLS from the
//! URL, pool settings, credentials that change while the app runs, and
//! following the writable primary through a failover.
//!
//! sqlx opens each new connection with the options the pool holds at that
//! moment. [`PgConnect`] keeps one set of options per host and points the pool
//! at the host found writable; when a statement meets a broken connection, a
//! read-only server or refused credentials, a search (one at a time) walks the
//! hosts again and points the pool at the one that accepts writes, and the
//! connections opened before the switch are closed instead of reused.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    Connection, PgConnection, PgPool,
};

use super::StoreError;
use crate::error::ConfigError;

/// An error from a credentials provider.
pub type ProviderError = Box<dyn std::error::Error + Send + Sync>;

type OptionsFuture = Pin<Box<dyn Future<Output = Result<PgConnectOptions, ProviderError>> + Send>>;
type Provider = Arc<dyn Fn(PgConnectOptions) -> OptionsFuture + Send + Sync>;

/// Which servers a connection may stay on (libpq's `target_session_attrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetSessionAttrs {
    /// Only a server that accepts writes (`transaction_read_only` off): the
    /// default, as the store writes.
    ReadWrite,
    /// Any server that accepts the connection (libpq's default); for a single
    /// host behind something that already routes to the primary.
    Any,
}

/// How long a search for a writable server keeps trying before it waits
/// for the next failure to start again.
const SEARCH_FOR: Duration = Duration::from_secs(60);
/// Pause between two rounds over the hosts.
const SEARCH_PAUSE: Duration = Duration::from_millis(200);

/// Where and how the store connects: hosts, TLS and credentials from a
/// libpq-style URL, and the pool's settings.
///
/// ```
/// use std::time::Duration;
/// use tower_pg_session::store::PgConnect;
///
/// // Two hosts; only the writable one is used. TLS checked against a CA.
/// let connect = PgConnect::from_url(
///     "postgres://app@db-a:5432,db-b:5432/app?target_session_attrs=read-write\
///      &sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem",
/// )?
/// .with_max_connections(10)
/// .with_max_lifetime(Some(Duration::from_secs(30 * 60)));
/// assert_eq!(connect.hosts(), ["db-a:5432", "db-b:5432"]);
/// # Ok::<(), tower_pg_session::StoreError>(())
/// ```
#[derive(Clone)]
pub struct PgConnect {
    targets: Vec<PgConnectOptions>,
    attrs: TargetSessionAttrs,
    max_connections: u32,
    min_connections: u32,
    acquire_timeout: Duration,
    max_lifetime: Option<Duration>,
    idle_timeout: Option<Duration>,
    provider: Option<Provider>,
    refresh_every: Duration,
}

impl fmt::Debug for PgConnect {
    // sqlx's options would print the password: only the hosts and settings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnect")
            .field("hosts", &self.hosts())
            .field("target_session_attrs", &self.attrs)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("idle_timeout", &self.idle_timeout)
            .field("credentials_provider", &self.provider.is_some())
            .field("credentials_refresh", &self.refresh_every)
            .finish()
    }
}

impl PgConnect {
    /// Parses a URL as libpq does: `postgres://user:pw@a:5432,b:5433/db`, or
    /// the hosts and ports in the query (`?host=a,b&port=5432,5433`), or a
    /// keyword/value string (`host=a,b port=5432 dbname=db user=app`).
    /// `target_session_attrs` is `read-write` (default) or `any`
    /// (`primary` counts as `read-write`); `sslmode`, `sslrootcert`,
    /// `sslcert`, `sslkey`, `options`, `application_name` work as in libpq.
    ///
    /// # Errors
    /// [`StoreError::InvalidUrl`] when it does not parse,
    /// [`StoreError::UnsupportedUrl`] for a value this crate does not handle
    /// (the message names the parameter, never the URL).
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let (base, hosts, ports, attrs) = parse(url)?;
        let attrs = match attrs.as_deref() {
            None | Some("read-write" | "primary") => TargetSessionAttrs::ReadWrite,
            Some("any") => TargetSessionAttrs::Any,
            Some(_) => {
                return Err(StoreError::UnsupportedUrl(
                    "target_session_attrs: only read-write, primary and any are supported",
                ))
            }
        };
        let targets = targets(&base, &hosts, &ports)?;
        Ok(Self::from_targets(targets).with_target_session_attrs(attrs))
    }

    /// One host, from options built in code.
    #[must_use]
    pub fn from_options(options: PgConnectOptions) -> Self {
        Self::from_targets(vec![options])
    }

    fn from_targets(targets: Vec<PgConnectOptions>) -> Self {
        Self {
            targets,
            attrs: TargetSessionAttrs::ReadWrite,
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            idle_timeout: Some(Duration::from_secs(10 * 60)),
            provider: None,
            refresh_every: Duration::from_secs(5 * 60),
        }
    }

    /// The hosts, in the order they are tried (`host:port`, or a socket path).
    pub fn hosts(&self) -> Vec<String> {
        self.targets.iter().map(describe).collect()
    }

    /// Which servers are used (default [`TargetSessionAttrs::ReadWrite`]:
    /// each new connection checks `transaction_read_only`, one round trip
    /// per connection, none per request).
    #[must_use]
    pub fn with_target_session_attrs(mut self, attrs: TargetSessionAttrs) -> Self {
        self.attrs = attrs;
        self
    }

    /// Connections the pool opens at most (default 10, at least 1, and no
    /// fewer than [`Self::with_min_connections`]).
    #[must_use]
    pub fn with_max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// Connections the pool keeps open even when idle (default 0).
    #[must_use]
    pub fn with_min_connections(mut self, min: u32) -> Self {
        self.min_connections = min;
        self
    }

    /// How long a statement waits for a connection before failing as
    /// unavailable (default 5 s, at least 10 ms).
    #[must_use]
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Connections older than this are closed when next released (default
    /// 30 min; `None`: never). Keep it below a pooler's or proxy's own limit.
    #[must_use]
    pub fn with_max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// Connections idle this long are closed (default 10 min; `None`: never).
    #[must_use]
    pub fn with_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Asks `provider` for the password (an RDS or Cloud SQL IAM token, a
    /// Vault dynamic secret) before the pool's first connection, after each
    /// new connection (for the next one), every few minutes (see
    /// [`Self::with_credentials_refresh`]), and at once when the server
    /// refuses the credentials. It should answer quickly; cache what is
    /// costly to obtain.
    ///
    /// ```
    /// # use tower_pg_session::store::PgConnect;
    /// let connect = PgConnect::from_url("postgres://app@db:5432/app?sslmode=verify-full")?
    ///     .with_password_provider(|| async {
    ///         std::fs::read_to_string("/var/run/secrets/db-password").map(|p| p.trim().to_owned())
    ///     });
    /// # Ok::<(), tower_pg_session::StoreError>(())
    /// ```
    #[must_use]
    pub fn with_password_provider<F, Fut, E>(self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: Into<ProviderError>,
    {
        self.with_connect_options_provider(move |options| {
            let password = provider();
            async move {
                let password = password.await.map_err(Into::<ProviderError>::into)?;
                Ok::<_, ProviderError>(options.password(&password))
            }
        })
    }

    /// How often the credentials provider is asked even when no connection
    /// opens (default 5 min, at least 1 s), so that credentials held for the
    /// next connection never grow older than this: keep it well below their
    /// validity (an RDS IAM token is valid 15 minutes).
    #[must_use]
    pub fn with_credentials_refresh(mut self, every: Duration) -> Self {
        self.refresh_every = every;
        self
    }

    /// Like [`Self::with_password_provider`], with the whole options: the
    /// provider gets those parsed from the URL for the host about to be used
    /// (host, port, user, TLS) and returns them as they should be used.
    #[must_use]
    pub fn with_connect_options_provider<F, Fut, E>(mut self, provider: F) -> Self
    where
        F: Fn(PgConnectOptions) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<PgConnectOptions, E>> + Send + 'static,
        E: Into<ProviderError>,
    {
        self.provider = Some(Arc::new(move |options| {
            let fut = provider(options);
            Box::pin(async move { fut.await.map_err(Into::into) })
        }));
        self
    }

    /// Every value in its range and the pool's bounds in order, whatever
    /// the order they were set in.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        let duration = |setting, reason| Err(ConfigError::InvalidDuration { setting, reason });
        if self.max_connections == 0 {
            let reason = "must be at least 1";
            return Err(ConfigError::InvalidValue {
                setting: "with_max_connections",
                reason,
            });
        }
        if self.min_connections > self.max_connections {
            let settings = ["with_min_connections", "with_max_connections"];
            return Err(ConfigError::conflict(
                &settings,
                "the minimum exceeds the maximum",
            ));
        }
        if self.acquire_timeout < Duration::from_millis(10) {
            return duration("with_acquire_timeout", "must be at least 10 ms");
        }
        if self.refresh_every < Duration::from_secs(1) {
            return duration("with_credentials_refresh", "must be at least one second");
        }
        Ok(())
    }

    /// A pool that connects on first use, and the router that keeps it on
    /// the writable server.
    pub(crate) fn lazy_pool(self) -> (PgPool, Arc<Router>) {
        let router = Arc::new(Router {
            targets: self.targets,
            attrs: self.attrs,
            provider: self.provider,
            timeout: self.acquire_timeout,
            refresh_every: self.refresh_every,
            refreshing: AtomicBool::new(false),
            current: AtomicUsize::new(0),
            switched: Mutex::new(Instant::now()),
            searching: AtomicBool::new(false),
            pool: Mutex::new(None),
        });
        let on_connect = Arc::clone(&router);
        let on_acquire = Arc::clone(&router);
        let first = router.targets.first().cloned().unwrap_or_default();
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(self.min_connections)
            .acquire_timeout(self.acquire_timeout)
            .max_lifetime(self.max_lifetime)
            .idle_timeout(self.idle_timeout)
            // No ping before each use: it is a round trip per request. A
            // connection that died meanwhile fails its one query (that
            // request gets the unavailable status) and is replaced.
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                let router = Arc::clone(&on_connect);
                Box::pin(async move { router.after_connect(conn).await })
            })
            // Free of round trips: only the connection's age is compared.
            .before_acquire(move |_, meta| {
                let keep = on_acquire.opened_after_switch(meta.age);
                Box::pin(async move { Ok(keep) })
            })
            .connect_lazy_with(first);
        router.attach(&pool);
        (pool, router)
    }
}

/// Keeps a pool's connect options on the writable server with current
/// credentials.
pub(crate) struct Router {
    targets: Vec<PgConnectOptions>,
    attrs: TargetSessionAttrs,
    provider: Option<Provider>,
    timeout: Duration,
    refresh_every: Duration,
    /// The periodic refresh of the credentials runs.
    refreshing: AtomicBool,
    current: AtomicUsize,
    /// When the pool last moved to another server: older connections go.
    switched: Mutex<Instant>,
    searching: AtomicBool,
    /// The pool, to point it elsewhere; emptied by [`Self::detach`] when the
    /// store goes, as the pool's callbacks hold this router.
    pool: Mutex<Option<PgPool>>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field(
                "hosts",
                &self.targets.iter().map(describe).collect::<Vec<_>>(),
            )
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Router {
    fn attach(&self, pool: &PgPool) {
        *lock(&self.pool) = Some(pool.clone());
    }

    /// Lets the pool go (it holds this router through its callbacks).
    pub(crate) fn detach(&self) {
        lock(&self.pool).take();
    }

    fn pool(&self) -> Option<PgPool> {
        lock(&self.pool).clone()
    }

    /// The host the pool connects to now.
    pub(crate) fn current_host(&self) -> String {
        self.targets
            .get(self.current.load(Ordering::Relaxed))
            .map(describe)
            .unwrap_or_default()
    }

    /// When the pool last moved to another server (or found its server
    /// demoted).
    pub(crate) fn switched_at(&self) -> Instant {
        *lock(&self.switched)
    }

    fn opened_after_switch(&self, age: Duration) -> bool {
        age <= lock(&self.switched).elapsed()
    }

    /// Checks a new connection before the pool hands it out: it must be on a
    /// writable server (when required); then fresh credentials are fetched
    /// for the next one.
    async fn after_connect(self: Arc<Self>, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.attrs == TargetSessionAttrs::ReadWrite && !writable(conn).await? {
            tracing::warn!(host = %self.current_host(), "connected to a read-only server; looking for the writable one");
            self.search();
            return Err(read_only(&self.current_host()));
        }
        if self.provider.is_some() {
            let router = Arc::clone(&self);
            tokio::spawn(async move { router.refresh().await });
            self.keep_refreshing();
        }
        Ok(())
    }

    /// Starts (once, from within the runtime) the periodic refresh of the
    /// credentials; it ends with the store.
    fn keep_refreshing(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let router = Arc::downgrade(self);
        let every = self.refresh_every;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(router) = router.upgrade() else {
                    return;
                };
                if router.pool().is_none() {
                    return;
                }
                router.refresh().await;
            }
        });
    }

    /// Reacts to a failed statement: a broken connection, an unreachable or
    /// read-only server, or refused credentials start a search for the
    /// writable server (unless one runs).
    pub(crate) fn report(self: &Arc<Self>, error: &StoreError) {
        if error.is_read_only() {
            // The server was demoted under its connections: none of them
            // is reused, and each new one is checked.
            *lock(&self.switched) = Instant::now();
        }
        if error.is_unavailable() || error.is_auth_failure() {
            self.search();
        }
    }

    /// Points the pool at the current host with fresh credentials.
    async fn refresh(&self) {
        let index = self.current.load(Ordering::Relaxed);
        if let Some(options) = self.options_for(index).await {
            if self.current.load(Ordering::Relaxed) == index {
                if let Some(pool) = self.pool() {
                    pool.set_connect_options(options);
                }
            }
        }
    }

    /// The options for target `index`, through the provider when there is
    /// one; `None` when the provider failed (logged).
    async fn options_for(&self, index: usize) -> Option<PgConnectOptions> {
        let options = self.targets.get(index)?.clone();
        match &self.provider {
            None => Some(options),
            Some(provider) => match provider(options).await {
                Ok(options) => Some(options),
                Err(e) => {
                    tracing::warn!(error = %e, "the credentials provider failed");
                    None
                }
            },
        }
    }

    /// Starts a search in the background unless one runs. With one host
    /// there is nothing to search: only the credentials are renewed.
    fn search(self: &Arc<Self>) {
        if self.targets.len() < 2 && self.provider.is_none() {
            return;
        }
        if self.searching.swap(true, Ordering::AcqRel) {
            return;
        }
        let router = Arc::clone(self);
        if self.targets.len() < 2 {
            tokio::spawn(async move {
                router.refresh().await;
                router.searching.store(false, Ordering::Release);
            });
            return;
        }
        tokio::spawn(async move {
            let until = Instant::now() + SEARCH_FOR;
            loop {
                if router.pool().is_none() {
                    break;
                }
                match router.find().await {
                    Ok((index, options)) => {
                        router.use_target(index, options);
                        break;
                    }
                    Err(e) if Instant::now() > until => {
                        tracing::warn!(error = %e, "no writable database server found; trying again on the next failure");
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "no writable database server yet"),
                }
                tokio::time::sleep(SEARCH_PAUSE).await;
            }
            router.searching.store(false, Ordering::Release);
        });
    }

    /// Points the pool at target `index`, opened with `options`.
    pub(crate) fn use_target(&self, index: usize, options: PgConnectOptions) {
        let previous = self.current.swap(index, Ordering::AcqRel);
        if previous != index {
            *lock(&self.switched) = Instant::now();
            tracing::warn!(from = %self.targets.get(previous).map(describe).unwrap_or_default(),
                to = %self.current_host(), "the writable database server moved; reconnecting there");
        }
        if let Some(pool) = self.pool() {
            pool.set_connect_options(options);
        }
    }

    /// Tries each host, starting with the current one, and returns the first
    /// that accepts a connection (and writes, when required).
    pub(crate) async fn find(&self) -> Result<(usize, PgConnectOptions), StoreError> {
        let start = self.current.load(Ordering::Relaxed);
        let count = self.targets.len().max(1);
        let mut failures = Vec::new();
        let mut last = None;
        for step in 0..count {
            let index = (start + step) % count;
            let Some(target) = self.targets.get(index) else {
                continue;
            };
            let options = self
                .options_for(index)
                .await
                .unwrap_or_else(|| target.clone());
            match self.probe(&options, target).await {
                Ok(()) => return Ok((index, options)),
                Err(e) => {
                    if let Some(previous) = last.replace(e) {
                        let failed = failures.pop().unwrap_or_default();
                        failures.push(format!("{failed} ({})", brief(&previous)));
                    }
                    failures.push(describe(target));
                }
            }
        }
        // Every host with its reason; the last one's is the error's source.
        Err(StoreError::Connect {
            host: failures.join(", "),
            source: last.unwrap_or(sqlx::Error::PoolClosed),
        })
    }

    async fn probe(
        &self,
        options: &PgConnectOptions,
        target: &PgConnectOptions,
    ) -> Result<(), sqlx::Error> {
        let attempt = async {
            let mut conn = PgConnection::connect_with(options).await?;
            let ok = self.attrs == TargetSessionAttrs::Any || writable(&mut conn).await?;
            let _ = conn.close().await;
            if ok {
                Ok(())
            } else {
                Err(read_only(&describe(target)))
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    }
}

/// Whether the server accepts writes (what libpq checks for `read-write`).
/// Sent as a simple query: a named prepared statement would outlive the
/// server connection's loan behind a transaction pooler.
async fn writable(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    use sqlx::{Executor, Row};
    // A bare string has no arguments: sqlx sends it with the simple protocol.
    let row = conn.fetch_one("SHOW transaction_read_only").await?;
    Ok(row.try_get::<String, _>(0)? == "off")
}

fn read_only(host: &str) -> sqlx::Error {
    sqlx::Error::Configuration(
        format!(
            "the server at {host} is read-only (a standby?) and target_session_attrs is read-write"
        )
        .into(),
    )
}

/// The reason alone, for the list of hosts tried.
fn brief(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(c) => c.to_string(),
        other => other.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn describe(options: &PgConnectOptions) -> String {
    match options.get_socket() {
        Some(path) => path.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    }
}

type Parsed = (PgConnectOptions, Vec<String>, Vec<String>, Option<String>);

/// The options common to every host, the hosts, the ports and
/// `target_session_attrs`, from a URL or a keyword/value string.
fn parse(input: &str) -> Result<Parsed, StoreError> {
    let input = input.trim();
    let Some((scheme, rest)) = input.split_once("://") else {
        return parse_keywords(input);
    };
    if !matches!(scheme, "postgres" | "postgresql") {
        return Err(StoreError::InvalidUrl);
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for entry in hostlist.split(',').filter(|e| !e.is_empty()) {
        let (host, port) = split_host_port(entry)?;
        hosts.push(decode(host)?);
        ports.push(port.unwrap_or_default().to_owned());
    }
    // The query's own host/port and target_session_attrs are taken out:
    // sqlx reads one host only and knows no target_session_attrs.
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    let mut kept = Vec::new();
    let mut attrs = None;
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "host" => hosts = value.split(',').map(str::to_owned).collect(),
            "port" => ports = value.split(',').map(str::to_owned).collect(),
            "target_session_attrs" => attrs = Some(value.into_owned()),
            _ => kept.push((key.into_owned(), value.into_owned())),
        }
    }
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let single = format!("{scheme}://{userinfo}localhost{path}?{query}");
    let base = PgConnectOptions::from_str(&single).map_err(|_| StoreError::InvalidUrl)?;
    Ok((base, hosts, ports, attrs))
}

/// `host=a,b port=5432 dbname=app user=app sslmode=require`, values
/// optionally in single quotes with `\'` and `\\` escapes.
fn parse_keywords(input: &str) -> Result<Parsed, StoreError> {
    let mut pairs = Vec::new();
    let mut chars = input.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || key.is_empty() {
            return Err(StoreError::InvalidUrl);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().ok_or(StoreError::InvalidUrl)?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(StoreError::InvalidUrl),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(if c == '\\' {
                    chars.next().ok_or(StoreError::InvalidUrl)?
                } else {
                    c
                });
            }
        }
        pairs.push((key, value));
    }
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    parse(&format!("postgres://?{query}"))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(entry: &str) -> Result<(&str, Option<&str>), StoreError> {
    if let Some(v6) = entry.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or(StoreError::InvalidUrl)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(StoreError::InvalidUrl)?),
        };
        return Ok((host, port));
    }
    Ok(match entry.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (entry, None),
    })
}

fn decode(s: &str) -> Result<String, StoreError> {
    url::form_urlencoded::parse(format!("h={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .ok_or(StoreError::InvalidUrl)
}

/// One set of options per host: a port list of one applies to every host.
fn targets(
    base: &PgConnectOptions,
    hosts: &[String],
    ports: &[String],
) -> Result<Vec<PgConnectOptions>, StoreError> {
    if hosts.is_empty() {
        // No host given: libpq's defaults (PGHOST, else the local socket
        // directory when there is one, else localhost).
        let defaults = PgConnectOptions::new_without_pgpass();
        let mut only = match defaults.get_socket() {
            Some(dir) => base.clone().socket(dir),
            None => base.clone().host(defaults.get_host()),
        };
        if let Some(port) = ports.first().filter(|p| !p.is_empty()) {
            only = only.port(port.parse().map_err(|_| StoreError::InvalidUrl)?);
        }
        return Ok(vec![only]);
    }
    if ports.len() > 1 && ports.len() != hosts.len() {
        return Err(StoreError::UnsupportedUrl(
            "port: give one port, or one per host",
        ));
    }
    hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = match ports.get(i).or(ports.first().filter(|_| ports.len() == 1)) {
                Some(p) if !p.is_empty() => p.parse().map_err(|_| StoreError::InvalidUrl)?,
                _ => 5432,
            };
            Ok(if host.starts_with('/') {
                base.clone().socket(host).port(port)
            } else {
                base.clone().host(host).port(port)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(url: &str) -> Vec<String> {
        PgConnect::from_url(url).expect(url).hosts()
    }

    #[test]
    fn pool_bounds_are_checked_in_any_order() {
        let url = "postgres://u@a/db";
        let refused = |c: PgConnect| c.check().err().map(|e| e.to_string()).unwrap_or_default();
        let base = || PgConnect::from_url(url).expect(url);
        let a = refused(base().with_min_connections(5).with_max_connections(2));
        let b = refused(base().with_max_connections(2).with_min_connections(5));
        assert_eq!(a, b);
        assert!(
            a.contains("with_min_connections and with_max_connections"),
            "{a}"
        );
        assert!(refused(base().with_max_connections(0)).contains("with_max_connections"));
        let short = base().with_acquire_timeout(Duration::from_millis(1));
        assert!(refused(short).contains("with_acquire_timeout"));
        let often = base().with_credentials_refresh(Duration::from_millis(1));
        assert!(refused(often).contains("with_credentials_refresh"));
        assert!(base().check().is_ok());
    }

    #[test]
    fn host_lists() {
        assert_eq!(hosts("postgres://u:p@a:5433,b/db"), ["a:5433", "b:5432"]);
        assert_eq!(
            hosts("postgresql://u@x/db?host=a,b&port=1,2"),
            ["a:1", "b:2"]
        );
        assert_eq!(hosts("postgres://[::1]:7,c:8/db"), ["::1:7", "c:8"]);
        assert_eq!(
            hosts("host=a,b port=6000 dbname=d user=u password='x y\\'z'"),
            ["a:6000", "b:6000"]
        );
        assert_eq!(hosts("postgres://h/db"), ["h:5432"]);
    }

    #[test]
    fn common_settings_reach_every_host() {
        let c = PgConnect::from_url(
            "postgres://u:secret@a,b/db?sslmode=verify-full&application_name=web&target_session_attrs=any",
        )
        .expect("valid");
        assert_eq!(c.attrs, TargetSessionAttrs::Any);
        for t in &c.targets {
            assert_eq!(t.get_username(), "u");
            assert_eq!(t.get_database(), Some("db"));
            assert_eq!(t.get_application_name(), Some("web"));
            assert!(matches!(
                t.get_ssl_mode(),
                sqlx::postgres::PgSslMode::VerifyFull
            ));
        }
        assert!(!format!("{c:?}").contains("secret"), "{c:?}");
    }

    #[test]
    fn refusals() {
        for bad in [
            "mysql://a/db",
            "postgres://a:notaport/db",
            "postgres://a,b/db?port=1,2,3",
            "postgres://a/db?target_session_attrs=standby",
            "host=a port",
        ] {
            assert!(PgConnect::from_url(bad).is_err(), "{bad}");
        }
    }
}
