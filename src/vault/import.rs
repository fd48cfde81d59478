//! Importing tokens kept in the clear in a table of the application's own
//! (the hand-made vault this one replaces).

use sqlx::Row;
use time::OffsetDateTime;
use tracing::Instrument;

use super::{TokenVault, Tokens, VaultError};
use crate::store::{
    paged::{in_batches, Step},
    schema::Ident,
    StoreError,
};

/// Where plaintext tokens are read from: a table and its column names.
/// Every name is validated as an SQL identifier.
///
/// ```
/// use tower_pg_session::vault::ImportSource;
///
/// # fn main() -> Result<(), tower_pg_session::ConfigError> {
/// let source = ImportSource::new(Some("legacy"), "oauth_connections")?
///     .with_columns("owner", "provider", "access", Some("refresh"), Some("expiry"))?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ImportSource {
    schema: Option<Ident>,
    table: Ident,
    user: Ident,
    integration: Ident,
    access: Ident,
    refresh: Option<Ident>,
    expires: Option<Ident>,
}

impl ImportSource {
    /// The table, with the columns `user_id`, `integration`, `access_token`,
    /// `refresh_token` and `expires_at` (a `timestamptz`).
    ///
    /// # Errors
    /// [`ConfigError::InvalidIdentifier`](crate::ConfigError::InvalidIdentifier).
    pub fn new(schema: Option<&str>, table: &str) -> Result<Self, crate::ConfigError> {
        Ok(Self {
            schema: schema.map(Ident::new).transpose()?,
            table: Ident::new(table)?,
            user: Ident::new("user_id")?,
            integration: Ident::new("integration")?,
            access: Ident::new("access_token")?,
            refresh: Some(Ident::new("refresh_token")?),
            expires: Some(Ident::new("expires_at")?),
        })
    }

    /// Other column names; `None` for a column the table does not have.
    ///
    /// # Errors
    /// [`ConfigError::InvalidIdentifier`](crate::ConfigError::InvalidIdentifier).
    pub fn with_columns(
        mut self,
        user: &str,
        integration: &str,
        access_token: &str,
        refresh_token: Option<&str>,
        expires_at: Option<&str>,
    ) -> Result<Self, crate::ConfigError> {
        self.user = Ident::new(user)?;
        self.integration = Ident::new(integration)?;
        self.access = Ident::new(access_token)?;
        self.refresh = refresh_token.map(Ident::new).transpose()?;
        self.expires = expires_at.map(Ident::new).transpose()?;
        Ok(self)
    }

    fn select(&self) -> String {
        let table = match &self.schema {
            Some(s) => format!("{s}.{}", self.table),
            None => self.table.to_string(),
        };
        let refresh = self
            .refresh
            .as_ref()
            .map_or("NULL::text".to_owned(), ToString::to_string);
        let expires = self
            .expires
            .as_ref()
            .map_or("NULL::timestamptz".to_owned(), |c| {
                format!("{c}::timestamptz")
            });
        format!(
            "SELECT {}::text, {}::text, {}::text, {refresh}::text, {expires} FROM {table} \
             WHERE ({}::text, {}::text) > ($1, $2) ORDER BY 1, 2 LIMIT $3",
            self.user, self.integration, self.access, self.user, self.integration
        )
    }
}

/// What [`TokenVault::import`] found (and, unless a dry run, stored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportOutcome {
    /// Rows read.
    pub read: u64,
    /// Rows stored in the vault (or that would be, in a dry run).
    pub imported: u64,
    /// Rows left out: an integration the vault does not know, an invalid
    /// user id, an empty or oversized token (each logged without the token).
    pub skipped: u64,
}

const IMPORT_BATCH: i64 = 500;

impl TokenVault {
    /// Seals and stores the tokens of `source`, replacing the vault's row
    /// for each (user, integration) it holds; with `dry_run`, only checks
    /// and counts. The source table is not changed: drop it once done.
    ///
    /// # Errors
    /// [`VaultError::Store`] when the source cannot be read or a row cannot
    /// be written; rows already imported stay imported, and running it again
    /// is safe.
    pub async fn import(
        &self,
        source: &ImportSource,
        dry_run: bool,
    ) -> Result<ImportOutcome, VaultError> {
        let span = tracing::info_span!("vault_import", dry_run);
        async {
            let outcome = self.import_rows(source, dry_run).await?;
            tracing::info!(
                read = outcome.read,
                imported = outcome.imported,
                skipped = outcome.skipped,
                "plaintext tokens imported"
            );
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    async fn import_rows(
        &self,
        source: &ImportSource,
        dry_run: bool,
    ) -> Result<ImportOutcome, VaultError> {
        let sql = &source.select();
        let mut outcome = ImportOutcome::default();
        let step = move |after| self.import_batch(sql, after, dry_run);
        let fold = |done: ImportOutcome| {
            outcome.read += done.read;
            outcome.imported += done.imported;
            outcome.skipped += done.skipped;
        };
        in_batches((String::new(), String::new()), step, fold, &mut |_| {}).await?;
        Ok(outcome)
    }

    /// The source's rows after the (user, integration) `after`, imported.
    async fn import_batch(
        &self,
        sql: &str,
        after: (String, String),
        dry_run: bool,
    ) -> Result<Step<ImportOutcome, (String, String)>, VaultError> {
        let mut conn = self.inner.sql.pooler().conn(&self.inner.pool).await?;
        let rows = sqlx::query(sql)
            .persistent(self.inner.sql.persistent())
            .bind(&after.0)
            .bind(&after.1)
            .bind(IMPORT_BATCH)
            .fetch_all(conn.get())
            .await
            .map_err(StoreError::from)?;
        conn.done().await.map_err(StoreError::from)?;
        let mut outcome = ImportOutcome::default();
        let next = match rows.last() {
            Some(last) => Some((last.try_get(0)?, last.try_get(1)?)),
            None => None,
        };
        for row in &rows {
            outcome.read += 1;
            let user: String = row.try_get(0)?;
            let name: String = row.try_get(1)?;
            let access: Option<String> = row.try_get(2)?;
            let refresh: Option<String> = row.try_get(3)?;
            let expires: Option<OffsetDateTime> = row.try_get(4)?;
            let mut tokens = Tokens::new(access.unwrap_or_default());
            if let Some(rt) = refresh.filter(|r| !r.is_empty()) {
                tokens = tokens.with_refresh_token(rt);
            }
            if let Some(at) = expires {
                tokens = tokens.with_expires_at(at);
            }
            match self.import_one(&user, &name, tokens, dry_run).await {
                Ok(()) => outcome.imported += 1,
                Err(VaultError::Store(e)) => return Err(VaultError::Store(e)),
                Err(e) => {
                    outcome.skipped += 1;
                    tracing::warn!(
                        user = %crate::log_safe::untrusted(&user),
                        integration = %crate::log_safe::untrusted(&name),
                        error = %e,
                        "row not imported"
                    );
                }
            }
        }
        Ok(Step {
            rows: outcome.read,
            done: outcome,
            next,
        })
    }

    async fn import_one(
        &self,
        user: &str,
        name: &str,
        tokens: Tokens,
        dry_run: bool,
    ) -> Result<(), VaultError> {
        if !dry_run {
            return self.store(user, name, tokens).await;
        }
        self.integration(name)?;
        super::check_user(user)?;
        super::check_token(&tokens.access_token, self.inner.max_token_bytes)?;
        if let Some(rt) = &tokens.refresh_token {
            super::check_token(rt, self.inner.max_token_bytes)?;
        }
        Ok(())
    }
}
