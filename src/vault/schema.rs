//! The vault's table: its DDL and its creation at start-up.

use sqlx::PgPool;

use crate::{
    store::{
        schema::{Ident, TableName},
        Pooler, StoreError,
    },
    ConfigError,
};

/// The default table name.
pub(crate) const DEFAULT_TABLE: &str = "oauth_tokens";

/// Builds the validated, qualified table name.
pub(crate) fn table_name(schema: Option<&str>, table: &str) -> Result<TableName, ConfigError> {
    Ok(TableName {
        schema: schema.map(Ident::new).transpose()?,
        table: Ident::new(table)?,
    })
}

/// Creates the table when missing. Serialised by an advisory lock and
/// idempotent, so many instances starting at once neither fail nor race.
pub(crate) async fn prepare(
    pool: &PgPool,
    name: &TableName,
    pooler: Pooler,
) -> Result<(), StoreError> {
    let persistent = pooler == Pooler::Direct;
    let mut conn = pooler.conn(pool).await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .persistent(persistent)
        .bind(name.qualified())
        .fetch_one(conn.get())
        .await?;
    conn.done().await?;
    if exists {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .persistent(persistent)
        .bind(name.lock_key("vault-ddl"))
        .execute(&mut *tx)
        .await?;
    for statement in ddl(name) {
        sqlx::query(&statement)
            .persistent(persistent)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Sealed tokens per (user, integration); everything else is metadata that
/// listings and operators may read.
fn ddl(name: &TableName) -> Vec<String> {
    let t = name.qualified();
    let mut out = Vec::new();
    if let Some(schema) = &name.schema {
        out.push(format!("CREATE SCHEMA IF NOT EXISTS {schema}"));
    }
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {t} (\
           user_id text NOT NULL, \
           integration text NOT NULL, \
           access_token text NOT NULL, \
           refresh_token text, \
           expires_at timestamptz, \
           scopes text[] NOT NULL DEFAULT '{{}}', \
           token_type text NOT NULL DEFAULT 'Bearer', \
           needs_reconsent_at timestamptz, \
           created_at timestamptz NOT NULL DEFAULT now(), \
           updated_at timestamptz NOT NULL DEFAULT now(), \
           last_used_at timestamptz, \
           last_refreshed_at timestamptz, \
           PRIMARY KEY (user_id, integration))"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_and_quoted() {
        let name = table_name(Some("auth"), DEFAULT_TABLE).expect("valid");
        assert_eq!(name.qualified(), "\"auth\".\"oauth_tokens\"");
        assert!(table_name(None, "x; drop").is_err());
        assert!(ddl(&name)[1].contains("PRIMARY KEY (user_id, integration)"));
    }
}
